"""Benchmark: overhead of `cm` calibration inside inference, Mask R-CNN R50-FPN at LVIS class count.

K = 1,203 foreground classes; logits [R, K+1], background = column K. The model is the R50-FPN
configuration of `configs/lvis_v1_r50_fpn.yaml` with random weights (nothing is downloaded),
1,000 RPN proposals per image at test time, 300 detections per image with masks.

Timed, with `TorchvisionBackend.infer` on the same images (one backbone + RPN + box-head pass
each time, then post-processing and masks per transform):

    none        {"none": identity}                  the model's own inference (the baseline)
    cm          {"cm": Calibrator("cm")}            calibrated inference: q~ = calibrate(q), then
                                                    the same post-processing (goal: cm / none <= 1.05)
    none+cm     {"none": ..., "cm": ...}            both tables from one pass (`pcbkit calibrate`)

The confusion matrix is a well-conditioned synthetic one (0.6 I + 0.4 x Dirichlet rows); its
inverse is prepared once, outside the timed calls, as `pcbkit calibrate` does. Also printed: the
calibrator alone on the pass's q [R, K+1] (float64 matmul with M^-1 [K, K]: R x K^2 multiply-adds).

Random weights make q nearly uniform (every (proposal, class) pair clears the 1e-4 threshold, so
NMS sees R x K boxes): a worst case for post-processing. `cm` clips part of that mass to 0, so its
post-processing sees fewer candidates and the end-to-end ratio can come out below 1; the printed
"calibrator alone / infer none" is the transform's own share, the figure that carries over to a
trained model. The cost of
`cm` does not depend on the image size while the network's does, so a smaller input than 800 x 1333
(the default here, for a 2-core CPU) gives an upper bound on the ratio at the paper's size.

Medians of `--repeats` interleaved runs after `--warmup` runs; wall-clock and process CPU time.

    python bench/calibrate_overhead.py [--images 2] [--size 512] [--max-size 853] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from timing import interleaved_medians  # noqa: E402  (bench/ is on sys.path when run as a script)
from torch import Tensor  # noqa: E402

K = 1203


def synthetic_confusion(k: int, seed: int = 0) -> Tensor:
    """M = 0.6 I + 0.4 D, D with Dirichlet(0.05) rows: row-stochastic, diagonally dominant (invertible)."""
    g = torch.Generator().manual_seed(seed)
    d = torch._standard_gamma(torch.full((k, k), 0.05, dtype=torch.float64), generator=g)
    d = d / d.sum(dim=1, keepdim=True)
    return 0.6 * torch.eye(k, dtype=torch.float64) + 0.4 * d


def r50_fpn_backend(config: str, size: int, max_size: int, threads: int = 0) -> Any:
    """The R50-FPN backend of `configs/<config>` at test size `size` x `max_size`, random weights
    (seed 0), in eval mode; `threads` > 0 sets torch's thread count first."""
    from pcb_train.backends import build_backend
    from pcb_train.config import load_config

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = load_config(
        ROOT / "configs" / config, [f"model.min_size={size}", f"model.max_size={max_size}"]
    ).model
    backend = build_backend(cfg)
    backend.model.eval()
    return backend


def smooth_images(n: int, h: int, w: int, seed: int = 0) -> list[Tensor]:
    """Images [3, h, w] in [0, 1] with structure (upsampled noise), not pure pixel noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        small = torch.rand(1, 3, max(h // 16, 1), max(w // 16, 1), generator=g)
        out.append(
            torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)[0]
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=2, help="images per inference call")
    ap.add_argument("--size", type=int, default=512, help="image short side (model.min_size)")
    ap.add_argument("--max-size", type=int, default=853, help="image long side (model.max_size)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()

    from pcb_analysis.calibration import Calibrator
    from pcb_train.backends import identity

    backend = r50_fpn_backend("lvis_v1_r50_fpn.yaml", args.size, args.max_size, args.threads)
    assert backend.num_classes == K
    images = smooth_images(args.images, args.size, args.max_size)
    cal = Calibrator.build("cm", synthetic_confusion(K))

    configs = {
        "none": {"none": identity},
        "cm": {"cm": cal},
        "none+cm": {"none": identity, "cm": cal},
    }
    dets: dict[str, int] = {}

    def run(name: str) -> Callable[[], None]:
        def fn() -> None:
            out = backend.infer(images, configs[name])
            dets[name] = sum(int(d["scores"].numel()) for per in out.values() for d in per)

        return fn

    # the calibrator alone on a realistic q: the pass's proposals
    with torch.no_grad():
        image_list, features, _ = backend._prepare(images)  # type: ignore[attr-defined]
        props, _ = backend.model.rpn(image_list, features)
        box = backend.model.roi_heads.box_predictions(features, props, image_list.image_sizes)
        q = backend.model.roi_heads.class_probabilities(box.logits)
    rows = q.shape[0]
    thresh = backend.model.roi_heads.score_thresh
    candidates = {
        "none": int((q[:, :K] > thresh).sum()),
        "cm": int((cal(q)[:, :K] > thresh).sum()),
    }

    print(
        f"R50-FPN, K={K}, random weights; {args.images} image(s) of {args.size}x{args.max_size}; "
        f"{rows} proposals; torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    t0 = time.perf_counter()
    wall, cpu = interleaved_medians({n: run(n) for n in configs}, args.warmup, args.repeats)
    cal_wall, cal_cpu = interleaved_medians({"cm": lambda: cal(q)}, 1, max(args.repeats, 3))
    for name in configs:
        print(
            f"  infer {name:<8} wall {wall[name]:7.2f} s  cpu {cpu[name]:7.2f} s  ({dets[name]} detections)"
        )
    print(
        f"  calibrator cm alone on q [{rows}, {K + 1}]: "
        f"wall {cal_wall['cm']:.3f} s  cpu {cal_cpu['cm']:.3f} s"
    )
    print(
        f"  (proposal, class) pairs above the {thresh:g} score threshold, i.e. NMS candidates: "
        f"none {candidates['none']:,}, cm {candidates['cm']:,} of {rows * K:,}"
    )
    print(
        f"ratio cm / none: wall {wall['cm'] / wall['none']:.3f}x, "
        f"cpu {cpu['cm'] / cpu['none']:.3f}x (goal <= 1.05x)"
    )
    print(
        f"calibrator alone / infer none: cpu {cal_cpu['cm'] / cpu['none']:.4f} "
        "(the transform's own cost; the rest "
        "of the difference is post-processing on fewer or more candidates)"
    )
    print(
        f"ratio (none+cm) / none: wall {wall['none+cm'] / wall['none']:.3f}x, "
        f"cpu {cpu['none+cm'] / cpu['none']:.3f}x (two tables from one pass)"
    )
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
