"""Per-GPU values for the Triton kernels' free parameters, measured on that GPU by
benchmarks/kernel_configs.py (`--write-tuning`) rather than guessed.

A tuning is a small JSON file:

    {"device": "NVIDIA H200", "prefill_tile": [64, 64, 4, 2], "pack_gqa": true, "prefill_new_kv": "cache",
     "min_split_keys": 64}

- `prefill_tile`: (BLOCK_M, BLOCK_N, num_warps, num_stages) of the prefill kernel for 16-bit
  inputs with head_dim <= 128, the shapes the sweep measures (keyed by the tile's width, the
  head dim rounded up to a power of two: Phi-3-mini's 96 takes it too);
- `pack_gqa`: whether prefill packs a kv head's query heads into one tile (power-of-two groups);
- `prefill_new_kv`: where prefill reads the new tokens' K/V: `cache` (through the block table,
  as the prefix), `rows` (the step's own K/V rows) or `tma` (those through tensor descriptors,
  whose boxes are powers of two: a head dim that is not one reads the same rows by pointers);
- `min_split_keys`: the shortest split-K chunk the decode heuristic makes.

Any key may be missing or null: the built-in choice stands. The file is `$STOKE_KERNEL_TUNING`
when set (it must exist), else `kernels/tuning/<device name>.json` when this GPU was tuned,
else there is none.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, fields
from typing import Any

ENV_VAR = "STOKE_KERNEL_TUNING"
NEW_KV_SOURCES = ("cache", "rows", "tma")  # kernels.triton_ops's sources of the new tokens' K/V
TUNING_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuning")


@dataclass(frozen=True, slots=True)
class KernelTuning:
    prefill_tile: tuple[int, int, int, int] | None = None
    pack_gqa: bool | None = None
    prefill_new_kv: str | None = None
    min_split_keys: int | None = None
    source: str | None = None  # the file it came from; None: built-in choices only

    def as_json(self) -> dict[str, Any]:
        """Its values as the file holds them (without `source`)."""
        return {"prefill_tile": self.prefill_tile and list(self.prefill_tile), "pack_gqa": self.pack_gqa,
                "prefill_new_kv": self.prefill_new_kv, "min_split_keys": self.min_split_keys}


def tuning_path(device_name: str) -> str:
    """Where a GPU's shipped tuning lives: its name with every run of other characters than
    letters and digits made one underscore (`NVIDIA_H100_80GB_HBM3.json`)."""
    return os.path.join(TUNING_DIR, re.sub(r"[^A-Za-z0-9]+", "_", device_name).strip("_") + ".json")


def load_tuning(device_name: str) -> KernelTuning:
    chosen = os.environ.get(ENV_VAR)
    path = chosen or tuning_path(device_name)
    if not os.path.exists(path):
        if chosen:
            raise FileNotFoundError(f"{ENV_VAR}={path}: no such file")
        return KernelTuning()
    with open(path) as f:
        return parse_tuning(json.load(f), path)


def parse_tuning(data: Any, source: str) -> KernelTuning:
    """A tuning from its JSON object; a wrong key or value is an error naming the file."""
    def bad(what: str) -> ValueError:
        return ValueError(f"kernel tuning {source}: {what}")

    if not isinstance(data, dict):
        raise bad("expected a JSON object")
    unknown = set(data) - {f.name for f in fields(KernelTuning) if f.name != "source"} - {"device", "measured"}
    if unknown:
        raise bad(f"unknown keys {sorted(unknown)}")
    tile = data.get("prefill_tile")
    if tile is not None:
        if (not isinstance(tile, list) or len(tile) != 4 or not all(type(x) is int and x > 0 for x in tile)
                or any(x & (x - 1) for x in tile[:3]) or min(tile[:2]) < 16):
            raise bad(f"prefill_tile must be [BLOCK_M, BLOCK_N, num_warps, num_stages], tiles and warps powers "
                      f"of two, tiles >= 16; got {tile!r}")
        tile = tuple(tile)
    pack = data.get("pack_gqa")
    if pack is not None and not isinstance(pack, bool):
        raise bad(f"pack_gqa must be true, false or null; got {pack!r}")
    new_kv = data.get("prefill_new_kv")
    if new_kv is not None and new_kv not in NEW_KV_SOURCES:
        raise bad(f"prefill_new_kv must be one of {list(NEW_KV_SOURCES)} or null; got {new_kv!r}")
    keys = data.get("min_split_keys")
    if keys is not None and (type(keys) is not int or keys < 1):
        raise bad(f"min_split_keys must be a positive integer; got {keys!r}")
    return KernelTuning(prefill_tile=tile, pack_gqa=pack, prefill_new_kv=new_kv, min_split_keys=keys, source=source)


def write_tuning(tuning: KernelTuning, device_name: str, path: str, measured: dict[str, Any] | None = None) -> None:
    data = {"device": device_name, **tuning.as_json()}
    if measured:
        data["measured"] = measured  # what the choice rests on, for the reader
    parse_tuning(data, path)  # never write what would not load
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
