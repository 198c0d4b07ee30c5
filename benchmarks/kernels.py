"""Kernel micro-benchmarks: each of stoke's kernels against torch on the same shapes.

On CUDA (the Triton backend):
- decode attention, batch 1-256 x context 512-8192, Llama-3-8B (32 q / 8 kv heads, d128) and
  Qwen3-0.6B (16 q / 8 kv, d128) layouts, over a paged cache with shuffled blocks;
- prefill attention, 1-8 sequences of 512-4096 tokens (causal, no cached prefix), q/k/v views
  of one projection as the model passes them, also with one program per query head instead of
  a kv head's packed group (`unpacked`), and with the new keys read from their K/V rows
  instead of through the block table (`new_kv_rows`; through tensor descriptors: `new_kv_tma`);
- a mixed step's attention, decodes beside a 512-token prompt (4 at context 16384, where the
  decode kernel splits and the prefill kernel walks each context in one program; 16-256 at
  2048): one prefill launch over every sequence against the eager split (decode kernel +
  prefill kernel + concatenation, `split`) and what mixed CUDA graphs launch now (`graphed`:
  the graphed decode kernel, counts on the device, then the prefill kernel skipping the
  decodes, into one output);
- decode's split-K with the partials merged by a second kernel (`merge_kernel`) rather than by
  the last split;
- store_kv, fused RMSNorm (+residual), rotary.
Each is timed with CUDA events (median, L2 flushed before every run) and reported as achieved
HBM GB/s against the card's peak, next to torch: `kernels.reference` on the same paged inputs
and, for attention, torch SDPA on K/V already gathered into contiguous tensors (what a dense
engine would run; its gather is not timed): SDPA's own choice, and on CUDA its FlashAttention-2
and cuDNN backends forced (`sdpa_flash`, `sdpa_cudnn`), which tells what the goal's peer is.
ratio = torch time / stoke time (> 1: stoke faster).

On the CPU only the torch reference runs (the Triton interpreter's speed means nothing), at
tiny sizes: its time, and the attention share of a whole forward step of the tiny (--tiny) or
the default model; `--impl cpu` times the C kernels the CPU serves with (kernels.cpu_ops)
instead, with the reference as their peer. Also measured on CUDA: the attention share of a
decode and a prefill step of Qwen3-0.6B and Llama-3-8B (dummy weights).

`--kv-fp8` times each decode again over its caches in fp8 (e4m3, per-tensor scales from their
amax, as a calibrated checkpoint's): fp8 against the wide cache's time in the same run, and how
far the output moves. `--decode-batches` / `--decode-contexts` replace the decode sizes.

    python -m benchmarks.kernels                      # GPU sizes on CUDA, tiny on CPU
    python -m benchmarks.kernels --tiny --out results/kernels_tiny.json
    python -m benchmarks.kernels --impl cpu --kv-fp8 --only decode --layouts qwen3-0.6b \
        --decode-batches 1 8 32 --decode-contexts 512 2048 8192   # fp32 vs fp8 KV on the CPU
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
import torch.nn.functional as F

from benchmarks.report import write_json
from kernels import reference

LAYOUTS = {  # name: (query heads, kv heads, head dim, hidden size, model config dir)
    "llama-3-8b": (32, 8, 128, 4096, "configs/llama-3-8b"),
    "qwen3-0.6b": (16, 8, 128, 1024, "configs/qwen3-0.6b"),
}
GPU_SIZES = dict(
    decode_batches=[1, 4, 16, 64, 256], decode_contexts=[512, 2048, 8192],
    prefill_seqs=[1, 4, 8], prefill_lens=[512, 1024, 4096],
    mixed=[(4, 16384), (16, 2048), (64, 2048), (256, 2048)], mixed_chunk=512,  # (decodes, context) + a prompt
    store_tokens=[256, 8192], norm_tokens=[1, 256, 8192], rotary_tokens=[256, 8192],
    share_decode=(64, 2048), share_prefill=(1, 2048), iters=25, warmup=3,
)
TINY_SIZES = dict(
    decode_batches=[1, 4], decode_contexts=[32, 96],
    prefill_seqs=[1, 2], prefill_lens=[16, 48], mixed=[(2, 40)], mixed_chunk=24,
    store_tokens=[64], norm_tokens=[4, 64], rotary_tokens=[64],
    share_decode=(4, 48), share_prefill=(2, 32), iters=5, warmup=1,
)
BLOCK_SIZE = 16
KERNEL_PARTS = ("decode", "prefill", "mixed", "store_kv", "rms_norm", "rotary")  # Bench methods, in order
PARTS = (*KERNEL_PARTS, "share")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Peak HBM bandwidth (TB/s) by device name: the first rule whose words all appear wins.
PEAK_TBPS = [
    (("h200",), 4.8), (("h100", "pcie"), 2.0), (("h100", "nvl"), 3.9), (("h100",), 3.35),
    (("a100", "80gb"), 2.0), (("a100",), 1.555),
]


# ----------------------------------------------------------------------------- device facts
def peak_bandwidth(device: torch.device) -> tuple[float | None, str]:
    """(bytes/s, source) of the device's peak memory bandwidth; (None, "unknown") if unknown."""
    if device.type != "cuda":
        return None, "unknown"
    name = torch.cuda.get_device_name(device).lower()
    for words, tbps in PEAK_TBPS:
        if all(w in name for w in words):
            return tbps * 1e12, f"table ({'+'.join(words)})"
    try:  # memory clock x bus width x 2 (double data rate)
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
        mhz = pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)
        bits = pynvml.nvmlDeviceGetMemoryBusWidth(handle)
        return mhz * 1e6 * bits / 8 * 2, "nvml"
    except Exception:  # noqa: BLE001 - no nvml, no driver support: say so
        return None, "unknown"


