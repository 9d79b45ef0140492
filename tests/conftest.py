"""Shared test fixtures."""

from __future__ import annotations

from collections.abc import Callable

import pytest


@pytest.fixture()
def run_pcbkit(capsys: pytest.CaptureFixture[str]) -> Callable[[list[str]], tuple[int, str, str]]:
    """Run `pcbkit ARGS` in-process through `pcbkit.cli.main` (the console script's one-line
    error handling included); returns (exit code, stdout, stderr) of that call only."""
    from pcbkit.cli import main

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
