"""Run pytest-style test functions where pytest is not installed (a bare GPU box).

Just enough of pytest for our kernel tests: `pytest.fixture` (with dependencies between
fixtures, `tmp_path_factory`/`tmp_path`, conftest.py fixtures), `pytest.mark.parametrize`
(stacked, on functions and methods), `pytest.mark.skipif`, other marks for selection (`-m gpu`),
`pytest.raises`, `pytest.approx`, `pytest.MonkeyPatch`. A stand-in `pytest` module is
installed in sys.modules before the test modules are imported.

    python -m benchmarks.mini_pytest tests/test_kernels_triton.py -m gpu --json out.json
    python -m benchmarks.mini_pytest tests/test_kernels_triton.py -k store_kv_matches
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import itertools
import json
import math
import os
import sys
import tempfile
import time
import traceback
import types
from collections.abc import Callable
from typing import Any


class Skipped(Exception):
    pass


class _Mark:
    def __init__(self, name: str, args: tuple = (), kwargs: dict | None = None) -> None:
        self.name, self.args, self.kwargs = name, args, kwargs or {}


def _apply(mark: _Mark, obj: Any) -> Any:
    marks = list(getattr(obj, "_mini_marks", []))
    marks.append(mark)
    obj._mini_marks = marks
    return obj


class _MarkFactory:
    def __getattr__(self, name: str) -> _Mark:
        return _MarkDecorator(name)


class _MarkDecorator:
    """`pytest.mark.NAME`: a decorator itself (`@mark.gpu`), or configured first
    (`@mark.skipif(cond, reason=...)`, `@mark.parametrize(names, values)`)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and not kwargs and (inspect.isfunction(args[0]) or inspect.isclass(args[0])):
            return _apply(_Mark(self.name), args[0])
        configured = _Mark(self.name, args, kwargs)

        def decorate(obj: Any) -> Any:
            return _apply(configured, obj)
        decorate.mark = configured
        return decorate


class _Param:
    """`pytest.param(*values, marks=...)`: one parametrize case with its own marks."""

    def __init__(self, *values: Any, marks: Any = (), id: str | None = None) -> None:  # noqa: A002
        self.values = values
        self.marks = list(marks) if isinstance(marks, (list, tuple)) else [marks]


FIXTURES: dict[str, Callable] = {}


def fixture(fn: Callable | None = None, *, scope: str = "function", **_: Any):
    def register(f: Callable) -> Callable:
        f._mini_fixture_scope = scope
        FIXTURES[f.__name__] = f
        return f
    return register(fn) if fn is not None else register


class _Raises:
    def __init__(self, exc: type[BaseException], match: str | None = None) -> None:
        self.exc, self.match = exc, match

    def __enter__(self) -> _Raises:
        return self

    def __exit__(self, typ, value, tb) -> bool:
        import re

        if typ is None:
            raise AssertionError(f"DID NOT RAISE {self.exc.__name__}")
        if not issubclass(typ, self.exc):
            return False
        if self.match and not re.search(self.match, str(value)):
            raise AssertionError(f"{value!r} does not match {self.match!r}")
        return True


class _Approx:
    def __init__(self, expected: Any, rel: float | None = None, abs: float | None = None) -> None:  # noqa: A002
        self.expected, self.rel, self.abs = expected, 1e-6 if rel is None else rel, 1e-12 if abs is None else abs

    def _close(self, a: float, b: float) -> bool:
        return math.isclose(a, b, rel_tol=self.rel, abs_tol=self.abs)

    def __eq__(self, other: Any) -> bool:
        e = self.expected
        if isinstance(e, dict):
            return e.keys() == other.keys() and all(self._close(other[k], e[k]) for k in e)
        if isinstance(e, (list, tuple)):
            return len(e) == len(other) and all(self._close(a, b) for a, b in zip(other, e))
        return self._close(other, e)


class MonkeyPatch:
    def __init__(self) -> None:
        self._undo: list[Callable[[], None]] = []

    def setattr(self, target: Any, name: str, value: Any, raising: bool = True) -> None:
        old = getattr(target, name)
        self._undo.append(lambda: setattr(target, name, old))
        setattr(target, name, value)

    def setenv(self, name: str, value: str) -> None:
        old = os.environ.get(name)
        self._undo.append(lambda: os.environ.__setitem__(name, old) if old is not None else os.environ.pop(name, None))
        os.environ[name] = str(value)

    def delenv(self, name: str, raising: bool = True) -> None:
        old = os.environ.get(name)
        if old is None and raising:
            raise KeyError(name)
        self._undo.append(lambda: os.environ.__setitem__(name, old) if old is not None else None)
        os.environ.pop(name, None)

    def undo(self) -> None:
        while self._undo:
            self._undo.pop()()


class _TmpPathFactory:
    def __init__(self) -> None:
        self.root = tempfile.mkdtemp(prefix="mini_pytest_")

    def mktemp(self, name: str):
        import pathlib

        return pathlib.Path(tempfile.mkdtemp(prefix=f"{name}_", dir=self.root))


def _skip(reason: str = "") -> None:
    raise Skipped(reason)


def install() -> types.ModuleType:
    """A stand-in `pytest` module in sys.modules (only where the real one is absent)."""
    mod = types.ModuleType("pytest")
    mod.fixture = fixture
    mod.mark = _MarkFactory()
    mod.raises = _Raises
    mod.approx = _Approx
    mod.MonkeyPatch = MonkeyPatch
    mod.TempPathFactory = _TmpPathFactory
    mod.skip = _skip
    mod.param = _Param
    mod.__mini__ = True
    sys.modules["pytest"] = mod
    return mod


