"""GGUF files served as their checkpoints (engine/gguf.py): tiny random transformers models of
each converted architecture, written as llama.cpp's convert_hf_to_gguf.py writes them
(tests/gguf_writer.py, itself checked against transformers' GGUF loader), give the original
model's logprobs; a quantised file its own; the conversion is cached; what is not converted is
refused before anything loads; and `stoke serve model.gguf` serves it under the file's name."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import LLM
from tests.conftest import TINY_COMMON, assert_engine_idle, assert_logprobs_equal_transformers, random_prompts
from tests.gguf_writer import write_gguf

# Each family's own parts: Llama's q/k permutation and Llama 3 rope (llama.cpp's rope_freqs);
# Qwen2's biases; Qwen3's q/k norms, a head dim of its own and YaRN; Qwen3-MoE's stacked experts; Gemma's 1 + w norms, softcaps and windows the prompts
# outgrow, and Gemma 3's linear rope on its global layer. The files carry the embedded
# tokenizer's first 1,024 tokens (its whole 49k take seconds to read back). Gemma's query scale
# is the head dim, as llama.cpp assumes, and its LM head the embedding (llama.cpp drops an
# untied one).
SHAPE = dict(TINY_COMMON, vocab_size=1024, head_dim=16, tie_word_embeddings=False)
FAMILIES = {
    "llama": ("Llama", dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})),
    "qwen2": ("Qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3", dict(head_dim=32, rope_scaling={"rope_type": "yarn", "factor": 4.0, "beta_fast": 8.0,
                                                       "beta_slow": 2.0, "original_max_position_embeddings": 256})),
    "qwen3_moe": ("Qwen3Moe", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                                   norm_topk_prob=True)),
    "gemma2": ("Gemma2", dict(sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=5.0,
                              final_logit_softcapping=3.0, tie_word_embeddings=True)),
    "gemma3_text": ("Gemma3", dict(num_hidden_layers=6, sliding_window=8, query_pre_attn_scalar=16,
                                   rope_scaling={"rope_type": "linear", "factor": 4.0}, tie_word_embeddings=True)),
}


def save_family(kind: str, path: str) -> torch.nn.Module:
    import transformers

    prefix, own = FAMILIES[kind]
    config_class = getattr(transformers, f"{prefix}TextConfig" if kind == "gemma3_text" else f"{prefix}Config")
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config_class(**(SHAPE | own)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # not the init's ones (zeros for Gemma): a norm's offset must count
                param.normal_(0.5, 0.3)
            elif name.endswith("bias"):  # not the init's zeros
                param.normal_(0.0, 0.5)
    model.save_pretrained(path)
    return model.eval()


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, default_model_dir: str):
    """A cache of conversions of its own, for the module (the embedded model's, the reference
    tokenizer, found first in the usual one)."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("cache")
        patch.setenv("STOKE_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory, cache) -> dict[str, tuple[str, torch.nn.Module]]:
    """kind -> (its F32 GGUF file, the transformers model it was written from)."""
    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for kind in FAMILIES:
        model = save_family(kind, str(root / kind))
        write_gguf(str(root / kind), str(root / f"{kind}.gguf"))
        out[kind] = (str(root / f"{kind}.gguf"), model)
    return out


@pytest.mark.parametrize("kind", list(FAMILIES))
def test_a_gguf_file_gives_its_models_logprobs(files, default_model_dir: str, kind: str) -> None:
    path, model = files[kind]
    llm = LLM(path, block_size=4, max_num_batched_tokens=16, num_kv_blocks=128)
    assert_logprobs_equal_transformers(llm, model, random_prompts(1, [30, 5]), max_tokens=4)
    assert_engine_idle(llm)
    converted = Path(llm.engine.model_path)
    config = json.loads((converted / "config.json").read_text())
    assert config["model_type"] == kind and config["vocab_size"] == 1024
    # the tokenizer is the file's, with its chat template and special tokens (a Gemma file's is
    # read as SentencePiece's, which these BPE tokens are not: its encoding is not checked)
    from transformers import AutoTokenizer

    ours, theirs = llm.engine.tokenizer, AutoTokenizer.from_pretrained(default_model_dir)
    assert ours.chat_template == theirs.chat_template and (ours.bos_token_id, ours.eos_token_id) == (1, 2)
    if not kind.startswith("gemma"):
        ids = ours.encode("Hello, world!")
        assert max(ids) < 1024 and ours.decode(ids) == "Hello, world!"


@pytest.mark.parametrize("dtype", ["Q8_0", "BF16"])
def test_a_quantised_file_is_served_as_it_dequantises(tmp_path, files, monkeypatch, dtype: str) -> None:
    """A Q8_0 file: its weights written as float16, each within a block's rounding of the
    file's own values (a BF16 file's kept bf16, exactly), in shards written as they fill, and
    the engine's logprobs those of its dequantised weights."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    from engine import gguf as gguf_module

    monkeypatch.setattr(gguf_module, "_SHARD_BYTES", 200_000)
    src = Path(files["qwen3"][0]).parent / "qwen3"
    write_gguf(str(src), str(tmp_path / "m.gguf"), dtype=dtype)
    llm = LLM(str(tmp_path / "m.gguf"), block_size=4, num_kv_blocks=64)
    converted = Path(llm.engine.model_path)
    index = json.loads((converted / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 2 and not list(converted.glob(".shard-*"))
    weights = {name: load_file(converted / file)[name] for name, file in index.items()}
    reader = GGUFReader(str(tmp_path / "m.gguf"))
    q = next(t for t in reader.tensors if t.name == "blk.0.attn_q.weight")
    assert q.tensor_type.name == dtype
    ours = weights["model.layers.0.self_attn.q_proj.weight"]
    assert ours.dtype == (torch.float16 if dtype == "Q8_0" else torch.bfloat16)
    assert weights["model.norm.weight"].dtype == torch.float32
    exact = torch.from_numpy(np.asarray(dequantize(q.data, q.tensor_type), dtype=np.float32))
    torch.testing.assert_close(ours.float(), exact, rtol=1e-3 if dtype == "Q8_0" else 0.0,
                               atol=1e-6 if dtype == "Q8_0" else 0.0)
    # The model of the dequantised weights, in transformers, is what the engine serves.
    import transformers

    reference = transformers.AutoModelForCausalLM.from_pretrained(llm.engine.model_path, dtype=torch.float32).eval()
    assert_logprobs_equal_transformers(llm, reference, random_prompts(2, [20]), max_tokens=3)


def test_the_conversion_is_cached_until_the_file_changes(tmp_path, files, cache) -> None:
    from engine.default_model import gguf_checkpoint

    path = tmp_path / "llama.gguf"
    path.write_bytes(Path(files["llama"][0]).read_bytes())
    first = gguf_checkpoint(str(path))
    stamp = Path(first, "model.safetensors").stat().st_mtime_ns
    assert gguf_checkpoint(str(path)) == first and Path(first, "model.safetensors").stat().st_mtime_ns == stamp
    assert Path(first).parent == cache / "models" and Path(first).name.startswith("llama-")
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))  # the file changed: converted again, in place
    assert gguf_checkpoint(str(path)) == first and Path(first, "model.safetensors").stat().st_mtime_ns != stamp


def test_a_conversion_removes_those_whose_file_is_gone(tmp_path, files, cache) -> None:
    """A GGUF file moved away leaves its conversion behind until the next conversion, which
    removes it; the conversions of files still there stay, and so does the embedded default's."""
    from engine.default_model import FORMAT_VERSION, MARKER_FILE, gguf_checkpoint

    default = cache / "models" / "Default-Q4_1"  # the embedded default's kind of marker: no path
    default.mkdir(parents=True, exist_ok=True)
    (default / MARKER_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION,
                                                   "source": {"name": "x.gguf", "size": 1}}))
    kept, moved = tmp_path / "kept.gguf", tmp_path / "moved.gguf"
    for path in (kept, moved):
        path.write_bytes(Path(files["llama"][0]).read_bytes())
    kept_dir, moved_dir = gguf_checkpoint(str(kept)), gguf_checkpoint(str(moved))
    assert Path(moved_dir).is_dir()
    moved.rename(tmp_path / "elsewhere.gguf")
    assert Path(moved_dir).is_dir()  # nothing converted since
    elsewhere_dir = gguf_checkpoint(str(tmp_path / "elsewhere.gguf"))
    assert not Path(moved_dir).exists() and not list(Path(moved_dir).parent.glob(f".{Path(moved_dir).name}.old-*"))
    assert Path(kept_dir, "model.safetensors").is_file() and Path(elsewhere_dir, "model.safetensors").is_file()
    assert (default / MARKER_FILE).is_file()


