"""kernels/tuning.py: per-GPU kernel tunings read, validated and written (the kernels' use of
them is in test_kernels_triton.py, the sweep that writes them in test_benchmarks_kernels.py)."""

from __future__ import annotations

import json

import pytest

from kernels import tuning
from kernels.tuning import KernelTuning, load_tuning, parse_tuning, tuning_path, write_tuning


def test_a_gpus_file_is_named_after_it() -> None:
    assert tuning_path("NVIDIA H100 80GB HBM3").endswith("kernels/tuning/NVIDIA_H100_80GB_HBM3.json")
    assert tuning_path("NVIDIA H200").endswith("/NVIDIA_H200.json")


def test_load_from_the_environment_the_shipped_file_or_nothing(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tuning.ENV_VAR, raising=False)
    monkeypatch.setattr(tuning, "TUNING_DIR", str(tmp_path / "shipped"))
    assert load_tuning("Some GPU") == KernelTuning()  # never tuned: the built-in choices
    shipped = tmp_path / "shipped" / "Some_GPU.json"
    shipped.parent.mkdir()
    shipped.write_text(json.dumps({"device": "Some GPU", "min_split_keys": 128}))
    assert load_tuning("Some GPU") == KernelTuning(min_split_keys=128, source=str(shipped))
    mine = tmp_path / "mine.json"
    mine.write_text(json.dumps({"prefill_tile": [128, 64, 8, 2], "pack_gqa": False}))
    monkeypatch.setenv(tuning.ENV_VAR, str(mine))  # the environment's file wins over the shipped one
    assert load_tuning("Some GPU") == KernelTuning(prefill_tile=(128, 64, 8, 2), pack_gqa=False, source=str(mine))
    monkeypatch.setenv(tuning.ENV_VAR, str(tmp_path / "gone.json"))
    with pytest.raises(FileNotFoundError, match="STOKE_KERNEL_TUNING=.*gone.json: no such file"):
        load_tuning("Some GPU")


@pytest.mark.parametrize("data,error", [
    ([64, 64, 4, 2], "expected a JSON object"),
    ({"prefill_tiles": [64, 64, 4, 2]}, r"unknown keys \['prefill_tiles'\]"),
    ({"prefill_tile": [64, 64, 4]}, "prefill_tile must be"),
    ({"prefill_tile": [64, 48, 4, 2]}, "prefill_tile must be"),  # not a power of two
    ({"prefill_tile": [8, 64, 4, 2]}, "prefill_tile must be"),  # below tl.dot's 16
    ({"prefill_tile": [64, 64, 4, "2"]}, "prefill_tile must be"),
    ({"pack_gqa": "yes"}, "pack_gqa must be"),
    ({"prefill_new_kv": "fresh"}, "prefill_new_kv must be one of"),
    ({"min_split_keys": 0}, "min_split_keys must be"),
    ({"min_split_keys": 64.0}, "min_split_keys must be"),
])
def test_a_bad_tuning_is_an_error_naming_its_file(data: object, error: str) -> None:
    with pytest.raises(ValueError, match=f"kernel tuning f.json: {error}"):
        parse_tuning(data, "f.json")


def test_written_as_it_reads_back(tmp_path) -> None:
    path = tmp_path / "t" / "x.json"
    chosen = KernelTuning(prefill_tile=(64, 64, 4, 2), pack_gqa=True, prefill_new_kv="rows", min_split_keys=64)
    write_tuning(chosen, "GPU X", str(path), measured={"prefill": {"score": 1.02}})
    data = json.loads(path.read_text())
    assert data["device"] == "GPU X" and data["measured"] == {"prefill": {"score": 1.02}}
    assert parse_tuning(data, str(path)) == KernelTuning(prefill_tile=(64, 64, 4, 2), pack_gqa=True,
                                                         prefill_new_kv="rows", min_split_keys=64, source=str(path))
    with pytest.raises(ValueError, match="min_split_keys"):
        write_tuning(KernelTuning(min_split_keys=-1), "GPU X", str(tmp_path / "bad.json"))
    assert not (tmp_path / "bad.json").exists()
