"""LVIS evaluation speed: pcbkit's evaluator against lvis-api on an LVIS-scale synthetic case.

Builds (and caches under --workdir) a random LVIS-format split with >= 1,000 categories,
>= 2,000 images and 300 detections per image with RLE masks, then evaluates it with lvis-api
(the reference) and with pcbkit (1 and N worker processes), each in a fresh subprocess that
loads the JSON files itself. Prints wall time, the reference/pcbkit time ratio, peak RSS and the
largest metric difference, for bbox and segm.

    python bench/eval_speed.py                       # full size (several minutes, mostly lvis-api)
    python bench/eval_speed.py --images 200          # quick look
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def child(impl: str, iou_type: str, workdir: Path, workers: int) -> None:
    gt, res = str(workdir / "gt.json"), str(workdir / "results.json")
    t0 = time.perf_counter()
    if impl == "lvis-api":
        from pcb_analysis.lvis_compat import reference_evaluate

        metrics = reference_evaluate(gt, res, iou_type)
    else:
        from pcb_analysis.lvis_eval import evaluate

        metrics = evaluate(gt, res, iou_type, workers=workers)
    elapsed = time.perf_counter() - t0
    rss_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"time": elapsed, "metrics": metrics, "rss_mb": rss_self, "rss_workers_mb": rss_children}))


def ensure_case(workdir: Path, images: int, cats: int, dets: int, seed: int) -> None:
    meta = {"images": images, "cats": cats, "dets": dets, "seed": seed}
    meta_path = workdir / "case.json"
    if meta_path.exists() and json.loads(meta_path.read_text()) == meta:
        return
    from pcb_analysis.atomic import write_json_atomic
    from pcb_analysis.eval_cases import make_case

    print(f"building case: {images} images, {cats} categories, {dets} detections/image ...", flush=True)
    t0 = time.perf_counter()
    case = make_case(seed=seed, num_images=images, num_cats=cats, dets_per_image=dets, crowded_images=0, size=480)
    write_json_atomic(workdir / "gt.json", case.gt)
    write_json_atomic(workdir / "results.json", case.results)
    write_json_atomic(meta_path, meta)
    print(
        f"  {len(case.gt['annotations'])} annotations, {len(case.results)} detections "
        f"({time.perf_counter() - t0:.0f} s)",
        flush=True,
    )


def run_child(impl: str, iou_type: str, workdir: Path, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--iou-type", iou_type, "--workdir", str(workdir)]
    cmd += ["--workers", str(workers)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--cats", type=int, default=1000)
    ap.add_argument("--dets", type=int, default=300, help="detections per image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="pcbkit worker processes for the parallel run")
    ap.add_argument("--iou-types", default="bbox,segm")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/pcbkit-bench-eval"))
    ap.add_argument("--child", choices=["lvis-api", "pcbkit"], help=argparse.SUPPRESS)
    ap.add_argument("--iou-type", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child, args.iou_type, args.workdir, args.workers)
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    ensure_case(args.workdir, args.images, args.cats, args.dets, args.seed)
    rows = []
    for iou_type in args.iou_types.split(","):
        ref = run_child("lvis-api", iou_type, args.workdir, 1)
        runs = {"lvis-api": ref}
        for w in sorted({1, args.workers}):
            runs[f"pcbkit x{w}"] = run_child("pcbkit", iou_type, args.workdir, w)
        for name, r in runs.items():
            diff = max(abs(r["metrics"][k] - ref["metrics"][k]) for k in ref["metrics"])
            rows.append((iou_type, name, r["time"], ref["time"] / r["time"], r["rss_mb"], r["rss_workers_mb"], diff))
        print(f"{iou_type}: AP {ref['metrics']['AP']:.4f} APr {ref['metrics']['APr']:.4f} (lvis-api)", flush=True)
    print()
    print(f"{'iou':<5} {'evaluator':<11} {'time s':>8} {'speed-up':>9} {'peak RSS MB':>12} {'worker RSS MB':>14} {'max |dAP|':>10}")
    for iou_type, name, t, ratio, rss, rss_w, diff in rows:
        print(f"{iou_type:<5} {name:<11} {t:8.2f} {ratio:8.2f}x {rss:12.0f} {rss_w:14.0f} {diff:10.1e}")
    print("\nspeed-up = lvis-api time / this evaluator's time, same files, each in a fresh process, one run each.")


if __name__ == "__main__":
    main()
