"""Shared test fixtures."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pcb_analysis.synth import SynthConfig, generate
from pcbkit.cli import main

SYNTH_TINY = SynthConfig(seed=0, num_classes=12, train_images=190, val_images=40, size=64)
"""The tiny synthetic dataset of `synth_dataset`: K = 12 classes (r, c and f), 64 px images."""


@pytest.fixture()
def run_pcbkit(capsys: pytest.CaptureFixture[str]) -> Callable[[list[str]], tuple[int, str, str]]:
    """Run `pcbkit ARGS` in-process through `pcbkit.cli.main` (the console script's one-line
    error handling included); returns (exit code, stdout, stderr) of that call only."""
    def run(args: list[str]) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main(args)
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`SYNTH_TINY` written once per session (train.json, val.json, images/) and shared by the data,
    dump-logits, calibrate and train tests. Treat it as read-only: a test that needs an edited
    annotation file writes the edited copy into its own tmp_path."""
    root = tmp_path_factory.mktemp("synth_tiny")
    generate(root, SYNTH_TINY, progress=False)
    return root
