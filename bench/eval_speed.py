"""LVIS evaluation speed: pcbkit's evaluator against lvis-api (and faster-coco-eval) on a synthetic case.

Builds (and caches under --workdir, one folder per case size) a random LVIS-format split, by
default LVIS-scale: 1,000 categories, 2,000 images and 300 detections per image with RLE masks.
Then evaluates it with lvis-api (the reference), with pcbkit (1 and N worker processes) and, when
the optional `fast-eval` extra is installed, with faster-coco-eval in its LVIS mode; each runs in a
fresh subprocess that loads the JSON files itself. Prints wall time, the lvis-api/evaluator time
ratio, peak RSS and the largest metric difference, for bbox and segm: against lvis-api for pcbkit,
against pcbkit for faster-coco-eval (same metrics, so the same numbers are expected).

faster-coco-eval (COCOeval_faster with lvis_style=True) applies the federated rules itself but
caps detections per (image, category), not per image as lvis-api does; its child therefore keeps
each image's 300 highest-scoring detections first (a stable sort by score, as lvis-api's loader),
and that time is counted.

    python bench/eval_speed.py                       # full size (several minutes, mostly lvis-api)
    python bench/eval_speed.py --size tiny           # a seconds-long check that every path runs
    python bench/eval_speed.py --images 200          # quick look (other sizes override the preset)
    python bench/eval_speed.py --bootstrap 200       # bootstrap cost: 200 resamples / one evaluation

With --bootstrap N, one fresh process per IoU type times one pcbkit evaluation and then
`bootstrap(n=N)` (matching once, N re-accumulations) side by side, and prints their ratio
(issue 12's target: <= 5x for 200 resamples); lvis-api is not run then.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MAX_DETS = 300
SIZES: dict[str, dict[str, int]] = {
    "full": {"images": 2000, "cats": 1000, "dets": 300},
    "tiny": {"images": 30, "cats": 24, "dets": 40},
}
# pcbkit metric name -> faster-coco-eval's `stats_as_dict` name (LVIS mode, maxDets [300])
FCE_KEYS: dict[str, str] = {
    "AP": "AP_all",
    "AP50": "AP_50",
    "AP75": "AP_75",
    "APs": "AP_small",
    "APm": "AP_medium",
    "APl": "AP_large",
    "APr": "APr",
    "APc": "APc",
    "APf": "APf",
    "AR@300": "AR_all",
    "ARs@300": "AR_small",
    "ARm@300": "AR_medium",
    "ARl@300": "AR_large",
}
FCE_MISSING = "not installed: pip install faster-coco-eval (or pcbkit[fast-eval])"


def fce_installed() -> bool:
    return importlib.util.find_spec("faster_coco_eval") is not None


def cap_per_image(results: list[dict[str, Any]], max_dets: int) -> list[dict[str, Any]]:
    """Each image's `max_dets` highest-scoring results (stable for ties), in input order of images."""
    by_image: dict[int, list[dict[str, Any]]] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    out: list[dict[str, Any]] = []
    for dets in by_image.values():
        out += sorted(dets, key=lambda d: d["score"], reverse=True)[:max_dets]
    return out


def fce_evaluate(gt_path: str, res_path: str, iou_type: str) -> dict[str, float]:
    """faster-coco-eval's LVIS mode on files, as pcbkit metric names (lvis-api's 300-per-image cap first)."""
    # optional dependency (the fast-eval extra): imported only when this evaluator is run
    from faster_coco_eval import COCO, COCOeval_faster

    def quiet(*_: Any, **__: Any) -> None:
        pass

    gt = COCO(gt_path)
    gt.print_function = quiet
    with open(res_path, encoding="utf-8") as f:
        results = cap_per_image(json.load(f), MAX_DETS)
    dt = gt.loadRes(results)
    ev = COCOeval_faster(gt, dt, iouType=iou_type, lvis_style=True, print_function=quiet)
    ev.params.maxDets = [MAX_DETS]
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    stats = ev.stats_as_dict
    return {ours: float(stats[theirs]) for ours, theirs in FCE_KEYS.items()}


def child(impl: str, iou_type: str, case_dir: Path, workers: int, n_boot: int) -> None:
    gt, res = str(case_dir / "gt.json"), str(case_dir / "results.json")
    t0 = time.perf_counter()
    if impl == "bootstrap":
        from pcb_analysis.lvis_eval import bootstrap, evaluate

        metrics = evaluate(gt, res, iou_type, workers=workers)
        t_eval = time.perf_counter() - t0
        t1 = time.perf_counter()
        intervals = bootstrap(gt, res, iou_type, n=n_boot, workers=workers)
        t_boot = time.perf_counter() - t1
        print(json.dumps({"eval": t_eval, "boot": t_boot, "metrics": metrics, "intervals": intervals}))
        return
    if impl == "lvis-api":
        from pcb_analysis.lvis_compat import reference_evaluate

        metrics = reference_evaluate(gt, res, iou_type)
    elif impl == "faster-coco-eval":
        metrics = fce_evaluate(gt, res, iou_type)
    else:
        from pcb_analysis.lvis_eval import evaluate

        metrics = evaluate(gt, res, iou_type, workers=workers)
    elapsed = time.perf_counter() - t0
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    out = {"time": elapsed, "metrics": metrics, "rss_mb": rss_self, "rss_workers_mb": rss_children}
    print(json.dumps(out))


