"""PCB's start iteration: ONE function for the trainer and the detectron2 plug-in (docs/method.md §4.3)."""

from __future__ import annotations

import pytest

from pcb_train.config import load_config
from pcb_train.schedule import DEFAULT_PCB_START_FRACTION, make_schedule, pcb_start_iteration


def test_epoch_17_of_24_starts_after_16_completed_epochs() -> None:
    # 1,000 iterations per epoch: the official start_epoch 17 (1-based) is the first iteration of
    # epoch 17, i.e. 0-based iteration 16 x 1,000 = 16,000, exactly the first lr drop of a 2x run.
    ipe = 1000.0
    assert pcb_start_iteration("epoch", 17, iters_per_epoch=ipe) == 16_000
    assert pcb_start_iteration("epoch", 1, iters_per_epoch=ipe) == 0
    assert pcb_start_iteration("epoch", 17, iters_per_epoch=None) is None
    # non-integer epoch lengths round up to the first whole iteration of that epoch
    assert pcb_start_iteration("epoch", 17, iters_per_epoch=6260.625) == 100_170
    # the default fraction is the same point of a 24-epoch run: 16/24 = 2/3
    assert pytest.approx(16 / 24) == DEFAULT_PCB_START_FRACTION
    assert pcb_start_iteration("fraction", DEFAULT_PCB_START_FRACTION, max_iter=24_000) == 16_000
    assert pcb_start_iteration("fraction", 0.5, max_iter=None) is None
    assert pcb_start_iteration("iteration", 7.0) == 7
    with pytest.raises(ValueError, match="unknown unit"):
        pcb_start_iteration("step", 3)


def test_trainer_schedule_uses_it_for_a_24_epoch_run() -> None:
    # 160 images per epoch, 16 per batch: 10 iterations per epoch, 24 epochs = 240 iterations
    cfg = load_config(
        None,
        [
            "solver.ims_per_batch=16",
            "model.pcb_loss=true",
            "model.pcb_start=17",
            "model.pcb_start_unit=epoch",
        ],
    )
    s = make_schedule(cfg.solver, cfg.model, 160.0)
    assert s.max_iter == 240 and s.pcb_start_iter == 16 * 10 == s.lr_steps[0]
    assert not s.pcb_started(159) and s.pcb_started(160)
    frac = load_config(
        None,
        [
            "solver.ims_per_batch=16",
            "model.pcb_loss=true",
            f"model.pcb_start={DEFAULT_PCB_START_FRACTION}",
            "model.pcb_start_unit=fraction",
        ],
    )
    assert make_schedule(frac.solver, frac.model, 160.0).pcb_start_iter == 160
