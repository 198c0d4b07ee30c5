"""`stoke generate` prints the completion of the embedded default model; `stoke serve` checks its
options before anything starts."""

from __future__ import annotations

import pytest

from server.cli import main


def test_generate_prints_the_completion(capsys: pytest.CaptureFixture[str], default_model_dir: str) -> None:
    assert main(["generate", "What is the capital of France?", "--max-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_generate_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate"])
    assert info.value.code == 2 and "prompt" in capsys.readouterr().err


def test_serve_refuses_auto_tool_choice_without_a_parser(capsys: pytest.CaptureFixture[str]) -> None:
    from server.launch import build_parser, config_from_args, main as serve_main

    with pytest.raises(SystemExit) as info:
        serve_main(["--enable-auto-tool-choice"])  # as vLLM: before anything starts
    assert info.value.code == 2 and "--tool-call-parser" in capsys.readouterr().err
    args = build_parser().parse_args(["--tool-call-parser", "hermes"])  # a parser alone reads nothing
    assert config_from_args(args).tool_call_parser is None
    args = build_parser().parse_args(["--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"])
    assert config_from_args(args).tool_call_parser == "llama3_json"


@pytest.mark.parametrize("value, message", [
    ('{"method": "eagle", "num_speculative_tokens": 2}', "method must be one of"),
    ('{"method": "ngram"}', "num_speculative_tokens must be an integer >= 1"),
    ('{"method": "ngram", "num_speculative_tokens": 2, "draft_model": "x"}', "'draft_model' is not supported"),
    ("ngram", "not valid JSON"),
])
def test_serve_checks_its_speculative_config_before_starting(capsys: pytest.CaptureFixture[str], value: str,
                                                             message: str) -> None:
    from server.launch import build_parser, config_from_args, main as serve_main

    with pytest.raises(SystemExit) as info:
        serve_main(["--speculative-config", value])
    assert info.value.code == 2 and message in capsys.readouterr().err
    args = build_parser().parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 3}'])
    assert config_from_args(args).engine_args["speculative_config"] == {
        "method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 5, "prompt_lookup_min": 5,
        "disable_by_batch_size": None}



# --------------------------------------------------------------------------------------------
# --enable-lora / --lora-modules: each value read by argparse, each adapter checked against the
# model before anything starts