# ----------------------------------------------------------------------------- collection
def _marks(obj: Any) -> list[_Mark]:
    return list(getattr(obj, "_mini_marks", []))


def _cases(fn: Callable, owner: type | None) -> list[tuple[str, dict[str, Any], list[_Mark]]]:
    """(id, parametrized arguments, marks) for every case of a test function."""
    marks = _marks(owner) + _marks(fn) if owner else _marks(fn)
    grids = []
    for m in marks:
        if m.name != "parametrize":
            continue
        names = [n.strip() for n in m.args[0].split(",")] if isinstance(m.args[0], str) else list(m.args[0])
        grid = []
        for v in m.args[1]:
            extra = []
            if isinstance(v, _Param):
                extra = [getattr(mk, "mark", mk) for mk in v.marks]
                v = v.values if len(names) > 1 else v.values[0]
            grid.append((dict(zip(names, v if len(names) > 1 else (v,))), extra))
        grids.append(grid)
    cases = []
    for combo in itertools.product(*grids) if grids else [()]:
        params: dict[str, Any] = {}
        case_marks = list(marks)
        for part, extra in combo:
            params.update(part)
            case_marks += extra
        ident = "-".join(str(v) for v in params.values())
        cases.append((ident, params, case_marks))
    return cases


def collect(module: types.ModuleType) -> list[tuple[str, Callable, type | None, dict[str, Any], list[_Mark]]]:
    items = []
    for name, obj in vars(module).items():
        if name.startswith("test_") and inspect.isfunction(obj):
            for ident, params, marks in _cases(obj, None):
                items.append((f"{module.__name__}::{name}[{ident}]", obj, None, params, marks))
        elif name.startswith("Test") and inspect.isclass(obj):
            for mname, meth in vars(obj).items():
                if mname.startswith("test_") and inspect.isfunction(meth):
                    for ident, params, marks in _cases(meth, obj):
                        items.append((f"{module.__name__}::{name}::{mname}[{ident}]", meth, obj, params, marks))
    return items


class _Fixtures:
    def __init__(self) -> None:
        self.cache: dict[str, Any] = {"tmp_path_factory": _TmpPathFactory()}

    def get(self, name: str, function_scope: dict[str, Any]) -> Any:
        if name in function_scope:
            return function_scope[name]
        if name in self.cache:
            return self.cache[name]
        if name == "tmp_path":
            value = self.cache["tmp_path_factory"].mktemp("tmp")
        elif name == "monkeypatch":
            value = MonkeyPatch()
        elif name in FIXTURES:
            fn = FIXTURES[name]
            args = {p: self.get(p, function_scope) for p in inspect.signature(fn).parameters}
            value = fn(**args)
            if fn._mini_fixture_scope == "function":
                function_scope[name] = value
                return value
        else:
            raise LookupError(f"fixture {name!r} not found")
        if name in ("tmp_path", "monkeypatch"):
            function_scope[name] = value
        else:
            self.cache[name] = value
        return value


def run(paths: list[str], marker: str | None = None, keyword: str | None = None) -> dict[str, Any]:
    """Import the test modules (conftest.py first), run the selected cases; a summary dict."""
    if "pytest" not in sys.modules or not getattr(sys.modules["pytest"], "__mini__", False):
        install()
    modules = []
    for path in paths:
        path = path.split("::")[0]
        conftest = os.path.join(os.path.dirname(path), "conftest.py")
        if os.path.exists(conftest):
            importlib.import_module(conftest.removesuffix(".py").replace(os.sep, "."))
        modules.append(importlib.import_module(path.removesuffix(".py").replace(os.sep, ".")))
    fixtures = _Fixtures()
    results = {"passed": 0, "failed": 0, "skipped": 0, "deselected": 0, "failures": [], "seconds": 0.0}
    t0 = time.perf_counter()
    for module in modules:
        for ident, fn, owner, params, marks in collect(module):
            if (marker and not any(m.name == marker for m in marks)) or (keyword and keyword not in ident):
                results["deselected"] += 1
                continue
            skip = next((m for m in marks if m.name == "skipif" and m.args and m.args[0]), None)
            if skip is not None:
                results["skipped"] += 1
                continue
            scope: dict[str, Any] = dict(params)
            try:
                names = [p for p in inspect.signature(fn).parameters if p != "self"]
                args = {n: fixtures.get(n, scope) for n in names}
                fn(owner(), **args) if owner else fn(**args)
                results["passed"] += 1
            except Skipped:
                results["skipped"] += 1
            except Exception:  # noqa: BLE001 - a failing test is a result, not a crash
                results["failed"] += 1
                results["failures"].append({"test": ident, "error": traceback.format_exc(limit=3)[-2000:]})
            finally:
                mp = scope.get("monkeypatch")
                if isinstance(mp, MonkeyPatch):
                    mp.undo()
            print(f"{ident}: {'FAILED' if results['failures'] and results['failures'][-1]['test'] == ident else 'ok'}",
                  flush=True)
    results["seconds"] = time.perf_counter() - t0
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+")
    p.add_argument("-m", dest="marker", default=None, help="only tests with this mark")
    p.add_argument("-k", dest="keyword", default=None, help="only tests whose id contains this")
    p.add_argument("--json", default=None, help="write the summary here")
    args = p.parse_args(argv)
    results = run(args.paths, args.marker, args.keyword)
    print(f"{results['passed']} passed, {results['failed']} failed, {results['skipped']} skipped, "
          f"{results['deselected']} deselected in {results['seconds']:.1f}s")
    for failure in results["failures"]:
        print(f"FAILED {failure['test']}\n{failure['error']}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 1 if results["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
