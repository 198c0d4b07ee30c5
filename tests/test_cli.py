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

