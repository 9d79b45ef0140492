"""`pcbkit evaluate`: LVIS metrics of a results file against LVIS ground truth."""

from __future__ import annotations

import json
import math
import time

import click

from pcb_analysis.atomic import write_json_atomic
from pcb_analysis.errors import PcbkitError
from pcb_analysis.paths import check_output_path

METRIC_ORDER = ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf")
_LABELS = {"segm": "mask", "bbox": "box", "segm_fixed": "mask fixed", "bbox_fixed": "box fixed"}


@click.command("evaluate")
@click.option(
    "--gt", "gt_path", required=True, type=click.Path(dir_okay=False),
    help="LVIS annotation file (e.g. val.json).",
)
@click.option(
    "--results", "results_path", required=True, type=click.Path(dir_okay=False),
    help="LVIS results file (JSON list).",
)
@click.option("--iou-type", type=click.Choice(["segm", "bbox", "both"]), default="both", show_default=True)
@click.option(
    "--fixed-ap", is_flag=True,
    help="Also report fixed AP (top 10,000 per class, no per-image cap).",
)
@click.option(
    "--max-dets", type=int, default=300, show_default=True,
    help="Detections per image kept by the standard protocol (highest scores); -1: no cap. Fixed AP "
         "ignores it (it has no per-image cap).",
)
@click.option(
    "--workers", type=int, default=None,
    help="Worker processes for matching (default: CPUs, at most 8).",
)
@click.option(
    "--reference", is_flag=True,
    help="Evaluate with lvis-api itself (slow) instead of pcbkit's fast path.",
)
@click.option(
    "--bootstrap", "n_boot", type=int, default=None,
    help="Also print a 95% bootstrap interval over images per metric, from N resamples (200 is usual).",
)
@click.option(
    "--compare", "other_path", type=click.Path(dir_okay=False), default=None,
    help="Print OTHER.json minus --results per metric with a paired bootstrap interval "
         "(--bootstrap N resamples, default 200).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap resamples.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
@click.option(
    "--out", type=click.Path(dir_okay=False), default=None,
    help="Also write the metrics as JSON here (atomically).",
)
def evaluate_cmd(
    gt_path: str,
    results_path: str,
    iou_type: str,
    fixed_ap: bool,
    max_dets: int,
    workers: int | None,
    reference: bool,
    n_boot: int | None,
    other_path: str | None,
    seed: int,
    as_json: bool,
    out: str | None,
) -> None:
    """Evaluate LVIS results: AP, AP50, AP75, APs/m/l, APr/c/f (mask) and APb (box)."""
    # numpy and pycocotools (behind the evaluators) load only when the command runs, not for --help
    from pcb_analysis.lvis_compat import reference_evaluate
    from pcb_analysis.lvis_eval import bootstrap, compare, evaluate, load_ground_truth, load_results

    if workers is not None and workers < 1:
        raise PcbkitError("--workers must be >= 1")
    if max_dets == 0 or max_dets < -1:
        raise PcbkitError(f"--max-dets must be >= 1, or -1 for no cap (got {max_dets})")
    if n_boot is not None and n_boot < 1:
        raise PcbkitError(f"--bootstrap must be >= 1 (got {n_boot})")
    if reference and (n_boot is not None or other_path):
        raise PcbkitError("--bootstrap / --compare use pcbkit's evaluator only; drop --reference")
    if reference and fixed_ap:
        raise PcbkitError("--fixed-ap is computed by pcbkit's evaluator only; drop --reference")
    if out:
        check_output_path(out, "--out")  # before the work, not after it
    types = ("segm", "bbox") if iou_type == "both" else (iou_type,)
    t0 = time.perf_counter()
    gt = load_ground_truth(gt_path)
    report: dict[str, dict[str, float]] = {}
    for t in types:
        if reference:  # lvis-api sees only input that passed pcbkit's checks
            load_results(results_path, gt, t)
            if t == "segm":
                gt.rles()  # checks every ground-truth segmentation
            report[t] = reference_evaluate(gt_path, results_path, t, max_dets=max_dets)
        else:
            report[t] = evaluate(gt, results_path, t, max_dets=max_dets, workers=workers)
            if fixed_ap:
                report[f"{t}_fixed"] = evaluate(gt, results_path, t, fixed=True, workers=workers)
    intervals: dict[str, dict[str, tuple[float, float, float]]] = {}
    n = 200 if n_boot is None else n_boot
    for t in types if (n_boot is not None or other_path) and not reference else ():
        if other_path:
            load_results(other_path, gt, t)  # one-line error naming the file before the long run
            intervals[f"{t} compare"] = compare(
                gt, results_path, other_path, t, n=n, seed=seed, max_dets=max_dets, workers=workers
            )
        if n_boot is not None:
            intervals[f"{t} bootstrap"] = bootstrap(
                gt, results_path, t, n=n, seed=seed, max_dets=max_dets, workers=workers
            )
    elapsed = time.perf_counter() - t0
    payload: dict[str, object] = {"gt": gt_path, "results": results_path, "metrics": report}
    if intervals:
        payload.update(compare_with=other_path, resamples=n, seed=seed, intervals=intervals)
    if out:
        write_json_atomic(out, payload, indent=2)
    if as_json:
        click.echo(json.dumps(payload if intervals else report, indent=2))
        return
    click.echo(format_table(report))
    for name, iv in intervals.items():
        what = f"{other_path} - {results_path}" if name.endswith("compare") else results_path
        click.echo(f"{name} ({what}; {n} resamples, seed {seed}, 95% interval):")
        click.echo(format_intervals(iv))
    click.echo(f"evaluated in {elapsed:.1f} s{' with lvis-api' if reference else ''}")


def format_table(report: dict[str, dict[str, float]]) -> str:
    """One row per evaluation: mask metrics, then APb (box AP) when a bbox evaluation is present."""
    lines = []
    header = f"{'eval':<12}" + "".join(f"{m:>8}" for m in METRIC_ORDER)
    lines.append(header)
    for name, metrics in report.items():
        label = _LABELS.get(name, name)
        lines.append(f"{label:<12}" + "".join(_fmt(metrics.get(m)) for m in METRIC_ORDER))
    if "bbox" in report:
        lines.append(f"APb = {_fmt(report['bbox']['AP']).strip()}")
    return "\n".join(lines)


def _fmt(v: float | None) -> str:
    if v is None or v < 0:
        return f"{'-':>8}"
    return f"{100 * v:8.2f}"


def format_intervals(iv: dict[str, tuple[float, float, float]]) -> str:
    """One line per metric: `value [low, high]` in percent (`-` where undefined)."""

    def pct(x: float) -> str:
        return "-" if math.isnan(x) or x <= -1 else f"{100 * x:.2f}"

    return "\n".join(f"  {k:<10}{pct(v):>8} [{pct(lo)}, {pct(hi)}]" for k, (v, lo, hi) in iv.items())