def small_gguf(path: Path, arch: str, values: dict[str, object], tokens: list[str] | None = None,
               tensors: tuple[tuple[str, tuple[int, int]], ...] = ()) -> Path:
    """A GGUF file of `arch` with these metadata values, an embedding and `tensors` (name,
    shape: zeros), for gguf_config and the refusals."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in values.items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, int(value))
    if tokens is not None:
        writer.add_token_list(tokens)
        writer.add_token_types([3 if t.startswith("<") else 1 for t in tokens])
    for name, shape in (("token_embd.weight", (8, 4)), *tensors):
        writer.add_tensor(name, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


SHAPE_KEYS = {"embedding_length": 4, "attention.head_count": 2, "block_count": 2, "feed_forward_length": 8}


@pytest.mark.parametrize("arch, values, expected", [
    # llama.cpp's Gemma 27B scales queries by hidden / heads; every other size by the head dim
    ("gemma3", {"block_count": 62, "attention.key_length": 256}, {"query_pre_attn_scalar": 2}),
    ("gemma3", {"block_count": 34, "attention.key_length": 256}, {"query_pre_attn_scalar": 256}),
    ("gemma2", {"block_count": 46}, {"query_pre_attn_scalar": 2}),
    # Gemma 2's keys default as llama.cpp's do; Gemma 3's local rope base is read
    ("gemma2", {}, {"sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    ("gemma3", {"rope.freq_base_swa": 1000.0}, {"rope_local_base_freq": 1000.0}),
    # the served length, and the norm eps each family defaults to
    ("llama", {"context_length": 4096}, {"max_position_embeddings": 4096, "rms_norm_eps": 1e-5}),
    ("gemma2", {}, {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6}),
    # a factor without a type, and the older key, are linear
    ("llama", {"rope.scaling.factor": 4.0}, {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    ("llama", {"rope.scale_linear": 2.0}, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    ("qwen3", {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 64,
               "rope.scaling.yarn_beta_fast": 8.0, "rope.scaling.yarn_beta_slow": 2.0},
     {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 8.0,
                       "beta_slow": 2.0}}),
])
def test_metadata_reads_as_llama_cpp_reads_it(tmp_path, arch: str, values: dict, expected: dict) -> None:
    from gguf import GGUFReader

    from engine.gguf import gguf_config

    prefixed = {f"{arch}.{key}": value for key, value in (SHAPE_KEYS | values).items()}
    config = gguf_config(GGUFReader(str(small_gguf(tmp_path / "m.gguf", arch, prefixed))))
    assert {key: config[key] for key in expected} == expected


def test_a_chat_stops_where_llama_cpp_stops_it(tmp_path) -> None:
    """The EOS, the end-of-turn id, and the tokens llama.cpp ends a generation at by their text."""
    from gguf import GGUFReader

    from engine.gguf import gguf_config

    tokens = ["<unk>", "<bos>", "<eos>", "a", "<end_of_turn>", "<|eot_id|>", "b", "<|im_end|>"]
    values = {f"llama.{key}": value for key, value in SHAPE_KEYS.items()} | {
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.eot_token_id": 5, "tokenizer.ggml.padding_token_id": 0}
    config = gguf_config(GGUFReader(str(small_gguf(tmp_path / "m.gguf", "llama", values, tokens))))
    assert config["eos_token_id"] == [2, 5, 4, 7] and config["pad_token_id"] == 0


@pytest.mark.parametrize("values, message", [
    ({"split.count": 2}, "one part of a split model"),
    ({"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 2.0, "llama.rope.scaling.yarn_ext_factor": 0.5},
     "extrapolation factor"),
    ({"llama.rope.scaling.type": "yarn"}, "no positive factor"),
])
def test_what_would_be_misread_is_refused(tmp_path, values: dict, message: str) -> None:
    from gguf import GGUFReader

    from engine.gguf import gguf_config

    prefixed = {f"llama.{key}": value for key, value in SHAPE_KEYS.items()} | values
    with pytest.raises(ValueError, match=message):
        gguf_config(GGUFReader(str(small_gguf(tmp_path / "m.gguf", "llama", prefixed))))


def test_a_file_whose_tensors_do_not_fit_is_refused_before_its_weights_are_read(tmp_path, files) -> None:
    # Mixtral's files say "llama" and carry a router
    path = small_gguf(tmp_path / "mixtral.gguf", "llama", {f"llama.{key}": value for key, value in SHAPE_KEYS.items()},
                      tensors=(("blk.0.ffn_gate_inp.weight", (2, 4)),))
    with pytest.raises(ValueError, match="'blk.0.ffn_gate_inp.weight' is not one a llama model has"):
        LLM(str(path))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match="does not read as a GGUF file"):
        LLM(str(truncated))


def test_what_is_not_converted_is_refused_before_anything_loads(tmp_path, files) -> None:
    path = small_gguf(tmp_path / "phi.gguf", "phi3", {"phi3.block_count": 1})
    with pytest.raises(ValueError, match="'phi3' is not supported.*llama, qwen2, qwen3, gemma2, gemma3"):
        LLM(str(path))
    models = Path(os.environ["STOKE_CACHE_DIR"]) / "models"
    assert not any(p.name.startswith("phi-") and not p.name.endswith(".lock") for p in models.iterdir())


def test_stoke_serve_serves_a_gguf_file_under_its_name(files) -> None:
    from transformers import AutoTokenizer

    from engine.default_model import gguf_checkpoint
    from tests.server_harness import ServerProcess

    path, model = files["qwen2"]
    with ServerProcess(path, "--num-kv-blocks", "64", "--cpu-threads", "1") as server:
        client = server.client()
        assert [m.id for m in client.models.list().data] == ["qwen2.gguf"]
        prompt = random_prompts(3, [12])[0]  # ids below 500: in the file's vocabulary
        out = client.completions.create(model="qwen2.gguf", prompt=prompt, max_tokens=4, temperature=0,
                                        extra_body={"ignore_eos": True})
        with torch.no_grad():
            expected = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False, eos_token_id=None,
                                      pad_token_id=0)[0, len(prompt):].tolist()
        assert out.choices[0].text == AutoTokenizer.from_pretrained(gguf_checkpoint(path)).decode(expected)


def test_stoke_serve_refuses_a_gguf_file_it_cannot_convert(tmp_path, cache) -> None:
    import subprocess
    import sys

    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF not really")
    result = subprocess.run([sys.executable, "-m", "server", str(path)], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 2 and "cannot serve" in result.stderr and "broken.gguf" in result.stderr
