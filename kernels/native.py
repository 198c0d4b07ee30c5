"""Build and load the C kernels in kernels/csrc/ with the machine's C compiler, once.

The library (every `csrc/*.c` in one shared object) is plain C with no Python or torch
headers, compiled for this CPU (`-march=native`) in about a second and cached under
`<stoke cache>/kernels/<key>/`, where the key covers the sources, the compiler and flags, and
the CPU's feature flags — so a cache dir shared between machines never hands one of them code
for another CPU. Written to a temporary name and renamed, so concurrent first builds (several
test workers, a server and a benchmark) never see half a file.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from functools import cache
from pathlib import Path

SOURCE_DIR = Path(__file__).parent / "csrc"
LIBRARY = "libstoke_kernels.so"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu11"]


def cache_dir() -> Path:
    """Root of stoke's cache: ``$STOKE_CACHE_DIR``, else ``$XDG_CACHE_HOME/stoke``, else
    ``~/.cache/stoke``."""
    explicit = os.environ.get("STOKE_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "stoke"
    return Path.home() / ".cache" / "stoke"


class NativeBuildError(RuntimeError):
    """The C kernels could not be compiled or loaded here (no compiler, an unsupported
    platform); callers fall back to the torch reference."""


def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    raise NativeBuildError("no C compiler found (set CC, or install gcc)")


def _cpu_features() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@cache
def load() -> ctypes.CDLL:
    """The compiled csrc/ library, built on first use; NativeBuildError if it can't be."""
    if os.name != "posix":
        raise NativeBuildError(f"C kernels are built on POSIX systems only, not {os.name}")
    sources = sorted(SOURCE_DIR.glob("*.c"))
    compiler = _compiler()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise NativeBuildError(f"C compiler {compiler!r} does not run: {e}") from e
    texts = [f"{p.name}\n{p.read_text()}" for p in sorted(SOURCE_DIR.iterdir()) if p.suffix in (".c", ".h")]
    key = hashlib.sha256("\0".join([*texts, compiler, version, " ".join(FLAGS), _cpu_features()]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / key / LIBRARY
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            cmd = [compiler, *FLAGS, f"-I{SOURCE_DIR}", *map(str, sources), "-o", tmp, "-lm"]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if result.returncode != 0:
                raise NativeBuildError(f"compiling {SOURCE_DIR} failed:\n{result.stderr[-2000:]}")
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    try:
        return ctypes.CDLL(str(target))
    except OSError as e:
        raise NativeBuildError(f"loading {target} failed: {e}") from e
