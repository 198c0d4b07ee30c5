"""Every Triton kernel compiled for real GPU targets (Hopper, and Ada's 99 KiB of shared memory
per block) on this machine without a GPU: kernels/compile_check.py runs Triton's NVIDIA
pipeline down to a cubin through the real launch wrappers, with the tiles a CUDA run picks,
and ptxas reports each kernel's registers and spills. With the venv's Triton, and with the
oldest supported release and the GPU machines' one.

A subprocess: the check needs the compiled (not interpreted) kernels, and other test modules
set TRITON_INTERPRET before importing them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLDER_TRITONS = ["3.4.0", "3.6.0"]  # `make test` installs them (the Makefile's OLDER_TRITONS)
# The oldest's cases: every kernel (llama-3-8b bf16), a padded head dim's masks in fp32, and
# the attention kernels over an fp8 KV cache (kernels/compile_check.py's names).
OLDEST_TRITONS_CASES = ["llama-3-8b bf16", "d96 fp32", "llama-3-8b bf16 fp8-kv"]


def test_every_kernel_compiles_for_hopper_and_ada_within_shared_memory_without_spills(tmp_path) -> None:
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--quick", "--targets", "sm90", "sm89",
                           "--resources", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows and all(r["ok"] and r["error"] is None and r["shared"] <= r["shared_limit"] for r in rows)
    for target in ("sm90", "sm89"):
        seen = {(r["kernel"], r["variant"].split(" TILE")[0]) for r in rows if r["target"] == target}
        kernels = {k for k, _ in seen}
        assert kernels >= {"_store_kv_kernel", "_decode_kernel", "_decode_reduce_kernel", "_decode_graphed_kernel",
                           "_prefill_kernel", "_rms_norm_kernel", "_rotary_kernel", "_moe_gemm_kernel",
                           "_fp8_linear_kernel"}, kernels
        moe = {(v.split()[0], v.split()[-1]) for k, v in seen if k == "_moe_gemm_kernel"}
        assert moe == {(f"BLOCK_M={m}", f"GATED={g}") for m in (16, 32, 64) for g in (0, 1)}, moe  # both passes
        assert _fp8_moe(rows, target) == FP8_MOE, _fp8_moe(rows, target)
        variants = {v for k, v in seen if k in ("_decode_kernel", "_prefill_kernel")}
        assert any("SPLIT=0" in v for v in variants) and any("SPLIT=1" in v for v in variants)
        assert any("HEADS=4" in v for v in variants) and any("HEADS=1" in v for v in variants)
        assert _windowed(rows, target) == WINDOWED, _windowed(rows, target)  # Gemma 2's window and cap
        rotary = [r for r in rows if r["target"] == target and r["kernel"] == "_rotary_kernel"]
        assert len(rotary) >= 2, rotary  # whole heads and partial rotary (a table of 3/8 head_dim columns)
        assert _padded(rows, target) == PADDED, _padded(rows, target)
        assert _fp8_kv(rows, target) == FP8_KV, _fp8_kv(rows, target)
    # No kernel the engine launches by default spills registers to local memory in its inner
    # loops (16-bit and fp32 cases). The experiments run only where a GPU's tuning says, after
    # the sweep timed them, spills and all: tensor-descriptor loads, and the new tokens' K/V
    # read from their rows (28 bytes spilled at Ada's 128 x 32 tile; none on Hopper).
    spilled = [(r["target"], r["case"], r["kernel"], r["variant"]) for r in rows
               if r["resources"].get("spill_stores", 0) + r["resources"].get("spill_loads", 0)
               and not _experiment(r["variant"])]
    assert not spilled, spilled
    sm90 = [r for r in rows if r["target"] == "sm90"]
    assert any("CACHE_TMA=1" in r["variant"] for r in sm90) and any("FRESH_TMA=1" in r["variant"] for r in sm90)
    assert not [r["variant"] for r in sm90 if "FRESH=1 FRESH_TMA=0" in r["variant"] and "bf16" in r["case"]
                and r["resources"].get("spill_stores", 0)]
    assert all(r["resources"].get("registers") for r in rows)
    # 16-bit prefill at head dim 128: the tile the H200 sweep chose on Hopper; before Hopper the
    # one that does not spill there (Hopper's needs 255 registers and spills on sm_80/sm_89).
    prefill = {r["target"]: r for r in rows if r["case"] == "llama-3-8b bf16" and r["kernel"] == "_prefill_kernel"}
    assert "BLOCK_M=64 BLOCK_N=64" in prefill["sm90"]["variant"] and prefill["sm90"]["num_warps"] == 4
    assert "BLOCK_M=128 BLOCK_N=32" in prefill["sm89"]["variant"] and prefill["sm89"]["num_warps"] == 8


# fp8 experts: both passes (GATED) at every row-block size with one scale per column (groups of
# 128, and of 48 under a 16-column step), and with a scale per element (groups that split the
# steps) on the fallback's blocks of at most 32 rows.
FP8_MOE = ({(m, g, "1") for m in ("16", "32", "64") for g in ("0", "1")}
           | {(m, g, "0") for m in ("16", "32") for g in ("0", "1")})


def _fp8_moe(rows: list[dict], target: str) -> set[tuple[str, str, str]]:
    """(BLOCK_M, GATED, TILE_IN_GROUP) of the MoE kernel's fp8 launches for `target`."""
    variants = [dict(kv.split("=") for kv in r["variant"].split()) for r in rows
                if r["target"] == target and r["kernel"] == "_moe_gemm_kernel"]
    return {(v["BLOCK_M"], v["GATED"], v["TILE_IN_GROUP"]) for v in variants if v.get("FP8") == "1"}


