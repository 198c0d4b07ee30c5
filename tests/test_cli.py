"""`stoke generate` prints the completion of the embedded default model."""

from __future__ import annotations

import pytest

from server.cli import main


def test_generate_prints_the_completion(capsys: pytest.CaptureFixture[str], default_model_dir: str) -> None:
    assert main(["generate", "What is the capital of France?", "--max-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_generate_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["generate"])
    assert info.value.code == 2 and "prompt" in capsys.readouterr().err
