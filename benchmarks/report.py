"""What every benchmark does last: write its report as JSON where it was asked to."""

from __future__ import annotations

import json
import os
from typing import Any


def write_json(report: Any, path: str) -> None:
    """Write `report` to `path` (indented JSON), creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def describe_prefill_candidate(candidate: dict[str, Any]) -> str:
    """A prefill sweep candidate (benchmarks/kernel_configs.py) in a few words."""
    new_kv = candidate.get("new_kv", "cache")
    return (f"{tuple(candidate['tile'])}{'' if candidate['packed'] else ' unpacked'}"
            f"{' cache tma' if candidate.get('cache_tma') else ''}{'' if new_kv == 'cache' else f' new kv {new_kv}'}")