def ensure_case(case_dir: Path, images: int, cats: int, dets: int, seed: int) -> None:
    meta = {"images": images, "cats": cats, "dets": dets, "seed": seed}
    meta_path = case_dir / "case.json"
    if meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        return
    from pcb_analysis.atomic import write_json_atomic
    from pcb_analysis.eval_cases import make_case

    case_dir.mkdir(parents=True, exist_ok=True)
    print(f"building case: {images} images, {cats} categories, {dets} detections/image ...", flush=True)
    t0 = time.perf_counter()
    case = make_case(
        seed=seed, num_images=images, num_cats=cats, dets_per_image=dets, crowded_images=0, size=480
    )
    write_json_atomic(case_dir / "gt.json", case.gt)
    write_json_atomic(case_dir / "results.json", case.results)
    write_json_atomic(meta_path, meta)
    print(
        f"  {len(case.gt['annotations'])} annotations, {len(case.results)} detections "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )


def run_child(impl: str, iou_type: str, case_dir: Path, workers: int, n_boot: int = 0) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", impl, "--iou-type", iou_type, "--workdir", str(case_dir)]
    cmd += ["--workers", str(workers), "--bootstrap", str(n_boot)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def max_diff(a: dict[str, float], b: dict[str, float]) -> float:
    """Largest |a[k] - b[k]| over the metrics both report."""
    return max(abs(a[k] - b[k]) for k in a if k in b)


def stat_cells(r: dict[str, Any], ref: dict[str, Any], diff: float) -> str:
    ratio = ref["time"] / r["time"]
    return f"{r['time']:8.2f} {ratio:8.2f}x {r['rss_mb']:12.0f} {r['rss_workers_mb']:14.0f} {diff:10.1e}"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="full", help="case size preset (default: full)")
    ap.add_argument("--images", type=int, help="images (overrides --size)")
    ap.add_argument("--cats", type=int, help="categories (overrides --size)")
    ap.add_argument("--dets", type=int, help="detections per image (overrides --size)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="pcbkit worker processes for the parallel run")
    ap.add_argument("--iou-types", default="bbox,segm")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pcbkit-bench-eval"))
    ap.add_argument(
        "--bootstrap", type=int, default=0, metavar="N",
        help="time bootstrap(n=N) against one evaluation instead of the evaluator comparison",
    )
    ap.add_argument(
        "--child", choices=["lvis-api", "pcbkit", "faster-coco-eval", "bootstrap"], help=argparse.SUPPRESS
    )
    ap.add_argument("--iou-type", help=argparse.SUPPRESS)
    args = ap.parse_args()
    for key, value in SIZES[args.size].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    if args.child:  # --workdir is the case folder itself here
        child(args.child, args.iou_type, args.workdir, args.workers, args.bootstrap)
        return
    case_dir = args.workdir / f"{args.images}img_{args.cats}cat_{args.dets}det_seed{args.seed}"
    ensure_case(case_dir, args.images, args.cats, args.dets, args.seed)
    if args.bootstrap > 0:
        bench_bootstrap(args, case_dir)
        return
    with_fce = fce_installed()
    rows: list[tuple[str, str, str]] = []
    for iou_type in args.iou_types.split(","):
        ref = run_child("lvis-api", iou_type, case_dir, 1)
        runs = {"lvis-api": ref}
        for w in sorted({1, args.workers}):
            runs[f"pcbkit x{w}"] = run_child("pcbkit", iou_type, case_dir, w)
        ours = runs["pcbkit x1"]
        for name, r in runs.items():
            rows.append((iou_type, name, stat_cells(r, ref, max_diff(ref["metrics"], r["metrics"]))))
        if with_fce:
            fce = run_child("faster-coco-eval", iou_type, case_dir, 1)
            cells = stat_cells(fce, ref, max_diff(fce["metrics"], ours["metrics"]))
            rows.append((iou_type, "faster-coco-eval", cells))
        else:
            rows.append((iou_type, "faster-coco-eval", FCE_MISSING))
        print(
            f"{iou_type}: AP {ref['metrics']['AP']:.4f} APr {ref['metrics']['APr']:.4f} (lvis-api)",
            flush=True,
        )
    print()
    head = f"{'time s':>8} {'speed-up':>9} {'peak RSS MB':>12} {'worker RSS MB':>14} {'max |dAP|':>10}"
    print(f"{'iou':<5} {'evaluator':<17} {head}")
    for iou_type, name, cells in rows:
        print(f"{iou_type:<5} {name:<17} {cells}")
    print(
        "\nspeed-up = lvis-api time / this evaluator's time, same files, each in a fresh process, one run"
        " each.\nmax |dAP| = largest metric difference (AP, AP50/75, APs/m/l, APr/c/f, AR@300 and its"
        " areas)\nagainst lvis-api; for faster-coco-eval against pcbkit x1."
    )


def bench_bootstrap(args: argparse.Namespace, case_dir: Path) -> None:
    boot_head = f"bootstrap({args.bootstrap}) s"
    print(f"{'iou':<5} {'evaluate s':>10} {boot_head:>18} {'ratio':>7}   AP [95% interval]")
    for iou_type in args.iou_types.split(","):
        r = run_child("bootstrap", iou_type, case_dir, args.workers, args.bootstrap)
        v, lo, hi = r["intervals"]["AP"]
        print(
            f"{iou_type:<5} {r['eval']:10.2f} {r['boot']:18.2f} {r['boot'] / r['eval']:6.2f}x"
            f"   {v:.4f} [{lo:.4f}, {hi:.4f}]",
            flush=True,
        )
    print(
        f"\nboth in one fresh process, {args.workers} worker(s), one run each; bootstrap includes its own"
        " matching pass."
    )


if __name__ == "__main__":
    main()
