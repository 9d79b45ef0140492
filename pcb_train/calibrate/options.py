"""The options of one calibration (`pcbkit calibrate`), checked when built.

In-model mode (the default) needs --checkpoint, --config and --images and runs the model over the
split; offline mode (`dump` set) replays a full dump with per-class boxes and takes none of those
(nor --max-images). Several in-model calibrations may share one inference pass when they agree on
everything but the statistics and the output (`SHARED_PASS_FIELDS`). Knob sweeps (`grids`, with
`ibu_start` and `ms_eq_iterations` fixed) and cross-fitting (`cross_fit`: the fold files beside `stats`)
are per calibration (docs/calibration.md §7, §8).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pcb_analysis.errors import PcbkitError
from pcb_train.calibrate.rows import DEFAULT_STATS
from pcb_train.calibrate.sweeps import DEFAULT_IBU_START, DEFAULT_MS_EQ_ITERATIONS, Grid, check_sweep

SHARED_PASS_FIELDS = ("checkpoint", "config", "gt", "images", "split", "max_images", "batch_size", "device",
                      "num_workers", "fixed_ap", "max_dets")
"""Options that must agree for several calibrations to share one inference pass."""


@dataclass(frozen=True)
class CalibrateConfig:
    """Options of `pcbkit calibrate` (in-model mode unless `dump` is given)."""

    stats: Path
    gt: Path
    out: Path
    stat: tuple[str, ...] = DEFAULT_STATS
    checkpoint: Path | None = None
    config: Path | None = None
    images: Path | None = None
    dump: Path | None = None
    split: str | None = None
    ridge: float = 0.0
    gammas: tuple[float, ...] = ()
    taus: tuple[float, ...] = ()
    max_images: int | None = None
    batch_size: int = 2
    device: str = "auto"
    num_workers: int = 0
    progress: bool = True
    fixed_ap: bool = True  # also evaluate fixed AP on uncapped per-class top-10,000 results
    # also evaluate standard AP at this per-image cap (<= the detector's; e.g. the LVIS-equivalent
    # round(300 K / 1230)), from the same results files; 300 adds nothing
    max_dets: int = 300
    grids: tuple[Grid, ...] = ()  # knob sweeps (`sweeps.parse_grids`)
    ibu_start: str = DEFAULT_IBU_START  # ibu's start in a k sweep
    ms_eq_iterations: int = DEFAULT_MS_EQ_ITERATIONS  # ms-eq's iterations in an eta sweep
    cross_fit: bool = False  # calibrate each image with the statistics of the other folds

    def __post_init__(self) -> None:
        check_sweep(self.stat, self.grids, self.ibu_start, self.ms_eq_iterations)
        if self.batch_size < 1:
            raise PcbkitError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.max_dets < 1:
            raise PcbkitError(f"--max-dets must be >= 1 (got {self.max_dets})")
        if not 0.0 <= self.ridge <= 1.0:
            raise PcbkitError(f"--ridge must be in [0, 1] (got {self.ridge})")
        if self.dump is None:
            missing = [n for n in ("checkpoint", "config", "images") if getattr(self, n) is None]
            if missing:
                raise PcbkitError(
                    "in-model mode needs " + ", ".join(f"--{m}" for m in missing)
                    + " (or --dump DIR for the offline mode)"
                )
        elif any(getattr(self, n) is not None for n in ("checkpoint", "config", "images", "max_images")):
            raise PcbkitError(
                "--dump (offline mode) takes no --checkpoint, --config, --images or --max-images"
            )
