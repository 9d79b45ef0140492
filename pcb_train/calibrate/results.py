"""The results files of one calibration's rows: streamed, evaluated, committed together.

Per row `<split>-<slug><suffix>.json`: the standard LVIS results, at most `cap` detections per
image (the detector's own cap; the entries of an image arrive sorted by score). With fixed AP,
every (uncapped) entry also goes to a per-class top-10,000 (`PerClassTop`), written at the end as
`<split>-<slug><suffix>-fixed.json` and evaluated with the fixed-AP protocol (docs/method.md §6;
docs/calibration.md §3). Nothing is renamed under its final name before every row is evaluated
and `<metrics_name>.json` / `.csv` are written; an error removes every temporary and leaves earlier
outputs as they were (`pcb_analysis.lvis_results.write_results`).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from pcb_analysis.atomic import write_json_atomic, write_text_atomic
from pcb_analysis.errors import PcbkitError, input_error
from pcb_analysis.folder_lock import folder_lock, remove_stale_temporaries
from pcb_analysis.lvis_eval import FIXED_AP_PER_CLASS, MAX_DETS, default_workers, evaluate_full
from pcb_analysis.lvis_gt import GroundTruth, load_ground_truth
from pcb_analysis.lvis_json import gc_paused
from pcb_analysis.lvis_results import PerClassTop, ResultsFile, load_results, write_results
from pcb_analysis.paths import check_name
from pcb_train.calibrate.report import CalibrationReport, table_csv
from pcb_train.calibrate.rows import StatRow

logger = logging.getLogger(__name__)

# Bumped whenever the results or metrics a calibration writes change meaning (cached study steps rerun).
RESULTS_PROTOCOL = "3: fixed AP on uncapped per-class top-10,000 results; rows carry knob, value, protocol"


def check_max_dets(max_dets: int, cap: int) -> None:
    """Refuse an extra evaluation cap above the detector's own: its results files hold no more per
    image (the default 300 is the standard evaluation itself, never refused)."""
    if max_dets != MAX_DETS and cap >= 0 and max_dets > cap:
        raise PcbkitError(
            f"--max-dets {max_dets} exceeds the detector's cap of {cap} detections per image (the results "
            "files hold no more)"
        )


def evaluate_results(
    gt_index: GroundTruth | str | Path,
    path: Path,
    iou_types: Sequence[str],
    count: int,
    fixed: tuple[Path, int] | None = None,
    max_dets: int = MAX_DETS,
    workers: int | None = None,
) -> dict[str, dict[str, float]]:
    """Standard and fixed AP per IoU type ({"segm": ..., "segm_fixed": ..., "bbox": ..., ...}).

    Standard AP on `path` (<= 300 detections per image); fixed AP on `fixed` = (path, count), the
    uncapped per-class top-10,000 results, when given (else no `_fixed` entries); with `max_dets`
    other than 300, also standard AP at that per-image cap ("segm@12", ...), read from the same
    file (each image's entries at a smaller cap are a prefix of its 300). NaN everywhere when
    there are no detections (lvis-api cannot evaluate an empty list). `workers`: the evaluator's
    matching processes (None: `default_workers()`; the metrics do not depend on it)."""
    index = load_ground_truth(gt_index)

    def parsed(p: Path) -> dict[str, Any]:
        """The results file parsed once for every IoU type (a segm parse keeps the boxes too)."""
        with gc_paused():
            first = load_results(p, index, iou_types[0])
        if bool(first.has_bbox.all()):
            return dict.fromkeys(iou_types, first)
        return {t: first if t == iou_types[0] else load_results(p, index, t) for t in iou_types}

    std = parsed(path) if count else {}
    fix = parsed(fixed[0]) if fixed is not None and fixed[1] else {}
    if count == 0:
        logger.warning("%s: no detections; its metrics are undefined", path)
    out: dict[str, dict[str, float]] = {}
    for t in iou_types:
        out[t] = evaluate_full(index, std[t], t, workers=workers).metrics if count else {"AP": float("nan")}
        if max_dets != MAX_DETS:
            out[f"{t}@{max_dets}"] = (
                evaluate_full(index, std[t], t, max_dets=max_dets, workers=workers).metrics
                if count else {"AP": float("nan")}
            )
        if fixed is not None:
            out[f"{t}_fixed"] = (
                evaluate_full(index, fix[t], t, fixed=True, workers=workers).metrics
                if fix else {"AP": float("nan")}
            )
    return out


_ROWS: tuple[GroundTruth, list[Any], Sequence[str], int] | None = None  # read by forked row evaluators


def _evaluate_row(i: int) -> dict[str, dict[str, float]]:
    assert _ROWS is not None
    index, jobs, iou_types, max_dets = _ROWS
    path, count, fixed = jobs[i]
    return evaluate_results(index, path, iou_types, count, fixed, max_dets, workers=1)


def evaluate_rows(
    gt_index: GroundTruth | str | Path,
    jobs: Sequence[tuple[Path, int, tuple[Path, int] | None]],
    iou_types: Sequence[str],
    max_dets: int = MAX_DETS,
) -> list[dict[str, dict[str, float]]]:
    """`evaluate_results` of every (path, count, fixed) job, in order: the jobs split over forked
    processes (each evaluating whole rows with one matching process) when `default_workers()` > 1,
    else one after the other; the metrics are the same either way."""
    global _ROWS
    index = load_ground_truth(gt_index)
    workers = min(default_workers(), len(jobs))
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        return [evaluate_results(index, p, iou_types, n, fixed, max_dets) for p, n, fixed in jobs]
    if "segm" in iou_types:
        index.rles()  # built once here, shared copy-on-write by the workers
    _ROWS = (index, list(jobs), tuple(iou_types), max_dets)
    try:
        with mp.get_context("fork").Pool(workers) as pool:
            return pool.map(_evaluate_row, range(len(jobs)), chunksize=1)
    finally:
        _ROWS = None


class RowResults:
    """The open results files of one calibration (one per row, and per-class tops for fixed AP)."""

    def __init__(
        self,
        stack: ExitStack,
        rows: Sequence[StatRow],
        files: dict[str, ResultsFile],
        fixed_ap: bool,
        max_dets: int = MAX_DETS,
    ) -> None:
        self._stack = stack
        self.max_dets = max_dets
        self.rows = list(rows)
        self.files = files
        self.tops = {row.slug: PerClassTop(FIXED_AP_PER_CLASS) for row in rows} if fixed_ap else None
        self.finished = False

    def add_image(self, slug: str, entries: list[dict[str, Any]], cap: int) -> None:
        """One image's LVIS entries of one row, sorted by score (uncapped with fixed AP): the first
        `cap` (all when negative) to the standard results, every one to the fixed-AP top."""
        self.files[slug].add(entries[:cap] if cap >= 0 else entries)
        if self.tops is not None:
            self.tops[slug].add(entries)

    def complete(self) -> list[tuple[Path, int, tuple[Path, int] | None]]:
        """Complete every row's files (standard, and the drained fixed-AP top); their evaluation jobs
        (path, count, fixed) in row order, for `evaluate_rows`."""
        self._done: list[tuple[StatRow, ResultsFile, ResultsFile | None]] = []
        for row in self.rows:
            f = self.files[row.slug]
            f.finish()
            fixed_file = None
            if self.tops is not None:
                target = f.target.with_name(f.target.stem + "-fixed.json")
                fixed_file = self._stack.enter_context(write_results(target))
                self.tops[row.slug].drain_into(fixed_file)
                fixed_file.finish()
            self._done.append((row, f, fixed_file))
        return [(f.tmp, f.count, (x.tmp, x.count) if x is not None else None) for _, f, x in self._done]

    def commit(
        self, report: CalibrationReport, metrics: Sequence[dict[str, dict[str, float]]], out: Path,
        metrics_name: str,
    ) -> None:
        """The rows' metrics into `report.rows`, the metrics written (JSON + CSV), the results renamed
        under their final names."""
        for (row, f, fixed_file), m in zip(self._done, metrics, strict=True):
            report.rows.append(
                {
                    "stat": row.name,
                    "family": row.family,
                    "param": row.param,
                    "knob": row.knob,
                    "value": row.param,
                    "protocol": report.statistics.get("protocol"),
                    "results": f.target.name,
                    "detections": f.count,
                    "fixed_results": fixed_file.target.name if fixed_file is not None else None,
                    "fixed_detections": fixed_file.count if fixed_file is not None else None,
                    "metrics": m,
                }
            )
        write_json_atomic(out / f"{metrics_name}.json", report.to_dict(), indent=2)
        write_text_atomic(out / f"{metrics_name}.csv", table_csv(report))
        self._stack.close()  # every results file renamed under its final name
        self.finished = True

    def finish(
        self,
        report: CalibrationReport,
        gt_index: GroundTruth | str | Path,
        iou_types: Sequence[str],
        out: Path,
        metrics_name: str,
    ) -> None:
        """Evaluate every row into `report.rows`, write the metrics (JSON + CSV), commit the results
        (`finish_all` for one calibration)."""
        finish_all([(self, report, out)], gt_index, iou_types, metrics_name)


def finish_all(
    calibrations: Sequence[tuple[RowResults, CalibrationReport, Path]],
    gt_index: GroundTruth | str | Path,
    iou_types: Sequence[str],
    metrics_name: str,
) -> None:
    """`RowResults.finish` of several calibrations of one pass (they share the ground truth and the
    extra cap), their rows evaluated together (`evaluate_rows`: forked workers when allowed). Every
    file is completed first, then every row evaluated, and only then is anything committed."""
    jobs = [results.complete() for results, _, _ in calibrations]
    flat = [job for js in jobs for job in js]
    metrics = evaluate_rows(gt_index, flat, iou_types, calibrations[0][0].max_dets) if flat else []
    start = 0
    for (results, report, out), js in zip(calibrations, jobs, strict=True):
        results.commit(report, metrics[start : start + len(js)], out, metrics_name)
        start += len(js)


@contextmanager
def open_row_results(
    out: Path, split: str, rows: Sequence[StatRow], *, fixed_ap: bool, suffix: str = "",
    max_dets: int = MAX_DETS,
) -> Iterator[RowResults]:
    """`RowResults` for `rows` under `out`; leaving the block without `finish()` keeps nothing.

    `out` is locked for the block (`pcb_analysis.folder_lock`: a second calibration writing into it
    is refused), and the temporaries that killed calibrations left there are removed first."""
    check_name(split, "split name")  # it becomes part of the file names: nothing outside `out`
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise input_error(out, f"cannot create the output folder ({err.strerror})") from err
    with ExitStack() as stack:
        stack.enter_context(folder_lock(out, "pcbkit calibrate"))
        remove_stale_temporaries(out, (f"{split}-*.json", "metrics*.json", "metrics*.csv"))
        files = {row.slug: stack.enter_context(write_results(out / f"{split}-{row.slug}{suffix}.json"))
                 for row in rows}
        results = RowResults(stack, rows, files, fixed_ap, max_dets)
        yield results
        if not results.finished:  # a caller bug: unevaluated results must not be committed
            raise RuntimeError("open_row_results: the block ended without finish()")