@pytest.fixture(scope="module")
def lora_dirs(default_model_dir: str, tiny_checkpoints: dict[str, str],
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Adapters for the default model (rank 4 and rank 8) and one for the tiny llama (its shapes
    are not the default model's); one layer each, so they are small."""
    from tests.lora_adapters import save_adapter

    root = tmp_path_factory.mktemp("cli-lora")
    return {"r4": save_adapter(str(root / "r4"), default_model_dir, rank=4, modules=["q_proj"], layers=[0]),
            "r8": save_adapter(str(root / "r8"), default_model_dir, rank=8, modules=["down_proj"], layers=[1]),
            "tiny": save_adapter(str(root / "tiny"), tiny_checkpoints["llama"], rank=4, modules=["q_proj"],
                                 layers=[0])}


@pytest.fixture
def restore_logging():
    """serve's main sets the process's logging up (root handlers and level, stoke.requests):
    put them back for the tests after this one."""
    import logging

    root, requests = logging.getLogger(), logging.getLogger("stoke.requests")
    saved = (root.handlers[:], root.level, requests.handlers[:], requests.level, requests.propagate)
    yield
    root.handlers[:], root.level, requests.handlers[:], requests.level, requests.propagate = saved


@pytest.fixture
def never_served(monkeypatch: pytest.MonkeyPatch, restore_logging) -> None:
    """serve's main in this process must stop before its app is built (a server would run here)."""
    import server.api

    def create_app(*args, **kwargs):
        raise AssertionError("stoke serve went on to start the server")

    monkeypatch.setattr(server.api, "create_app", create_app)


def test_serve_lora_modules_need_enable_lora(capsys: pytest.CaptureFixture[str], lora_dirs: dict[str, str]) -> None:
    from server.launch import main as serve_main

    with pytest.raises(SystemExit) as info:
        serve_main(["--lora-modules", f"a={lora_dirs['r4']}"])  # as vLLM: before anything starts
    assert info.value.code == 2 and "--lora-modules needs --enable-lora" in capsys.readouterr().err


@pytest.mark.parametrize("value, message", [
    ("noequals", "a LoRA module is NAME=PATH"),
    ("={r4}", "a LoRA module is NAME=PATH"),
    (" ={r4}", "a LoRA module is NAME=PATH"),
    ("a=", "a LoRA module is NAME=PATH"),
    ('{{"name": "a", "path": ', "not JSON"),
    ('{{"name": "a"}}', '{{"name": ..., "path": ...}}'),
    ('{{"name": "a", "path": 3}}', '{{"name": ..., "path": ...}}'),
    ('{{"path": "{r4}"}}', '{{"name": ..., "path": ...}}'),
    ('{{"name": "", "path": "{r4}"}}', "a LoRA module is NAME=PATH"),
    ("a={empty}", "is not a PEFT LoRA adapter directory (no adapter_config.json)"),
    ("a={empty}/missing", "is not a PEFT LoRA adapter directory (no adapter_config.json)"),
], ids=["no-equals", "no-name", "blank-name", "no-path", "bad-json", "json-no-path", "json-path-not-string",
        "json-no-name", "json-empty-name", "no-adapter-config", "no-directory"])
def test_serve_reads_each_lora_module_value(capsys: pytest.CaptureFixture[str], lora_dirs: dict[str, str], tmp_path,
                                            value: str, message: str) -> None:
    from server.launch import main as serve_main

    value = value.format(r4=lora_dirs["r4"], empty=tmp_path)
    with pytest.raises(SystemExit) as info:
        serve_main(["--enable-lora", "--lora-modules", value])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "--lora-modules" in err and message.format() in err, err


def test_serve_refuses_an_adapter_name_given_twice(capsys: pytest.CaptureFixture[str],
                                                   lora_dirs: dict[str, str]) -> None:
    from server.launch import main as serve_main

    with pytest.raises(SystemExit) as info:  # twice in one flag, or across flags and forms
        serve_main(["--enable-lora", "--lora-modules", f"a={lora_dirs['r4']}", f"b={lora_dirs['r4']}",
                    "--lora-modules", f'{{"name": "a", "path": "{lora_dirs["r8"]}"}}'])
    assert info.value.code == 2 and "--lora-modules names an adapter twice: ['a']" in capsys.readouterr().err


def test_serve_reads_lora_modules_in_both_forms(lora_dirs: dict[str, str]) -> None:
    from server.launch import build_parser, config_from_args

    args = build_parser().parse_args(["--enable-lora", "--lora-modules", f"a={lora_dirs['r4']}",
                                      f' {{"name": "x", "path": "{lora_dirs["r8"]}", "base_model_name": "m"}} ',
                                      "--lora-modules", f"b={lora_dirs['r4']}", "--max-loras", "2",
                                      "--max-lora-rank", "8", "--max-cpu-loras", "3"])
    config = config_from_args(args)
    assert config.lora_modules == [("a", lora_dirs["r4"]), ("x", lora_dirs["r8"]), ("b", lora_dirs["r4"])]
    assert {k: config.engine_args[k] for k in ("enable_lora", "max_loras", "max_lora_rank", "max_cpu_loras")} == {
        "enable_lora": True, "max_loras": 2, "max_lora_rank": 8, "max_cpu_loras": 3}
    # The served adapters stay in memory by default (a read from disk would stall every step).
    default = config_from_args(build_parser().parse_args(["--enable-lora", "--lora-modules", f"a={lora_dirs['r4']}",
                                                          f"b={lora_dirs['r8']}", f"c={lora_dirs['r4']}"]))
    assert (default.engine_args["max_loras"], default.engine_args["max_cpu_loras"]) == (1, 3)
    plain = config_from_args(build_parser().parse_args([]))
    assert plain.lora_modules == [] and plain.engine_args["enable_lora"] is False
    assert (plain.engine_args["max_loras"], plain.engine_args["max_lora_rank"]) == (1, 16)


@pytest.mark.parametrize("flags, message", [
    (["--lora-modules", "SmolLM2-135M-Instruct-Q4_1={r4}"], "'SmolLM2-135M-Instruct-Q4_1' is the base model's name"),
    (["--served-model-name", "mine", "--lora-modules", "a={r4}", "mine={r8}"], "'mine' is the base model's name"),
    (["--lora-modules", "a={r4}", "small={tiny}"], "small: LoRA adapter {tiny!r}, layer 0 q_proj: lora_A (4, 64) "
                                                  "and lora_B (64, 4) do not fit the model's [r, 576] and [576, r]"),
    (["--lora-modules", "a={r4}", "big={r8}", "--max-lora-rank", "4"],
     "big: LoRA adapter {r8!r}, layer 1 down_proj: rank 8 exceeds max_lora_rank 4"),
], ids=["base-model-name", "served-model-name", "shapes", "rank"])
def test_serve_checks_its_adapters_against_the_model_before_starting(
        capsys: pytest.CaptureFixture[str], lora_dirs: dict[str, str], never_served, flags: list[str],
        message: str) -> None:
    from server.launch import main as serve_main

    flags = [flag.format(**lora_dirs) for flag in flags]
    assert serve_main(["--enable-lora", *flags]) == 2  # returned, not served
    err = capsys.readouterr().err
    assert "ERROR stoke.server: bad --lora-modules: " + message.format(**lora_dirs) in err, err
    assert "worker process" not in err  # nothing started


def test_serve_refuses_an_adapter_with_unreadable_weights_before_starting(
        capsys: pytest.CaptureFixture[str], lora_dirs: dict[str, str], tmp_path, never_served) -> None:
    """A weights file cut short (a download that did not finish): refused as any adapter that
    can't be served, exit 2 and a log line naming it."""
    import shutil

    broken = shutil.copytree(lora_dirs["r4"], tmp_path / "broken")
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    from server.launch import main as serve_main

    assert serve_main(["--enable-lora", "--lora-modules", f"a={lora_dirs['r4']}", f"broken={broken}"]) == 2
    err = capsys.readouterr().err
    assert "ERROR stoke.server: bad --lora-modules: broken: " in err and str(broken) in err, err


@pytest.mark.parametrize("flags, name", [
    (["--max-loras", "0"], "max_loras"),
    (["--max-loras", "2", "--max-cpu-loras", "1"], "max_cpu_loras"),
    (["--max-lora-rank", "0"], "max_lora_rank"),
])
def test_serve_checks_its_lora_limits_before_starting(capsys: pytest.CaptureFixture[str], never_served,
                                                      flags: list[str], name: str) -> None:
    """As every other bad option: exit 2 and a log line naming it, before the HTTP server and the
    worker start (not a worker that dies once the model is loaded, exit 1)."""
    from server.launch import main as serve_main

    assert serve_main(["--enable-lora", *flags]) == 2
    err = capsys.readouterr().err
    assert "ERROR stoke.server: " in err and name in err, err


@pytest.mark.parametrize("overrides, message", [
    ('{"architectures": ["GPT2LMHeadModel"]}', "unsupported architecture"),
    ('{"classifier_from_token": ["no", "yes"], "method": "from_2_way_softmax"}', "architecture must be one"),
    ('{"architectures": ["LlamaForSequenceClassification"], "classifier_from_token": ["nope_not_a_token", "yes"], '
     '"method": "from_2_way_softmax"}', "'nope_not_a_token' is not a token of this model's vocabulary"),
])
def test_serve_checks_its_hf_overrides_before_starting(capsys: pytest.CaptureFixture[str], never_served,
                                                       overrides: str, message: str) -> None:
    """`--hf-overrides` (vLLM's flag): a JSON object over the checkpoint's config.json, passed to
    the engine as it is; one the model can't run with is refused before anything starts."""
    from server.launch import build_parser, config_from_args, main as serve_main

    assert serve_main(["--hf-overrides", overrides]) == 2
    err = capsys.readouterr().err
    assert "ERROR stoke.server: bad --hf-overrides" in err and message in err, err
    reranker = {"architectures": ["LlamaForSequenceClassification"], "classifier_from_token": ["no", "yes"],
                "method": "from_2_way_softmax"}
    import json

    args = build_parser().parse_args(["--hf-overrides", json.dumps(reranker)])
    assert config_from_args(args).engine_args["hf_overrides"] == reranker
    assert config_from_args(build_parser().parse_args([])).engine_args["hf_overrides"] is None


def test_a_mistral_servers_call_ids_are_short_with_or_without_auto_tool_choice() -> None:
    """Forced tool choices make calls on a server without --enable-auto-tool-choice too: their
    ids must be ones Mistral's chat templates take back."""
    from server.launch import build_parser, config_from_args

    for flags, parser in ((["--tool-call-parser", "mistral"], None),
                          (["--enable-auto-tool-choice", "--tool-call-parser", "mistral"], "mistral")):
        config = config_from_args(build_parser().parse_args(flags))
        assert config.short_tool_call_ids and config.tool_call_parser == parser
    hermes = config_from_args(build_parser().parse_args(["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]))
    assert not hermes.short_tool_call_ids


def test_generate_says_in_a_line_why_it_cannot_load_a_model(tmp_path, capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from server.cli import main

    monkeypatch.setenv("STOKE_CACHE_DIR", str(tmp_path / "cache"))  # the refused file's lock lands there
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF not really")
    for model, message in ((str(broken), "does not read as a GGUF file"), (str(tmp_path), "config.json")):
        assert main(["generate", "hi", "--model", model]) == 2
        err = capsys.readouterr().err
        assert f"stoke generate: cannot load {model}: " in err and message in err and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--quantization", "int8"], "quantization must be one of fp8, compressed-tensors, got 'int8'"),
    (["-q", "compressed-tensors"], "bad --quantization: quantization='compressed-tensors': the checkpoint has no such "
                                   "quantization_config"),
])
def test_serve_checks_its_quantization_before_starting(capsys: pytest.CaptureFixture[str], never_served,
                                                       flags: list[str], message: str) -> None:
    """`--quantization` (vLLM's `-q`): a value stoke does not serve, or one the checkpoint
    does not match, is refused before anything starts; fp8 reaches the engine."""
    from server.launch import build_parser, config_from_args, main as serve_main

    assert serve_main(flags) == 2
    err = capsys.readouterr().err
    assert "ERROR stoke.server: " in err and message in err, err
    assert config_from_args(build_parser().parse_args(["-q", "fp8"])).engine_args["quantization"] == "fp8"
    assert config_from_args(build_parser().parse_args([])).engine_args["quantization"] is None


def test_serve_takes_vllms_kv_cache_dtypes(capsys: pytest.CaptureFixture[str], never_served) -> None:
    """`--kv-cache-dtype`: auto (the default), fp8 and fp8_e4m3 reach the engine; fp8_e5m2,
    which stoke does not store, is refused before anything starts."""
    from server.launch import build_parser, config_from_args, main as serve_main

    with pytest.raises(SystemExit) as exit_info:
        serve_main(["--kv-cache-dtype", "fp8_e5m2"])
    assert exit_info.value.code == 2
    assert "argument --kv-cache-dtype: invalid choice: 'fp8_e5m2'" in capsys.readouterr().err
    for value in ("auto", "fp8", "fp8_e4m3"):
        args = build_parser().parse_args(["--kv-cache-dtype", value])
        assert config_from_args(args).engine_args["kv_cache_dtype"] == value
    assert config_from_args(build_parser().parse_args([])).engine_args["kv_cache_dtype"] == "auto"
