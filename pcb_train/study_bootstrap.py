"""The study's bootstrap step and the paired effects of its key comparisons.

`resample_metrics(gt, results, n, seed, cap)`: the full-data value and the values on n image resamples
(`pcb_analysis.bootstrap.draw_resamples(gt.img_ids, n, seed)`, the same for every results file of
a split) of AP, APr, APc, APf (segm) and APb (bbox AP) of one results file, and with `cap` of AP,
APr, APc, APf at `cap` detections per image (AP_cap, ...: the LVIS-equivalent budget), from
`evaluate_resamples` (matching once per file and IoU type). `bootstrap_model` caches that for every
row of one model and seed as a study step (`<work>/bootstrap/<model>.json`, keyed by the row's
results file). `paired_effects(rows, boot, pairs)` then combines, per comparison (b, a) and metric,
every seed's values into an `Effect` (`pcb_analysis.study_stats.paired_effect`): a paired
difference computed from stored resamples, equal to `bootstrap.compare` for one seed. docs/evaluation.md §7.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from pcb_analysis.atomic import write_json_atomic
from pcb_analysis.bootstrap import draw_resamples, evaluate_resamples
from pcb_analysis.errors import PcbkitError
from pcb_analysis.lvis_gt import GroundTruth, load_ground_truth
from pcb_analysis.study_stats import Effect, SeedSample, paired_effect, row_key

# name -> (IoU type, metric, capped): capped metrics are read at the LVIS-equivalent per-image cap
BOOT_METRICS: dict[str, tuple[str, str, bool]] = {
    "AP": ("segm", "AP", False), "APr": ("segm", "APr", False), "APc": ("segm", "APc", False),
    "APf": ("segm", "APf", False), "APb": ("bbox", "AP", False),
    "AP_cap": ("segm", "AP", True), "APr_cap": ("segm", "APr", True), "APc_cap": ("segm", "APc", True),
    "APf_cap": ("segm", "APf", True),
}
DEFAULT_RESAMPLES = 200  # ~4x one evaluation per results file and IoU type (docs/evaluation.md §6)
BOOT_SEED = 0  # the image resamples; fixed, so every seed and every row shares them

Key = tuple[Any, ...]


def _value(v: float | None) -> float | None:
    return None if v is None or math.isnan(v) or v <= -1 else float(v)


def resample_metrics(
    gt: GroundTruth, results: str | Path, n: int, seed: int = BOOT_SEED, cap: int | None = None
) -> dict[str, Any]:
    """{"full": {metric: value}, "resamples": {metric: [n values]}} (None where undefined); the
    capped metrics (`BOOT_METRICS`) only with `cap`, evaluated at `cap` detections per image."""
    ids = gt.img_ids
    resamples = [ids, *draw_resamples(ids, n, seed)]
    full: dict[str, float | None] = {}
    per: dict[str, list[float | None]] = {}
    # (IoU type, per-image cap): None is the standard 300
    passes = [("segm", None), ("bbox", None)] + ([("segm", cap)] if cap is not None else [])
    for iou, max_dets in passes:
        kw = {} if max_dets is None else {"max_dets": max_dets}
        values = evaluate_resamples(gt, str(results), iou, resamples, **kw)
        for name, (kind, key, at_cap) in BOOT_METRICS.items():
            if kind == iou and at_cap == (max_dets is not None):
                full[name] = _value(values[0][key])
                per[name] = [_value(v[key]) for v in values[1:]]
    return {"full": full, "resamples": per}


def bootstrap_file(rows: Sequence[Mapping[str, Any]], gt: str | Path, out: Path, n: int,
                   progress: bool = True, cap: int | None = None) -> None:
    """`resample_metrics` of every row's results file (each file once, at `cap` too) into `out`."""
    index = load_ground_truth(gt)
    files = list(dict.fromkeys(str(r["results"]) for r in rows))
    data = {}
    for f in tqdm(files, desc="bootstrap", unit="file", disable=not progress):
        data[f] = resample_metrics(index, f, n, cap=cap)
    write_json_atomic(out, {"resamples": n, "seed": BOOT_SEED, "cap": cap, "files": data})


def load_bootstrap(path: Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))["files"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise PcbkitError(f"{path}: not a bootstrap file of the study ({exc})") from exc


def _sample(a: Mapping[str, Any], b: Mapping[str, Any], m: str) -> SeedSample:
    def arr(d: Mapping[str, Any]) -> np.ndarray:
        return np.array([math.nan if v is None else v for v in d["resamples"][m]], dtype=np.float64)

    def full(d: Mapping[str, Any]) -> float:
        v = d["full"][m]
        return math.nan if v is None else float(v)

    return SeedSample(full(a), full(b), arr(a), arr(b))


def _metrics_of(files: Sequence[Mapping[str, Any]]) -> list[str]:
    """The bootstrapped metrics every file has (a bootstrap without a cap has no capped ones)."""
    return [m for m in BOOT_METRICS if all(m in f["full"] for f in files)]


def paired_effects(
    rows: Sequence[Mapping[str, Any]],
    boot: Mapping[int, Mapping[str, Any]],
    pairs: Sequence[tuple[Key, Key, str]],
) -> dict[tuple[Key, Key], dict[str, Effect]]:
    """Per comparison (b, a) and bootstrapped metric, the `Effect` over the seeds that have both rows
    (per-seed `rows` with `seed` and `results`; `boot`: seed -> results file -> `resample_metrics`)."""
    by: dict[tuple[int, Key], Mapping[str, Any]] = {(int(r.get("seed", 0)), row_key(r)): r for r in rows}
    seeds = sorted({s for s, _ in by})
    out: dict[tuple[Key, Key], dict[str, Effect]] = {}
    for b, a, _ in pairs:
        sides = []
        for s in seeds:
            ra, rb = by.get((s, a)), by.get((s, b))
            if ra is None or rb is None or s not in boot:
                continue
            fa, fb = boot[s].get(str(ra.get("results"))), boot[s].get(str(rb.get("results")))
            if fa is not None and fb is not None:
                sides.append((fa, fb))
        if sides:
            have = _metrics_of([f for pair in sides for f in pair])
            out[(b, a)] = {m: paired_effect([_sample(fa, fb, m) for fa, fb in sides]) for m in have}
    return out