# ----------------------------------------------------------------------------- timing
class Timer:
    """Median time of a call: on CUDA its GPU time, by events with the L2 cache flushed before
    each run and the CPU's launch cost hidden (a spin kernel keeps the GPU busy while the call is
    launched: under CUDA graphs, as the engine decodes, there is no launch cost); on the CPU,
    perf_counter. `launch_us` is the last call's median CPU time to launch (CUDA) or run (CPU);
    `times` its runs' milliseconds."""

    SPIN_CYCLES = 400_000  # ~0.2 ms at 2 GHz: longer than any launch measured here

    def __init__(self, device: torch.device, iters: int, warmup: int) -> None:
        self.device, self.iters, self.warmup = device, iters, warmup
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if device.type == "cuda" else None
        self.launch_us: float | None = None
        self.times: list[float] = []

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Milliseconds."""
        for _ in range(self.warmup):
            fn()
        if self.device.type != "cuda":
            times = []
            for _ in range(self.iters):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            self.launch_us, self.times = statistics.median(times) * 1e3, times
            return statistics.median(times)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(self.iters)]
        launches = []
        torch.cuda.synchronize(self.device)
        for start, end in events:
            torch.cuda._sleep(self.SPIN_CYCLES)
            self.flush.zero_()
            start.record()
            t0 = time.perf_counter()
            fn()
            launches.append((time.perf_counter() - t0) * 1e6)
            end.record()
            torch.cuda.synchronize(self.device)  # one run at a time: the spin must precede each launch
        self.launch_us = statistics.median(launches)
        self.times = [s.elapsed_time(e) for s, e in events]
        return statistics.median(self.times)


def _try(timer: Timer, fn: Callable[[], Any]) -> tuple[float | None, str | None]:
    try:
        return timer(fn), None
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None, "out of memory"
    except RuntimeError as e:  # e.g. no SDPA backend for these inputs
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"


def _free_bytes(device: torch.device) -> float:
    if device.type != "cuda":
        return float("inf")
    return torch.cuda.mem_get_info(device)[0]


# ----------------------------------------------------------------------------- inputs
def paged_cache(lens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                gen: torch.Generator, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K/V caches holding sequences of `lens` tokens in shuffled blocks, and their tables."""
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed)
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    v_cache = torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    ids = torch.randperm(num_blocks, generator=gen, device=device).int()
    tables = torch.zeros((len(lens), max(needed)), dtype=torch.int32, device=device)
    used = 0
    for b, n in enumerate(needed):
        tables[b, :n] = ids[used : used + n]
        used += n
    return k_cache, v_cache, tables


