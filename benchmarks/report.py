"""What every benchmark does last: write its report as JSON where it was asked to."""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any


def write_json(report: Any, path: str) -> None:
    """Write `report` to `path` (indented JSON), creating the folder."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)


def alternated(cases: Sequence[str], rounds: int, run: Callable[[str], dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Each case's runs, `rounds` of them, the cases alternated within a round: drift on a
    shared machine touches every case alike."""
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in cases}
    for _ in range(rounds):
        for case in cases:
            runs[case].append(run(case))
    return runs


def median_results(runs: dict[str, list[dict[str, Any]]], baseline: str, ratio_key: str, digits: int,
                   without: str) -> list[dict[str, Any]]:
    """Per case of `alternated`'s runs: its median seconds and tok/s (rounded to `digits`), its
    runs less their `without` key (what the caller compares across cases, too big to report),
    and its tok/s over `baseline`'s as `ratio_key`."""
    results = [{"case": case,
                "seconds": round(statistics.median(r["seconds"] for r in rs), 4),
                "tok_s": round(statistics.median(r["tok_s"] for r in rs), digits),
                "runs": [{k: v for k, v in r.items() if k != without} for r in rs]}
               for case, rs in runs.items()]
    base = next(r["tok_s"] for r in results if r["case"] == baseline)
    for r in results:
        r[ratio_key] = round(r["tok_s"] / base, 3)
    return results


def pooling_results(runs: dict[str, list[dict[str, Any]]], values: str,
                    distance: Callable[[Any, Any], float]) -> list[dict[str, Any]]:
    """`median_results` of a prompt-only benchmark (embeddings, scores) against transformers'
    batches, with each case's prompt tokens computed and the largest `distance` of its `values`
    from those of transformers one prompt at a time (first runs alike)."""
    reference = runs["transformers, one at a time"][0][values]
    results = median_results(runs, "transformers, batches", "vs_transformers", 1, without=values)
    for r in results:
        first = runs[r["case"]][0]
        r["computed_tokens"] = first["computed_tokens"]
        r["max_abs_diff"] = float(distance(first[values], reference))
    return results


def describe_prefill_candidate(candidate: dict[str, Any]) -> str:
    """A prefill sweep candidate (benchmarks/kernel_configs.py) in a few words."""
    new_kv = candidate.get("new_kv", "cache")
    return (f"{tuple(candidate['tile'])}{'' if candidate['packed'] else ' unpacked'}"
            f"{' cache tma' if candidate.get('cache_tma') else ''}{'' if new_kv == 'cache' else f' new kv {new_kv}'}")
