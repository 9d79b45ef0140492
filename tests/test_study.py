"""Tests of the study pipeline's step cache (pcb_train.study.run_step / StepLog), without a model."""

from __future__ import annotations

import json
from pathlib import Path

from pcb_train.study import StepLog, run_step


def test_run_step_caches_by_fingerprint_and_keeps_the_step_time(tmp_path: Path) -> None:
    out = tmp_path / "out.txt"
    calls: list[int] = []

    def make() -> None:
        calls.append(1)
        out.write_text("x")

    log = StepLog()
    run_step(log, "a/b", tmp_path, {"k": 1}, [out], make, force=False)
    marker = tmp_path / ".step-a_b.json"
    rec = json.loads(marker.read_text())
    assert calls == [1] and rec["step"] == "a/b" and rec["inputs"] == {"k": 1} and rec["seconds"] >= 0
    # same inputs, outputs present: skipped, reported with the recorded time
    rec["seconds"] = 42.0
    marker.write_text(json.dumps(rec))
    log2 = StepLog()
    run_step(log2, "a/b", tmp_path, {"k": 1}, [out], make, force=False)
    assert calls == [1] and log2.times == [("a/b", 42.0, True)]
    assert log2.total == 42.0 and log2.this_run == 0.0
    assert "| a/b | 42 | cached (time of the run that made it) |" in log2.markdown()
    assert "| **total** | **42** |  |" in log2.markdown()
    # changed inputs, a missing output, or force: it runs again
    run_step(StepLog(), "a/b", tmp_path, {"k": 2}, [out], make, force=False)
    assert calls == [1, 1]
    out.unlink()
    run_step(StepLog(), "a/b", tmp_path, {"k": 2}, [out], make, force=False)
    assert calls == [1, 1, 1]
    run_step(StepLog(), "a/b", tmp_path, {"k": 2}, [out], make, force=True)
    assert calls == [1, 1, 1, 1]
    # a corrupt marker is treated as absent
    marker.write_text("{not json")
    run_step(StepLog(), "a/b", tmp_path, {"k": 2}, [out], make, force=False)
    assert calls == [1, 1, 1, 1, 1] and json.loads(marker.read_text())["inputs"] == {"k": 2}