def gathered(k_cache: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
    """[B, Hkv, length, D] contiguous: the paged K (or V) of equal-length sequences."""
    b, block_size = tables.shape[0], k_cache.shape[1]
    blocks = -(-length // block_size)
    x = k_cache[tables[:, :blocks].long()].reshape(b, blocks * block_size, *k_cache.shape[2:])[:, :length]
    return x.transpose(1, 2).contiguous()


def projection_views(q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q `[T, Hq, D]` and the new tokens' K/V (gathered `[B, Hkv, L, D]`, T = B * L) as the
    model hands them to attention: strided `[T, H, D]` views of one fused projection."""
    tokens, hq, d = q.shape
    hkv = k.shape[1]
    qkv = torch.empty(tokens, (hq + 2 * hkv) * d, dtype=q.dtype, device=q.device)
    views = (qkv[:, : hq * d].view(tokens, hq, d), qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d),
             qkv[:, (hq + hkv) * d :].view(tokens, hkv, d))
    for view, x in zip(views, (q, k.transpose(1, 2), v.transpose(1, 2))):
        view.copy_(x.reshape(view.shape))
    return views


def _gen(device: torch.device, seed: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _row(impl_ms: float | None, peers: dict[str, tuple[float | None, str | None]], nbytes: float,
         peak: float | None, flops: float | None = None, launch_us: float | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {"stoke_ms": impl_ms, "stoke_launch_us": launch_us, "bytes": nbytes}
    if impl_ms:
        row["stoke_gbps"] = nbytes / impl_ms / 1e6
        row["stoke_peak_fraction"] = nbytes / impl_ms / 1e-3 / peak if peak else None
        if flops is not None:
            row["stoke_tflops"] = flops / impl_ms / 1e9
    for name, (ms, why) in peers.items():
        row[f"{name}_ms"] = ms
        row[f"{name}_ratio"] = ms / impl_ms if ms and impl_ms else None
        if why:
            row[f"{name}_skipped"] = why
    return row


# ----------------------------------------------------------------------------- benchmarks
# Peer name: SDPA backend forced, one at a time beside SDPA's own choice.
SDPA_BACKENDS = {"sdpa_flash": "FLASH_ATTENTION", "sdpa_cudnn": "CUDNN_ATTENTION"}


def sdpa_peers(timer: Timer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
               is_causal: bool) -> tuple[dict[str, tuple[float | None, str | None]], str | None]:
    """torch SDPA on contiguous K/V: its own choice (`sdpa_contiguous`, the goal's peer), and on
    CUDA each fused backend forced (`sdpa_flash`, `sdpa_cudnn`), which says what that choice
    is: FlashAttention-2 or cuDNN's Hopper kernels. Also the name of the backend it picks."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def call() -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, is_causal=is_causal, enable_gqa=True)

    peers = {"sdpa_contiguous": _try(timer, call)}
    try:
        choice = SDPBackend(torch._fused_sdp_choice(q, k, v, is_causal=is_causal, scale=scale, enable_gqa=True)).name
    except (RuntimeError, TypeError, ValueError, AttributeError):
        choice = None
    if q.is_cuda:
        for peer, name in SDPA_BACKENDS.items():
            def forced(backend: SDPBackend = getattr(SDPBackend, name)) -> torch.Tensor:
                with sdpa_kernel(backend):
                    return call()

            peers[peer] = _try(timer, forced)
    return peers, choice


class Bench:
    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
        self.args, self.device, self.dtype = args, device, dtype
        self.tiny = args.tiny or device.type != "cuda"
        self.sizes = dict(TINY_SIZES if self.tiny else GPU_SIZES)
        for size in ("decode_batches", "decode_contexts"):
            if getattr(args, size):
                self.sizes[size] = getattr(args, size)
        warmup = self.sizes["warmup"] if args.warmup is None else args.warmup
        self.timer = Timer(device, args.iters or self.sizes["iters"], warmup)
        self.peak, self.peak_source = peak_bandwidth(device)
        self.elt = dtype.itemsize
        self.layouts = {name: LAYOUTS[name] for name in args.layouts}
        impl = args.impl if args.impl != "auto" else ("triton" if device.type == "cuda" else "reference")
        if impl == "triton":  # on the CPU: the interpreter (TRITON_INTERPRET=1), to test this script
            import importlib

            self.ops = importlib.import_module("kernels.triton_ops")
            self.norm_rope = importlib.import_module("kernels.triton_norm_rope")
        elif impl == "cpu":  # the C kernels (built on import)
            import importlib

            self.ops = self.norm_rope = importlib.import_module("kernels.cpu_ops")
        else:  # the CPU's fallback serving path is the reference itself
            self.ops = self.norm_rope = reference
        self.impl = impl

    def torch_peer(self) -> bool:
        """Whether `kernels.reference` is a separate peer (on the CPU it *is* the kernel)."""
        return self.ops is not reference

    def decode(self) -> list[dict[str, Any]]:
        rows = []
        for layout, (hq, hkv, d, _, _) in self.layouts.items():
            for batch in self.sizes["decode_batches"]:
                for ctx in self.sizes["decode_contexts"]:
                    kv_bytes = 2 * batch * ctx * hkv * d * self.elt
                    if kv_bytes * 3 > _free_bytes(self.device):
                        rows.append({"layout": layout, "batch": batch, "context": ctx, "skipped": "memory"})
                        continue
                    gen = _gen(self.device, batch + ctx)
                    k_cache, v_cache, tables = paged_cache([ctx] * batch, hkv, d, self.dtype, self.device, gen)
                    lens = torch.full((batch,), ctx, dtype=torch.int32, device=self.device)
                    q = torch.randn(batch, hq, d, generator=gen, device=self.device).to(self.dtype)
                    scale = d**-0.5
                    ms = self.timer(lambda: self.ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale))
                    launch_us = self.timer.launch_us
                    peers = {}
                    if self.impl == "triton":  # split-K's partials merged by a second launch
                        peers["merge_kernel"] = _try(self.timer, lambda: self.ops.paged_decode_attention(
                            q, k_cache, v_cache, tables, lens, scale, fused_merge=False))
                    if self.torch_peer():
                        # reference: gather + SDPA with a mask (math backend with GQA: K/V expanded)
                        if kv_bytes * (4 + hq // hkv * 2) < 0.8 * _free_bytes(self.device):
                            peers["torch_paged"] = _try(self.timer, lambda: reference.paged_decode_attention(
                                q, k_cache, v_cache, tables, lens, scale))
                        else:
                            peers["torch_paged"] = (None, "skipped: memory")
                    k, v = gathered(k_cache, tables, ctx), gathered(v_cache, tables, ctx)
                    sdpa, choice = sdpa_peers(self.timer, q[:, :, None], k, v, scale, is_causal=False)
                    nbytes = kv_bytes + 2 * q.numel() * self.elt
                    rows.append({"layout": layout, "batch": batch, "context": ctx, "block_size": BLOCK_SIZE,
                                 **_row(ms, peers | sdpa, nbytes, self.peak, launch_us=launch_us),
                                 "sdpa_backend": choice})
                    if self.args.kv_fp8:
                        rows[-1] |= self.decode_fp8(q, k_cache, v_cache, tables, lens, scale, ms)
                    k_cache = v_cache = k = v = None  # freed (not del: the timed lambdas close over them)
                    self._release()
        return rows

    def decode_fp8(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                   lens: torch.Tensor, scale: float, wide_ms: float | None) -> dict[str, Any]:
        """The same decode over the caches in fp8 (e4m3, a scale per tensor from its amax): its
        time and bandwidth, the wide cache's time over it (`fp8_kv_speedup`), and the largest
        change in the output."""
        k_scale = float(k_cache.abs().amax()) / reference.FP8_KV_MAX
        v_scale = float(v_cache.abs().amax()) / reference.FP8_KV_MAX
        k8, v8 = reference.quantize_kv(k_cache, k_scale), reference.quantize_kv(v_cache, v_scale)

        def call() -> torch.Tensor:
            return self.ops.paged_decode_attention(q, k8, v8, tables, lens, scale, k_scale=k_scale, v_scale=v_scale)

        try:
            ms, why = _try(self.timer, call)
        except TypeError as e:  # a backend without the fp8 cache's keywords
            ms, why = None, f"TypeError: {e}"
        nbytes = k8.numel() // k_cache.shape[0] * 2 * int(lens.sum()) // k_cache.shape[1] + 2 * q.numel() * self.elt
        row: dict[str, Any] = {"fp8_kv_ms": ms, "fp8_kv_bytes": nbytes}
        if ms:
            wide = self.ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, scale)
            row |= {"fp8_kv_gbps": nbytes / ms / 1e6, "fp8_kv_speedup": wide_ms / ms if wide_ms else None,
                    "fp8_kv_max_abs_diff": float((call().float() - wide.float()).abs().max())}
        if why:
            row["fp8_kv_skipped"] = why
        return row

    def prefill(self) -> list[dict[str, Any]]:
        rows = []
        for layout, (hq, hkv, d, _, _) in self.layouts.items():
            for seqs in self.sizes["prefill_seqs"]:
                for length in self.sizes["prefill_lens"]:
                    gen = _gen(self.device, seqs * length)
                    k_cache, v_cache, tables = paged_cache([length] * seqs, hkv, d, self.dtype, self.device, gen)
                    lens = torch.full((seqs,), length, dtype=torch.int32, device=self.device)
                    cu = torch.arange(seqs + 1, dtype=torch.int32, device=self.device) * length
                    k, v = gathered(k_cache, tables, length), gathered(v_cache, tables, length)
                    q = torch.randn(seqs * length, hq, d, generator=gen, device=self.device).to(self.dtype)
                    q, key, value = projection_views(q, k, v)  # the engine passes the new K/V along
                    scale = d**-0.5
                    ms = self.timer(lambda: self.ops.paged_prefill_attention(
                        q, k_cache, v_cache, tables, cu, lens, scale, key=key, value=value))
                    launch_us = self.timer.launch_us
                    peers = {}
                    if self.impl == "triton":
                        peers["unpacked"] = _try(self.timer, lambda: self.ops.paged_prefill_attention(
                            q, k_cache, v_cache, tables, cu, lens, scale, key=key, value=value, pack_gqa=False))
                        for source in ("rows", "tma"):  # the new keys from their rows, not the cache
                            peers[f"new_kv_{source}"] = _try(self.timer, lambda: self.ops.paged_prefill_attention(
                                q, k_cache, v_cache, tables, cu, lens, scale, key=key, value=value, new_kv=source))
                    if self.torch_peer():
                        scores = seqs * hq * length * length * 4  # the math backend's fp32 scores
                        if 3 * scores < 0.5 * _free_bytes(self.device):
                            peers["torch_paged"] = _try(self.timer, lambda: reference.paged_prefill_attention(
                                q, k_cache, v_cache, tables, cu, lens, scale))
                        else:
                            peers["torch_paged"] = (None, "skipped: memory")
                    q4 = q.view(seqs, length, hq, d).transpose(1, 2)
                    sdpa, choice = sdpa_peers(self.timer, q4, k, v, scale, is_causal=True)
                    nbytes = (2 * q.numel() + 2 * seqs * length * hkv * d) * self.elt
                    flops = 4.0 * hq * d * seqs * length * (length + 1) / 2
                    rows.append({"layout": layout, "seqs": seqs, "length": length, "block_size": BLOCK_SIZE,
                                 **_row(ms, peers | sdpa, nbytes, self.peak, flops, launch_us),
                                 "sdpa_backend": choice})
                    k_cache = v_cache = k = v = q = None  # freed (not del: the timed lambdas close over them)
                    self._release()
        return rows

    def mixed(self) -> list[dict[str, Any]]:
        rows = []
        chunk = self.sizes["mixed_chunk"]
        for layout, (hq, hkv, d, _, _) in self.layouts.items():
            for decodes, context in self.sizes["mixed"]:
                gen = _gen(self.device, decodes)
                lens = [context] * decodes + [chunk]
                k_cache, v_cache, tables = paged_cache(lens, hkv, d, self.dtype, self.device, gen)
                ctx = torch.tensor(lens, dtype=torch.int32, device=self.device)
                q = torch.randn(decodes + chunk, hq, d, generator=gen, device=self.device).to(self.dtype)
                cu_all = torch.tensor([*range(decodes + 1), decodes + chunk], dtype=torch.int32, device=self.device)
                cu_chunk = torch.tensor([0, chunk], dtype=torch.int32, device=self.device)
                scale = d**-0.5

                def split() -> torch.Tensor:
                    return torch.cat([
                        self.ops.paged_decode_attention(q[:decodes], k_cache, v_cache, tables[:decodes],
                                                        ctx[:decodes], scale),
                        self.ops.paged_prefill_attention(q[decodes:], k_cache, v_cache, tables[decodes:], cu_chunk,
                                                         ctx[decodes:], scale)])

                ms = self.timer(lambda: self.ops.paged_prefill_attention(q, k_cache, v_cache, tables, cu_all, ctx,
                                                                         scale))
                launch_us = self.timer.launch_us
                peers = {"split": _try(self.timer, split)}
                if hasattr(self.ops, "paged_mixed_attention_graphed"):
                    splits = self.ops.graphed_decode_splits(decodes, hkv, context, self.device)
                    counts = torch.tensor([decodes, splits], dtype=torch.int32, device=self.device)
                    peers["graphed"] = _try(self.timer, lambda: self.ops.paged_mixed_attention_graphed(
                        q, k_cache, v_cache, tables, cu_all, ctx, scale, counts))
                nbytes = (2 * q.numel() + 2 * sum(lens) * hkv * d) * self.elt
                rows.append({"layout": layout, "decodes": decodes, "context": context, "chunk": chunk,
                             **_row(ms, peers, nbytes, self.peak, launch_us=launch_us)})
                k_cache = v_cache = q = None  # freed (not del: the timed lambdas close over them)
                self._release()
        return rows

    def store_kv(self) -> list[dict[str, Any]]:
        rows = []
        for layout, (hq, hkv, d, _, _) in self.layouts.items():
            for tokens in self.sizes["store_tokens"]:
                gen = _gen(self.device, tokens)
                num_blocks = -(-tokens // BLOCK_SIZE) * 2
                k_cache = torch.zeros(num_blocks, BLOCK_SIZE, hkv, d, dtype=self.dtype, device=self.device)
                v_cache = torch.zeros_like(k_cache)
                key, value = torch.randn(2, tokens, hkv, d, generator=gen, device=self.device).to(self.dtype)
                slots = torch.randperm(num_blocks * BLOCK_SIZE, generator=gen, device=self.device)[:tokens]
                ms = self.timer(lambda: self.ops.store_kv(key, value, k_cache, v_cache, slots))
                launch_us = self.timer.launch_us
                peers = {}
                if self.torch_peer():
                    peers["torch"] = _try(self.timer, lambda: reference.store_kv(key, value, k_cache, v_cache, slots))
                nbytes = 4 * tokens * hkv * d * self.elt + slots.numel() * 8
                rows.append({"layout": layout, "tokens": tokens,
                             **_row(ms, peers, nbytes, self.peak, launch_us=launch_us)})
        return rows

    def rms_norm(self) -> list[dict[str, Any]]:
        rows = []
        seen = set()
        for layout, (_, _, _, hidden, _) in self.layouts.items():
            if hidden in seen:
                continue
            seen.add(hidden)
            for tokens in self.sizes["norm_tokens"]:
                gen = _gen(self.device, tokens)
                x, res = torch.randn(2, tokens, hidden, generator=gen, device=self.device).to(self.dtype)
                w = torch.ones(hidden, dtype=self.dtype, device=self.device)
                ms = self.timer(lambda: self.norm_rope.rms_norm(x, w, 1e-6, res))
                launch_us = self.timer.launch_us
                peers = {}
                if self.torch_peer():
                    peers["torch"] = _try(self.timer, lambda: reference.rms_norm(x, w, 1e-6, res))
                nbytes = (4 * tokens * hidden + hidden) * self.elt
                rows.append({"layout": layout, "hidden": hidden, "tokens": tokens, "residual": True,
                             **_row(ms, peers, nbytes, self.peak, launch_us=launch_us)})
        return rows

    def rotary(self) -> list[dict[str, Any]]:
        rows = []
        for layout, (hq, hkv, d, _, _) in self.layouts.items():
            for tokens in self.sizes["rotary_tokens"]:
                gen = _gen(self.device, tokens)
                qkv = torch.randn(tokens, (hq + 2 * hkv) * d, generator=gen, device=self.device).to(self.dtype)
                q = qkv[:, : hq * d].view(tokens, hq, d)
                k = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
                positions = torch.randint(0, 8192, (tokens,), generator=gen, device=self.device)
                angles = torch.rand(8192, d // 2, generator=gen, device=self.device)
                cos, sin = angles.cos(), angles.sin()
                ms = self.timer(lambda: self.norm_rope.apply_rotary(q, k, cos, sin, positions))
                launch_us = self.timer.launch_us
                peers = {}
                if self.torch_peer():
                    peers["torch"] = _try(self.timer, lambda: reference.apply_rotary(q, k, cos, sin, positions))
                nbytes = 2 * tokens * (hq + hkv) * d * self.elt + 2 * tokens * (d // 2) * 4 + tokens * 8
                rows.append({"layout": layout, "tokens": tokens,
                             **_row(ms, peers, nbytes, self.peak, launch_us=launch_us)})
        return rows

    def _release(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- attention share
class _TimedBackend:
    """Wraps a kernels module: records the time spent in the three attention calls."""

    def __init__(self, ops, device: torch.device) -> None:
        self.ops, self.device = ops, device
        self.spans: list[tuple[str, Any, Any]] = []
        self.__name__ = ops.__name__
        for name in ("store_kv", "paged_decode_attention", "paged_prefill_attention"):
            setattr(self, name, self._wrap(name))

    def _wrap(self, name: str):
        fn = getattr(self.ops, name)

        def timed(*args, **kwargs):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                out = fn(*args, **kwargs)
                end.record()
            else:
                start = time.perf_counter()
                out = fn(*args, **kwargs)
                end = time.perf_counter()
            self.spans.append((name, start, end))
            return out
        return timed

    def totals(self) -> dict[str, float]:
        """Milliseconds per call kind (after a sync)."""
        out: dict[str, float] = {}
        for name, start, end in self.spans:
            ms = start.elapsed_time(end) if self.device.type == "cuda" else (end - start) * 1e3
            out[name] = out.get(name, 0.0) + ms
        return out


def _tiny_config():
    from engine.config import ModelConfig

    return ModelConfig.from_dict({
        "architectures": ["LlamaForCausalLM"], "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
    })


def attention_share(model_name: str, config, device: torch.device, dtype: torch.dtype, decode: tuple[int, int],
                    prefill: tuple[int, int], iters: int) -> dict[str, Any]:
    """Time of the attention calls (store_kv + paged attention) against the whole step (model
    + LM head), for one decode step of decode=(batch, context) and one prefill step of
    prefill=(sequences, length); dummy weights, eager (no CUDA graph)."""
    import kernels
    from engine.attention import AttentionMetadata
    from engine.models.llama import LlamaForCausalLM
    from engine.weights import init_dummy_weights

    with torch.device(device):
        model = LlamaForCausalLM(config)
    model.to(dtype)
    model.restore_fp32()
    init_dummy_weights(model)
    model.eval().requires_grad_(False)
    backend = kernels.attention_backend(device)
    if device.type == "cuda" and backend.__name__ == kernels.BACKENDS["triton"]:
        import importlib

        model.use_norm_rope_kernels(importlib.import_module("kernels.triton_norm_rope"))
    timed = _TimedBackend(backend, device)
    out: dict[str, Any] = {"model": model_name, "backend": backend.__name__, "dtype": str(dtype).removeprefix("torch.")}
    c = config
    for phase, (batch, ctx) in (("decode", decode), ("prefill", prefill)):
        ctx = min(ctx, c.max_position_embeddings)
        blocks_per = -(-ctx // BLOCK_SIZE)
        shape = (batch * blocks_per, BLOCK_SIZE, c.num_kv_heads, c.head_dim)
        caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                  for _ in range(c.num_layers)]
        tables = torch.arange(batch * blocks_per, dtype=torch.int32, device=device).view(batch, blocks_per)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
        if phase == "decode":  # one new token per sequence, at the end of its context
            q_len = 1
            positions = torch.full((batch,), ctx - 1, dtype=torch.long, device=device)
            slots = tables[:, -1].long() * BLOCK_SIZE + (ctx - 1) % BLOCK_SIZE
            num_decodes = batch
        else:  # whole sequences
            q_len = ctx
            positions = torch.arange(ctx, device=device).repeat(batch)
            slots = torch.arange(batch * blocks_per * BLOCK_SIZE, device=device).view(batch, -1)[:, :ctx].flatten()
            num_decodes = 0
        meta = AttentionMetadata(
            slot_mapping=slots, block_tables=tables, context_lens=lens, num_decodes=num_decodes,
            prefill_cu_seqlens_q=torch.arange(batch + 1, dtype=torch.int32, device=device) * q_len,
            kv_caches=caches, backend=timed,
        )
        ids = torch.randint(0, c.vocab_size, (batch * q_len,), device=device)
        last = torch.arange(batch, device=device) * q_len + q_len - 1

        def step():
            with torch.inference_mode():
                hidden = model(ids, positions, meta)
                return model.compute_logits(hidden[last])

        step()  # warm-up (compiles kernels)
        totals, forwards = [], []
        for _ in range(iters):
            timed.spans.clear()
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step()
                end.record()
                torch.cuda.synchronize(device)
                forwards.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                step()
                forwards.append((time.perf_counter() - t0) * 1e3)
            totals.append(timed.totals())
        forward_ms = statistics.median(forwards)
        per_kind = {k: statistics.median(t.get(k, 0.0) for t in totals) for k in totals[0]}
        attention_ms = sum(per_kind.values())
        out[phase] = {"batch": batch, "context": ctx, "tokens": batch * q_len, "step_ms": forward_ms,
                      "attention_ms": attention_ms, "attention_share": attention_ms / forward_ms,
                      "per_kernel_ms": per_kind}
        caches = meta = None  # freed (not del: the timed lambdas close over them)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model = None  # freed (not del: the timed lambdas close over them)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def share_models(args: argparse.Namespace, device: torch.device) -> list[tuple[str, Any]]:
    from engine.config import ModelConfig

    if device.type == "cuda" and not args.tiny:
        return [(name, ModelConfig.from_dir(os.path.join(ROOT, LAYOUTS[name][4]))) for name in args.share_models]
    if args.tiny:
        return [("tiny", _tiny_config())]
    try:
        from engine.default_model import default_model_path

        return [("default (SmolLM2-135M)", ModelConfig.from_dir(default_model_path()))]
    except Exception as e:  # noqa: BLE001 - no default model here: the tiny one still says something
        print(f"default model unavailable ({e}); using the tiny one", file=sys.stderr)
        return [("tiny", _tiny_config())]


# ----------------------------------------------------------------------------- report
def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def render(report: dict[str, Any]) -> str:
    env = report["env"]
    peak = env["peak_gbps"]
    lines = [f"kernel micro-benchmarks on {env['device_name']} ({env['dtype']}, {env['impl']}); peak HBM "
             f"{_fmt(peak, '.0f')} GB/s ({env['peak_source']}); times are medians"
             + (", GPU time (L2 flushed, launch hidden); 'launch us' is the CPU's cost to launch"
                if env["device"] == "cuda" else "")]

    def table(title: str, rows: list[dict[str, Any]], keys: list[tuple[str, str]], peers: list[str]) -> None:
        if not rows:
            return
        lines.append("")
        lines.append(title)
        head = "".join(f"{k:>10}" for k, _ in keys) + f"{'stoke ms':>11}{'launch us':>10}{'GB/s':>9}{'%peak':>7}"
        head += "".join(f"{p + ' x':>20}" for p in peers)
        lines.append(head)
        for r in rows:
            line = "".join(f"{str(r.get(k, '')):>10}" for k, _ in keys)
            if r.get("skipped"):
                lines.append(line + f"  skipped ({r['skipped']})")
                continue
            frac = r.get("stoke_peak_fraction")
            line += f"{_fmt(r['stoke_ms'], '.4f'):>11}{_fmt(r.get('stoke_launch_us'), '.0f'):>10}"
            line += f"{_fmt(r.get('stoke_gbps'), '.0f'):>9}"
            line += f"{_fmt(None if frac is None else 100 * frac, '.0f'):>7}"
            for p in peers:
                ratio = r.get(f"{p}_ratio")
                cell = f"{_fmt(r.get(f'{p}_ms'), '.4f')} ({_fmt(ratio, '.2f')})" if r.get(f"{p}_ms") else "-"
                line += f"{cell:>20}"
            lines.append(line)

    peers = ["torch_paged", "sdpa_contiguous"] if env["impl"] != "reference" else ["sdpa_contiguous"]
    if env["device"] == "cuda":
        peers += list(SDPA_BACKENDS)
    triton = env["impl"] == "triton"
    table("decode attention (torch ms (torch/stoke))", report["decode"],
          [("layout", ""), ("batch", ""), ("context", "")], (["merge_kernel"] if triton else []) + peers)
    fp8_rows = [r for r in report["decode"] if "fp8_kv_ms" in r]
    if fp8_rows:
        lines += ["", f"decode attention over an fp8 (e4m3) KV cache vs the {env['dtype']} one (same run)",
                  f"{'layout':>12}{'batch':>7}{'context':>9}{env['dtype'] + ' ms':>13}{'fp8 ms':>10}{'speedup':>9}"
                  f"{env['dtype'] + ' GB/s':>15}{'fp8 GB/s':>10}{'max |diff|':>12}"]
        for r in fp8_rows:
            lines.append(f"{r['layout']:>12}{r['batch']:>7}{r['context']:>9}{_fmt(r['stoke_ms'], '.4f'):>13}"
                         f"{_fmt(r['fp8_kv_ms'], '.4f'):>10}{_fmt(r.get('fp8_kv_speedup'), '.2f'):>9}"
                         f"{_fmt(r.get('stoke_gbps'), '.1f'):>15}{_fmt(r.get('fp8_kv_gbps'), '.1f'):>10}"
                         f"{_fmt(r.get('fp8_kv_max_abs_diff'), '.1e'):>12}"
                         + (f"  ({r['fp8_kv_skipped']})" if r.get("fp8_kv_skipped") else ""))
    table("prefill attention", report["prefill"], [("layout", ""), ("seqs", ""), ("length", "")],
          (["unpacked", "new_kv_rows", "new_kv_tma"] if triton else []) + peers)
    for kind in ("decode", "prefill"):
        choices = sorted({r["sdpa_backend"] for r in report[kind] if r.get("sdpa_backend")})
        if choices:
            lines.append(f"{kind}: SDPA chose {', '.join(choices)} (sdpa_contiguous)")
    table("mixed step attention: one prefill launch vs split (decode + prefill + cat) and graphed (what mixed "
          "graphs run)", report.get("mixed", []), [("layout", ""), ("decodes", ""), ("context", ""), ("chunk", "")],
          ["split", "graphed"] if triton else ["split"])
    simple = ["torch"] if env["impl"] != "reference" else []
    table("store_kv", report["store_kv"], [("layout", ""), ("tokens", "")], simple)
    table("rms_norm (+residual)", report["rms_norm"], [("hidden", ""), ("tokens", "")], simple)
    table("rotary (in place, q and k)", report["rotary"], [("layout", ""), ("tokens", "")], simple)
    for share in report["attention_share"]:
        for phase in ("decode", "prefill"):
            s = share.get(phase)
            if s:
                lines.append(f"attention share, {share['model']} {phase} step (batch {s['batch']}, context "
                             f"{s['context']}): {s['attention_ms']:.3f} of {s['step_ms']:.3f} ms = "
                             f"{100 * s['attention_share']:.1f}%")
    for note in report["summary"]["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def summarise(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's goals, where the numbers exist: decode >= 80% of peak at long context, and
    every kernel at least as fast as torch."""
    notes = []
    long_ctx = [r for r in report["decode"] if r.get("stoke_peak_fraction") is not None
                and r["context"] == max(x["context"] for x in report["decode"])]
    best = max((r["stoke_peak_fraction"] for r in long_ctx), default=None)
    slower = []
    for kind in ("decode", "prefill", "store_kv", "rms_norm", "rotary"):
        for r in report[kind]:
            for key in ("sdpa_contiguous_ratio", "torch_paged_ratio", "torch_ratio"):
                if r.get(key) is not None and r[key] < 1.0:
                    slower.append(f"{kind} {key.removesuffix('_ratio')} " + ", ".join(
                        f"{k}={r[k]}" for k in ("layout", "batch", "context", "seqs", "length", "tokens") if k in r))
    if report["env"]["impl"] == "reference":
        notes.append("CPU: only the torch reference ran (the Triton interpreter's speed means nothing); "
                     "its times show the CPU serving path at tiny sizes")
    speedups = sorted(r["fp8_kv_speedup"] for r in report["decode"] if r.get("fp8_kv_speedup"))
    return {
        "decode_fp8_kv_speedup": {"min": speedups[0], "median": statistics.median(speedups), "max": speedups[-1]}
        if speedups else None,
        "decode_long_context_best_peak_fraction": best,
        "decode_goal_peak_fraction": 0.8,
        "decode_goal_met": None if best is None else best >= 0.8,
        "slower_than_torch": slower,
        "notes": notes,
    }


def bench_env(bench: Any, device: torch.device, dtype: torch.dtype, script: str, argv: list[str] | None,
              **more: Any) -> dict[str, Any]:
    """A kernel benchmark's report header: the device, its peak, the versions, how it ran.
    `bench`: the benchmark's Bench (its impl, peak and timer)."""
    try:
        import triton

        triton_version: str | None = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(dtype).removeprefix("torch."), "impl": bench.impl,
        "peak_gbps": bench.peak / 1e9 if bench.peak else None, "peak_source": bench.peak_source,
        "torch": torch.__version__, "triton": triton_version, "iters": bench.timer.iters,
        "argv": sys.argv if argv is None else [script, *argv], **more,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny sizes (always on the CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--iters", type=int, default=None, help="timed runs per measurement (default: by size)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs before them (default: by size)")
    p.add_argument("--only", nargs="*", default=None,
                   choices=list(PARTS),
                   help="run only these parts")
    p.add_argument("--share-models", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS),
                   help="models for the attention share on CUDA")
    p.add_argument("--layouts", nargs="*", default=list(LAYOUTS), choices=list(LAYOUTS), help="head layouts")
    p.add_argument("--impl", default="auto", choices=["auto", "reference", "triton", "cpu"],
                   help="stoke's kernels: auto = Triton on CUDA, the reference on the CPU; triton on the CPU "
                        "runs the interpreter (slow; only to exercise this script); cpu = kernels.cpu_ops, "
                        "the C kernels the CPU serves with")
    p.add_argument("--kv-fp8", action="store_true",
                   help="time each decode again over its caches in fp8 (e4m3): fp8 vs the wide cache, same run")
    p.add_argument("--decode-batches", type=int, nargs="*", default=None, help="decode batch sizes (default: by size)")
    p.add_argument("--decode-contexts", type=int, nargs="*", default=None,
                   help="decode context lengths (default: by size)")
    p.add_argument("--out", default="results/kernels.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.impl == "triton" and device.type != "cuda":
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernel modules are imported
    from engine.config import DTYPES

    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    bench = Bench(args, device, dtype)
    parts = set(args.only or PARTS)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"env": bench_env(bench, device, dtype, "benchmarks/kernels.py", argv,
                                               tiny=bench.tiny, block_size=BLOCK_SIZE)}
    for part in KERNEL_PARTS:
        report[part] = getattr(bench, part)() if part in parts else []
        print(f"{part}: done ({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
    report["attention_share"] = []
    if "share" in parts:
        for name, config in share_models(args, device):
            try:
                report["attention_share"].append(attention_share(
                    name, config, device, dtype, bench.sizes["share_decode"], bench.sizes["share_prefill"],
                    iters=bench.timer.iters))
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                report["attention_share"].append({"model": name, "skipped": "out of memory"})
        print(f"share: done ({time.perf_counter() - t0:.1f}s)", file=sys.stderr, flush=True)
    report["summary"] = summarise(report)
    report["env"]["seconds"] = time.perf_counter() - t0
    print(render(report), flush=True)
    if args.out:
        write_json(report, args.out)
        print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
