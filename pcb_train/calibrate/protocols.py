"""Which statistics calibrate which image: the in-sample, train and cross-fitted protocols.

A calibration's protocol (docs/calibration.md §8), recorded in metrics.json (`statistics.protocol` and
every row's `protocol`):

    in-sample      statistics of the evaluated split itself (the paper's upper bound, Table 1)
    train          statistics of the training split (Table 4)
    other-split    statistics of some other split
    cross-fitted   each image of fold i calibrated with the statistics of every image NOT in fold i
                   (`pcbkit stats --split-folds F`: `<stem>.fold<i>of<F>.npz` beside --stats)

The first three follow from `statistics_relation`. For cross-fitting, `load_cross_fit` loads and checks
the fold set and builds the SAME rows (names, slugs) once per fold; `CrossFit.transforms(fold)` gives a
fold's transforms and `CrossFit.fold_of(image_id)` the image's fold, so one inference pass serves every
fold and every row's results of all images are concatenated into one file, evaluated once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError, input_error
from pcb_analysis.folds import find_fold_files, fold_info, image_fold
from pcb_analysis.stats import ClassStats
from pcb_train.backends import ScoreTransform
from pcb_train.calibrate.options import CalibrateConfig
from pcb_train.calibrate.rows import StatRow, build_rows, load_statistics, statistics_relation, tau_prior

PROTOCOLS = ("in-sample", "train", "other-split", "cross-fitted")
_BY_RELATION = {"same-split": "in-sample", "train-split": "train", "other-split": "other-split"}


def protocol_of(relation: str, cross_fit: bool) -> str:
    """'cross-fitted' when cross-fitting, else the protocol of a `statistics_relation` relation."""
    if cross_fit:
        return "cross-fitted"
    return _BY_RELATION.get(relation, "other-split")


@dataclass(frozen=True)
class CrossFit:
    """A loaded fold set: F, seed, the files, and the rows built from each fold's statistics."""

    folds: int
    seed: int
    files: tuple[Path, ...]
    rows: tuple[tuple[StatRow, ...], ...]  # rows[i - 1]: the rows of fold i's (out-of-fold) statistics
    images: tuple[int, ...]  # out-of-fold images behind each fold's statistics

    def fold_of(self, image_id: int) -> int:
        return image_fold(image_id, self.folds, self.seed)

    def transforms(self, fold: int) -> dict[str, ScoreTransform]:
        """{slug: transform} of fold `fold` (1-based)."""
        return {row.slug: row.transform for row in self.rows[fold - 1]}

    def record(self) -> dict[str, Any]:
        """The fold set as recorded in metrics.json."""
        return {"folds": self.folds, "seed": self.seed, "files": [str(f) for f in self.files],
                "out_of_fold_images": list(self.images)}


def load_cross_fit(
    stats_path: str | Path,
    full: ClassStats,
    categories: CategorySpace,
    gt: str | Path,
    build: Callable[[ClassStats], list[StatRow]],
) -> CrossFit:
    """The fold set beside `stats_path` (`pcb_analysis.folds.find_fold_files`), each file checked
    (category space = the ground truth's, fold index / F / seed consistent, read from the same dump as
    `full`), and `build(stats)` run on each: the rows must come out with the same names in every fold."""
    files = find_fold_files(stats_path)
    folds = len(files)
    rows: list[tuple[StatRow, ...]] = []
    seeds, images = set(), []
    for i, path in enumerate(files, start=1):
        st = load_statistics(path, categories, gt)
        info = fold_info(st, path)
        if info["fold"] != i or info["folds"] != folds:
            raise input_error(path, f"field 'meta.extra.fold': says fold {info['fold']} of {info['folds']}, "
                                    f"the file name fold {i} of {folds}")
        if full.source and st.source != full.source:
            raise input_error(path, f"read from {st.source!r}, but {stats_path} from {full.source!r}")
        seeds.add(int(info["seed"]))
        images.append(int(info.get("images", 0)))
        rows.append(tuple(build(st)))
    if len(seeds) != 1:
        raise input_error(stats_path, f"its fold files disagree on the fold seed ({sorted(seeds)})")
    names = [tuple(r.slug for r in fold_rows) for fold_rows in rows]
    if len(set(names)) != 1:
        raise PcbkitError(f"cross-fitting: the fold statistics give different rows ({names})")
    return CrossFit(folds, seeds.pop(), tuple(files), tuple(rows), tuple(images))


def group_by_fold(image_ids: Sequence[int], cross: CrossFit | None) -> list[tuple[int | None, list[int]]]:
    """Positions of `image_ids` grouped by fold, folds in order, positions in order; without
    cross-fitting one group (None, every position)."""
    if cross is None:
        return [(None, list(range(len(image_ids))))]
    groups: dict[int, list[int]] = {f: [] for f in range(1, cross.folds + 1)}
    for pos, i in enumerate(image_ids):
        groups[cross.fold_of(int(i))].append(pos)
    return [(f, pos) for f, pos in groups.items() if pos]


def calibration_rows(
    cfg: CalibrateConfig, stats: ClassStats, categories: CategorySpace, split: str,
    device: Any = "cpu",
) -> tuple[list[StatRow], CrossFit | None, dict[str, Any]]:
    """A calibration's rows (of the full statistics), its fold set when cross-fitting (rows per fold),
    and the `statistics` record of its report: file, ridge, `statistics_relation`, `protocol`, and
    `cross_fit` (the fold set) or None."""
    prior = tau_prior(cfg.gt, cfg.taus, categories)

    def build(st: ClassStats) -> list[StatRow]:
        return build_rows(st, cfg.stat, ridge=cfg.ridge, gammas=cfg.gammas, taus=cfg.taus, prior=prior,
                          device=device, grids=cfg.grids, ibu_start=cfg.ibu_start,
                          ms_eq_iterations=cfg.ms_eq_iterations)

    relation = statistics_relation(stats, split, cfg.gt)
    if cfg.cross_fit and relation["relation"] != "same-split":
        raise input_error(cfg.stats, f"--cross-fit needs statistics of the evaluated split {split!r}; "
                                     f"these are {relation['relation']} ({relation['label']})")
    cross = load_cross_fit(cfg.stats, stats, categories, cfg.gt, build) if cfg.cross_fit else None
    rows = list(cross.rows[0]) if cross is not None else build(stats)
    record = {"file": str(cfg.stats), "ridge": cfg.ridge, **relation,
              "protocol": protocol_of(relation["relation"], cfg.cross_fit),
              "cross_fit": cross.record() if cross is not None else None}
    if cross is not None:
        record["label"] = (f"cross-fitted: each image calibrated with the statistics of the other "
                           f"{cross.folds - 1} fold(s) of {cross.folds}")
    return rows, cross, record