# An fp8 KV cache: every attention kernel that reads or writes the cache, windowed and capped
# too (the reduction kernel reads only the partials); bf16, fp16 and fp32 queries.
FP8_KV = ({(k, dtype) for k in ("_store_kv_kernel", "_decode_kernel", "_decode_graphed_kernel", "_prefill_kernel")
           for dtype in ("bf16", "fp16", "fp32")}
          | {(k, "windowed") for k in ("_decode_kernel", "_decode_graphed_kernel", "_prefill_kernel")})


def _fp8_kv(rows: list[dict], target: str) -> set[tuple[str, str]]:
    """The kernels compiled over an fp8 KV cache for `target`, with their queries' dtype (and
    "windowed" for those with a window and a cap)."""
    fp8 = [r for r in rows if r["target"] == target and "FP8_KV=1" in r["variant"]]
    assert all(r["case"].endswith(" fp8-kv") for r in fp8)
    return ({(r["kernel"], r["case"].split()[1]) for r in fp8}
            | {(r["kernel"], "windowed") for r in fp8 if "WINDOW=4096 SOFTCAP=50.0" in r["variant"]})


def _experiment(variant: str) -> bool:
    return "TMA=1" in variant or "FRESH=1" in variant


WINDOWED = {"_decode_kernel", "_decode_graphed_kernel", "_prefill_kernel"}
# Head dim 96 (Phi-3-mini's), tiled as 128 with the rest masked: every attention kernel, both
# prefill tilings, 16-bit and fp32, windowed too; its spills are checked with the rest.
PADDED = {("_store_kv_kernel", "bf16"), ("_decode_kernel", "bf16"), ("_decode_reduce_kernel", "bf16"),
          ("_decode_graphed_kernel", "bf16"), ("_prefill_kernel", "bf16"), ("_store_kv_kernel", "fp32"),
          ("_decode_kernel", "fp32"), ("_decode_reduce_kernel", "fp32"), ("_decode_graphed_kernel", "fp32"),
          ("_prefill_kernel", "fp32")}


def _padded(rows: list[dict], target: str) -> set[tuple[str, str]]:
    """The attention kernels compiled at head dim 96, with their dtype, where the prefill kernel
    took both tilings (HEADS=4 and 1) and a window and softcap."""
    d96 = [r for r in rows if r["target"] == target and r["case"].startswith("d96 ")]
    heads = {v for r in d96 if r["kernel"] == "_prefill_kernel" for v in r["variant"].split() if v.startswith("HEADS")}
    windowed = {r["kernel"] for r in d96 if "WINDOW=4096" in r["variant"]}
    assert heads == {"HEADS=4", "HEADS=1"} and windowed == WINDOWED, (heads, windowed)
    return {(r["kernel"], r["case"].split()[1]) for r in d96}


def _windowed(rows: list[dict], target: str) -> set[str]:
    """The kernels compiled with a sliding window and a softcap (their spills are checked with the rest)."""
    return {r["kernel"] for r in rows if r["target"] == target and "WINDOW=4096 SOFTCAP=50.0" in r["variant"]}



