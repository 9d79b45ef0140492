"""Benchmark: time per 1,000 images of the study's model steps at the paper's scale, on this machine.

`pcbkit study` (and the paper's Table 1 reproduction) runs, per split:

    dump-logits   backbone + RPN (1,000 proposals) + RoI box head, logits of every proposal matched
                  to its ground truth (`TorchvisionBackend.proposal_records`)
    calibrate     ONE backbone + RPN + box-head pass, then post-processing and masks for each of
                  none, ms, cm, cm-bayes (`TorchvisionBackend.infer` with four transforms),
                  uncapped as `pcbkit calibrate` runs it for fixed AP (the standard results are
                  each image's top 300 of these), and the LVIS entries with RLE masks; timed three
                  ways, side by side in one run:
      all masks   every uncapped detection gets a mask (the path before the fast one)
      fast path   `pcbkit calibrate`'s path: no mask for a detection that is neither in its image's
                  first 300 nor able to enter its class's fixed-AP top 10,000 (`written_only`)
      --no-fixed-ap  300 per image, no fixed AP

How much the fast path saves depends on where in the split an image comes: a class's bar (its
10,000th-best score so far) exists only once the class has 10,000 detections, and then rises. The
bench simulates a pass over `--split-images` images (5,000: LVIS v0.5 val) from the classes' score
distributions measured on the bench images (a scores-only pass): after i images a class with
lambda detections per image has seen lambda * i of them, and its bar is the score exceeded by a
fraction 10,000 / (lambda * i) of its scores (no bar while lambda * i <= 10,000). The fast path is
timed at the midpoints of the split's four quarters; their mean estimates the per-image mean over
the whole pass. In-sample (bars from the images that are timed) and tied to this random
classifier's score distribution: an estimate of the mechanism, not a measurement on LVIS.

Model: Mask R-CNN R50-FPN of `configs/lvis_v0.5_r50_fpn_softmax_2x.yaml` (K = 1,230), test size
800 x 1333, random weights (nothing is downloaded). A random classifier makes every (proposal,
class) pair clear the 1e-4 score threshold, which no trained model does, so its box classifier is
replaced by a background-biased one (weights x 0.01, background bias 14, class biases N(0, 1.5)):
about one candidate class per proposal, the order of what a trained LVIS model passes to NMS.
The statistics (`stats`) and the LVIS evaluation cost seconds per 1,000 images (see
`bench/stats_speed.py` and `bench/eval_speed.py`) and are not timed here.

Prints seconds per image (median over the images after a warm-up image) and per 1,000 images.

    python bench/study_steps.py [--images 4] [--size 800] [--max-size 1333] [--threads N]
                                [--split-images 5000]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from calibrate_overhead import r50_fpn_backend, smooth_images, synthetic_confusion  # noqa: E402  (bench/ is on sys.path)
from torch import Tensor  # noqa: E402


def background_biased_(cls_score: torch.nn.Linear, seed: int = 0) -> None:
    """Make a random classifier [K+1 outputs, background FIRST (torchvision)] trained-like in how
    many classes clear the score threshold: weights x 0.01, background bias 14, others N(0, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        cls_score.weight.mul_(0.01)
        cls_score.bias.copy_(torch.randn(cls_score.bias.shape, generator=g) * 1.5)
        cls_score.bias[0] = 14.0


def random_targets(
    n: int, h: int, w: int, k: int, per_image: int = 12, seed: int = 0
) -> list[dict[str, Tensor]]:
    """Ground truth for `proposal_records`: `per_image` random boxes (xyxy pixels) with random labels."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        xy = torch.rand(per_image, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = (torch.rand(per_image, 2, generator=g) * 0.25 + 0.05) * torch.tensor([w, h])
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(0, k, (per_image,), generator=g)
        out.append({"boxes": boxes, "labels": labels, "image_id": torch.tensor(i)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=4, help="timed images (one more is the warm-up)")
    ap.add_argument("--size", type=int, default=800, help="test short side")
    ap.add_argument("--max-size", type=int, default=1333, help="test long side")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--split-images", type=int, default=5000,
                    help="images of the simulated split (the fast path's bars; 5,000 = LVIS v0.5 val)")
    args = ap.parse_args()

    from pcb_analysis.calibration import Calibrator
    from pcb_analysis.categories import CategorySpace
    from pcb_analysis.lvis_eval import FIXED_AP_PER_CLASS
    from pcb_train.backends import detections_to_lvis, identity
    from pcb_train.calibrate.model import written_only

    backend = r50_fpn_backend("lvis_v0.5_r50_fpn_softmax_2x.yaml", args.size, args.max_size, args.threads)
    k = backend.num_classes
    background_biased_(backend.model.roi_heads.box_predictor.cls_score)
    n = args.images + 1
    images = smooth_images(n, args.size, args.max_size)
    targets = random_targets(n, args.size, args.max_size, k)
    m = synthetic_confusion(k)
    transforms = {
        "none": identity,
        "ms": Calibrator.build("ms", torch.diagonal(m).clone()),
        "cm": Calibrator.build("cm", m),
        "cm-bayes": Calibrator.build("cm-bayes", m),
    }

    def per_image(fn: object, warm_up: bool = True) -> list[float]:
        """Seconds per timed image (images 1..n-1); image 0 runs first as a warm-up unless `warm_up`
        is False (the path ran before)."""
        times = []
        for i in range(0 if warm_up else 1, n):
            t0 = time.perf_counter()
            fn(i)  # type: ignore[operator]
            times.append(time.perf_counter() - t0)
        return times[1:] if warm_up else times

    dets: list[int] = []
    dump = per_image(lambda i: backend.proposal_records(images[i : i + 1], targets[i : i + 1]))
    cats = CategorySpace(ids=tuple(range(1, k + 1)), names=tuple(f"c{j}" for j in range(k)),
                         frequency=("f",) * k, image_count=(1,) * k)

    cap = int(backend.config.detections_per_image)
    masked: list[int] = []
    masks_all: list[int] = []

    def calibrate_one(i: int, uncapped: bool = True, bars: dict[str, Tensor] | None = None) -> None:
        """What `pcbkit calibrate` does per image: compact inference (uncapped for fixed AP, or
        300 per image with --no-fixed-ap), then LVIS entries (masks pasted and RLE-encoded once
        per (proposal, class) pair). With `bars`, the fast path's filter."""
        keep = written_only(bars.get, cap) if bars is not None else None
        out = backend.infer(images[i : i + 1], transforms, detections_per_image=-1 if uncapped else None,
                            compact_masks=True, keep=keep)
        cache: dict[int, dict] = {}
        n = sum(len(detections_to_lvis(d[0], i, cats, cache)) for d in out.values())
        if uncapped and bars is None:
            dets.append(n)
            masks_all.append(len(cache))
        if bars is not None:
            masked.append(len(cache))

    # scores-only pass: every uncapped (score, class) per statistic, no mask (the filter drops all)
    seen: dict[str, list[Tensor]] = {name: [] for name in transforms}

    def record(name: str, image: int, scores: Tensor, labels: Tensor) -> Tensor:
        seen[name].append(torch.stack([scores.double(), labels.double()], dim=1))
        return torch.zeros_like(scores, dtype=torch.bool)

    for i in range(n):
        backend.infer(images[i : i + 1], transforms, detections_per_image=-1, compact_masks=True, keep=record)

    def simulated_bars(position: float) -> dict[str, Tensor]:
        """Each class's bar after `position` images of the simulated split (see the module doc)."""
        out: dict[str, Tensor] = {}
        for name, parts in seen.items():
            sl = torch.cat(parts)
            bar = torch.full((k,), float("-inf"), dtype=torch.float64)
            for c in torch.unique(sl[:, 1]).long().tolist():
                scores = sl[sl[:, 1] == c, 0]
                so_far = scores.numel() / n * position
                if so_far > FIXED_AP_PER_CLASS:
                    bar[c] = torch.quantile(scores, 1.0 - FIXED_AP_PER_CLASS / so_far)
            out[name] = bar
        return out

    quarters = [args.split_images * (q + 0.5) / 4 for q in range(4)]
    cal_fast: list[float] = []
    masks_by_quarter: list[float] = []
    for pos in quarters:
        bars = simulated_bars(pos)
        masked.clear()
        cal_fast.append(statistics.median(per_image(lambda i, b=bars: calibrate_one(i, bars=b), False)))
        masks_by_quarter.append(statistics.mean(masked))
    cal = per_image(calibrate_one)
    cal_capped = per_image(lambda i: calibrate_one(i, uncapped=False))
    print(
        f"Mask R-CNN R50-FPN, K={k}, {args.size}x{args.max_size}, random weights with a background-biased "
        f"classifier; torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU'} (this benchmark runs on the CPU)"
    )
    fast = statistics.mean(cal_fast)
    for name, t in (
        ("dump-logits (records)", dump),
        ("calibrate, all masks (old path)", cal),
        ("calibrate, fast path (split mean)", [fast]),
        ("calibrate --no-fixed-ap", cal_capped),
    ):
        med = statistics.median(t)
        print(f"  {name:<34} {med:6.2f} s/image  -> {med * 1000 / 3600:6.2f} h per 1,000 images")
    print("  fast path at the quarters' midpoints of a "
          f"{args.split_images}-image split: " + ", ".join(f"{t:.2f}" for t in cal_fast) + " s/image")
    by_quarter = ", ".join(f"{m:.0f}" for m in masks_by_quarter)
    print(f"  uncapped detections per image, summed over the 4 statistics: {statistics.mean(dets[1:]):.0f}; "
          f"masks per image: all-masks path {statistics.mean(masks_all[1:]):.0f}, fast path by quarter "
          f"{by_quarter}")
    capped = statistics.median(cal_capped)
    print(f"  fixed AP / --no-fixed-ap: old path {statistics.median(cal) / capped:.2f}x, fast path "
          f"{fast / capped:.2f}x; old / fast {statistics.median(cal) / fast:.2f}x (one run, side by side)")


if __name__ == "__main__":
    main()