@pytest.mark.parametrize("version", OLDER_TRITONS)
def test_every_kernel_compiles_with_older_triton_releases(version: str, tmp_path) -> None:
    """The same kernels with Triton 3.4 (the oldest the kernels support) and 3.6 (the GPU
    machines' release), installed beside the venv by `make test`, for Hopper. 3.6 compiles
    every quick case and is held to no spills, as above; 3.4 only has to compile every kernel
    (an API it lacks fails any case), so it takes one case of each kind (CI's time: a cold
    compile of the quick cases took 160 s on a 2-core CPU)."""
    side = os.path.join(sys.prefix, f"triton-{version}")
    assert os.path.isdir(side), f"{side} is missing: `make test` puts it there"
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": f"{side}{os.pathsep}{ROOT}"}
    oldest = version == OLDER_TRITONS[0]
    options = ["--cases", *OLDEST_TRITONS_CASES] if oldest else ["--resources"]
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--quick", "--targets", "sm90", *options,
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"compiled with Triton {version} for sm90" in proc.stdout
    rows = json.loads(out.read_text())
    assert {r["kernel"] for r in rows} >= {"_store_kv_kernel", "_decode_kernel", "_decode_reduce_kernel",
                                           "_decode_graphed_kernel", "_prefill_kernel", "_rms_norm_kernel",
                                           "_rotary_kernel", "_moe_gemm_kernel", "_fp8_linear_kernel"}
    assert _fp8_moe(rows, "sm90") == FP8_MOE, _fp8_moe(rows, "sm90")
    assert all(r["ok"] for r in rows) and _windowed(rows, "sm90") == WINDOWED
    if oldest:
        assert {r["case"] for r in rows} == set(OLDEST_TRITONS_CASES)
        assert {k for k, _ in _fp8_kv(rows, "sm90")} == {k for k, _ in FP8_KV}
        return
    assert _padded(rows, "sm90") == PADDED and _fp8_kv(rows, "sm90") == FP8_KV, _fp8_kv(rows, "sm90")
    assert not [(r["case"], r["kernel"], r["variant"]) for r in rows
                if r["resources"].get("spill_stores", 0) + r["resources"].get("spill_loads", 0)
                and not _experiment(r["variant"])]


def test_fp8_kv_cache_kernels_compile_for_ampere(tmp_path) -> None:
    """The attention kernels over an fp8 KV cache for an A100 (sm_80: Triton has no e4m3 there,
    so they move the bits themselves) with the venv's Triton: within shared memory, no spills.
    Hopper and Ada's native conversions: the tests above."""
    out = tmp_path / "compile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--quick", "--fp8-kv-only", "--targets",
                           "sm80", "--resources", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert all(r["ok"] for r in rows) and {r["target"] for r in rows} == {"sm80"}
    assert _fp8_kv(rows, "sm80") == FP8_KV, _fp8_kv(rows, "sm80")
    assert not [(r["case"], r["kernel"], r["variant"]) for r in rows
                if r["resources"].get("spill_stores", 0) + r["resources"].get("spill_loads", 0)]


def test_the_sweeps_largest_prefill_tile_compiles_with_the_gpu_machines_triton(tmp_path) -> None:
    """A tuning the H200 sweep may write (benchmarks/kernel_configs.py's largest tile, new K/V
    by TMA) compiled as `kernels_tuned` would launch it, with Triton 3.6: every kernel within
    Hopper's shared memory (3 stages of 128 x 128 K/V tiles: 224 KiB of 227), and the cache
    source, the default, without spills. Not with a window or a softcap: this tile takes 254 of
    255 registers without them, and with either 3.6 spilled 8-24 bytes (3.9 none), so a sweep
    for such a model times that."""
    side = os.path.join(sys.prefix, "triton-3.6.0")
    assert os.path.isdir(side), f"{side} is missing: `make test` puts it there"
    tuning, out = tmp_path / "tuning.json", tmp_path / "compile.json"
    tuning.write_text(json.dumps({"device": "NVIDIA H200", "prefill_tile": [128, 128, 8, 3],
                                  "prefill_new_kv": "tma"}))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | {"PYTHONPATH": f"{side}{os.pathsep}{ROOT}"}
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--quick", "--targets", "sm90",
                           "--resources", "--tuning", str(tuning), "--cases", "llama-3-8b bf16", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    prefill = [r for r in rows if r["kernel"] == "_prefill_kernel" and r["case"] == "llama-3-8b bf16"]
    assert prefill and all(r["ok"] and "BLOCK_M=128 BLOCK_N=128" in r["variant"] and r["num_stages"] == 3
                           for r in prefill)
    assert max(r["shared"] for r in prefill) > 200 << 10  # the three-stage tile really is that large
    assert not [r["variant"] for r in prefill if not _experiment(r["variant"]) and "WINDOW" not in r["variant"]
                and r["resources"].get("spill_stores", 0) + r["resources"].get("spill_loads", 0)]
