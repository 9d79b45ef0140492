"""Benchmark: training-time overhead of PCB at LVIS dimensions, on the CPU, side by side in one run.

LVIS v1: K = 1,203 foreground classes (logits [R, K+1], background = column K), 512 RoIs x 2 images
= 1,024 RoIs (25% positives), 1,024-d box-head features, RoI features [1024, 256, 7, 7].

  (1) classification step: forward + backward of the class FC layer ([1024, 1024] -> [1024, 1204])
      and its loss. Baseline: plain cross-entropy. PCB: `OnlineConfusion.update` (the shared
      `pcb_analysis.stats` math, on a ready, warm matrix) + `pcb_loss` at alpha_r = 0.4.
      Goal: PCB / CE <= 1.05.
  (1b) with `--families`: the same step for Seesaw (K+2 outputs) and EQLv2 (sigmoid K+1 outputs)
      against Seesaw + PCB (alpha_r 0.05) and EQLv2 + PCB (alpha_r 0.2): the family's loss with
      its warm statistics, plus the family's matrix update and PCB target (docs/losses.md).
      Goal: each PCB variant / its base <= 1.05.
  (2) RoI box head: forward + backward from the RoI features (with input gradient, as in a detector
      whose backbone trains) through TwoMLPHead (12544 -> 1024 -> 1024) + predictor (1204 logits,
      4 x 1203 class-specific deltas), with CE + L1 losses. Baseline: the plain head. Iterative:
      `IterativeRoIHead`, 3 weight-shared steps, step-weighted CE, L1 on the last step's deltas.
      Goal: iterative / plain <= 3.2. Also printed: the matmul-FLOP ratio of the two (what the
      three passes and the two MLPs cost by arithmetic alone) and the class-agnostic-deltas variant.

Timings are medians of `--repeats` runs after `--warmup` runs, baseline and candidate interleaved
so that drift of a shared CPU hits both alike.

    python bench/train_overhead.py [--threads N] [--repeats 15] [--head-repeats 5] [--skip-head] [--families]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timing import interleaved_medians  # noqa: E402  (bench/ is on sys.path when run as a script)
from torch import Tensor, nn  # noqa: E402

K = 1203
ROIS = 1024
POS_FRACTION = 0.25
FEAT = 1024
CHANNELS = 256
ROI = 7


def make_labels(gen: torch.Generator, gt_classes: int) -> Tensor:
    """1,024 RoI labels: 25% positives, the rest background (K).

    A detector's positives are proposals matched to the images' ground-truth objects, so their
    labels repeat a few classes: here `gt_classes` random classes (2 images x ~15 objects on
    LVIS); `gt_classes >= 256` is the worst case of every positive a different class.
    """
    labels = torch.full((ROIS,), K, dtype=torch.long)
    n_pos = int(ROIS * POS_FRACTION)
    classes = torch.randperm(K, generator=gen)[: min(gt_classes, K)]
    labels[:n_pos] = classes[torch.randint(0, len(classes), (n_pos,), generator=gen)]
    return labels[torch.randperm(ROIS, generator=gen)]


# ------------------------------------------------------------------------------ (1) cls step


def bench_cls_step(warmup: int, repeats: int, gt_classes: int) -> tuple[dict[str, float], dict[str, float]]:
    from pcb_train.pcb_loss import OnlineConfusion, pcb_loss

    gen = torch.Generator().manual_seed(0)
    fc = nn.Linear(FEAT, K + 1)
    x = torch.randn(ROIS, FEAT, generator=gen).requires_grad_(True)
    labels = make_labels(gen, gt_classes)
    conf = OnlineConfusion(K)
    # a warm, ready matrix (every class seen): rows of a random softmax, counts > 0
    conf.matrix.copy_(torch.softmax(torch.randn(K, K, generator=gen, dtype=torch.float64) * 2, dim=1))
    conf.counts.fill_(10.0)
    assert conf.ready

    def zero() -> None:
        fc.zero_grad(set_to_none=True)
        x.grad = None

    def plain() -> None:
        zero()
        F.cross_entropy(fc(x), labels).backward()

    def pcb() -> None:
        zero()
        z = fc(x)
        conf.update(z, labels)
        pcb_loss(z, labels, conf.matrix, 0.4).backward()

    def update_only() -> None:
        conf.update(z_fixed, labels)

    def loss_only() -> None:
        zl = z_fixed.detach().requires_grad_(True)
        pcb_loss(zl, labels, conf.matrix, 0.4).backward()

    def ce_only() -> None:
        zl = z_fixed.detach().requires_grad_(True)
        F.cross_entropy(zl, labels).backward()

    with torch.no_grad():
        z_fixed = fc(x)
    wall, cpu = interleaved_medians({"ce": plain, "pcb": pcb}, warmup, repeats)
    parts_wall, parts_cpu = interleaved_medians(
        {"update": update_only, "pcb_loss_fb": loss_only, "ce_loss_fb": ce_only}, warmup, repeats
    )
    return {**wall, **parts_wall}, {**cpu, **parts_cpu}


def bench_family_step(
    family_name: str, alpha_r: float, warmup: int, repeats: int, gt_classes: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Base family loss vs family + PCB (matrix update + soft targets), forward+backward of the FC."""
    from pcb_train.loss_families import build_family, num_cls_outputs

    gen = torch.Generator().manual_seed(0)
    fam = build_family(family_name, K)
    assert fam is not None
    fc = nn.Linear(FEAT, num_cls_outputs(family_name, K))
    x = torch.randn(ROIS, FEAT, generator=gen).requires_grad_(True)
    labels = make_labels(gen, gt_classes)
    conf = fam.make_confusion(0.99)
    m = torch.softmax(torch.randn(K, K, generator=gen, dtype=torch.float64) * 2, dim=1)
    conf.matrix.copy_(m if family_name == "seesaw" else m * 0.5)  # warm, ready matrix
    conf.counts.fill_(10.0)
    with torch.no_grad():  # warm statistics: a few steps of the base loss
        for _ in range(3):
            fam(fc(x), labels)

    def zero() -> None:
        fc.zero_grad(set_to_none=True)
        x.grad = None

    def base() -> None:
        zero()
        fam(fc(x), labels).backward()

    def with_pcb() -> None:
        zero()
        z = fc(x)
        conf.update(fam.matrix_logits(z), labels)
        fam(z, labels, conf.matrix, alpha_r).backward()

    return interleaved_medians({"base": base, "pcb": with_pcb}, warmup, repeats)


# ------------------------------------------------------------------------------- (2) box head


class Predictor(nn.Module):
    """[R, 1024] -> (logits [R, K+1], deltas [R, box_dim])."""

    def __init__(self, box_dim: int) -> None:
        super().__init__()
        self.cls_score = nn.Linear(FEAT, K + 1)
        self.bbox_pred = nn.Linear(FEAT, box_dim)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.cls_score(x), self.bbox_pred(x)


def two_mlp_head() -> nn.Module:
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(CHANNELS * ROI * ROI, FEAT),
        nn.ReLU(inplace=True),
        nn.Linear(FEAT, FEAT),
        nn.ReLU(inplace=True),
    )


def head_macs(box_dim: int, n_iter: int) -> float:
    """Multiply-accumulates of forward + backward (input and weight gradients: 3x forward)."""
    head = CHANNELS * ROI * ROI * FEAT + FEAT * FEAT + FEAT * (K + 1) + FEAT * box_dim
    mlps = ((K + 1) * 512 + 512 * CHANNELS) + (box_dim * 512 + 512 * ROI * ROI)
    return 3.0 * ROIS * (n_iter * head + (n_iter - 1) * mlps)


def bench_head(box_dim: int, warmup: int, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    from pcb_train.iterative_head import IterativeRoIHead, combine_step_losses

    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    box_head, predictor = two_mlp_head(), Predictor(box_dim)
    it_head = IterativeRoIHead(box_head, predictor, n_iter=3, step_weights=(0.2, 0.2, 0.6))
    feats = torch.randn(ROIS, CHANNELS, ROI, ROI, generator=gen).requires_grad_(True)
    labels = make_labels(gen, 30)
    reg_target = torch.randn(ROIS, box_dim, generator=gen) * 0.1

    def zero() -> None:
        it_head.zero_grad(set_to_none=True)
        feats.grad = None

    def plain() -> None:
        zero()
        logits, deltas = predictor(box_head(feats))
        (F.cross_entropy(logits, labels) + F.l1_loss(deltas, reg_target)).backward()

    def iterative() -> None:
        zero()
        out = it_head(feats)
        cls = combine_step_losses([F.cross_entropy(z, labels) for z in out.step_logits], it_head.step_weights)
        (cls + F.l1_loss(out.deltas, reg_target)).backward()

    return interleaved_medians({"plain": plain, "iterative": iterative}, warmup, repeats)


# ------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=21, help="timed repeats of the classification step")
    ap.add_argument("--head-repeats", type=int, default=5, help="timed repeats of the box-head benchmark")
    ap.add_argument(
        "--gt-classes",
        type=int,
        default=30,
        help="distinct classes among the positives (default 30: 2 images x ~15 objects)",
    )
    ap.add_argument("--skip-head", action="store_true", help="only the classification-step benchmark")
    ap.add_argument("--agnostic", action="store_true", help="also time class-agnostic deltas [R, 4]")
    ap.add_argument(
        "--families", action="store_true", help="also time Seesaw / EQLv2 against Seesaw + PCB / EQLv2 + PCB"
    )
    args = ap.parse_args()

    import os

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, K={K}, {ROIS} RoIs, "
        f"{int(ROIS * POS_FRACTION)} positives of <= {args.gt_classes} classes, "
        f"features {FEAT}-d / [{ROIS}, {CHANNELS}, {ROI}, {ROI}]"
    )

    t, c = bench_cls_step(args.warmup, args.repeats, args.gt_classes)
    print(
        "\n(1) classification step, forward+backward of the cls FC layer + loss (median of "
        f"{args.repeats}; wall / process CPU):"
    )
    print(f"    plain CE                        {t['ce'] * 1e3:8.2f} ms / {c['ce'] * 1e3:8.2f} ms")
    print(f"    PCB loss + online matrix update {t['pcb'] * 1e3:8.2f} ms / {c['pcb'] * 1e3:8.2f} ms")
    print(
        f"      parts: OnlineConfusion.update {t['update'] * 1e3:.2f} / {c['update'] * 1e3:.2f} ms; "
        f"pcb_loss fwd+bwd {t['pcb_loss_fb'] * 1e3:.2f} / {c['pcb_loss_fb'] * 1e3:.2f} ms; "
        f"F.cross_entropy fwd+bwd {t['ce_loss_fb'] * 1e3:.2f} / {c['ce_loss_fb'] * 1e3:.2f} ms"
    )
    for what, d in (("wall", t), ("CPU ", c)):
        ratio1 = d["pcb"] / d["ce"]
        print(
            f"    ratio PCB / CE ({what})           {ratio1:8.3f}x   (goal <= 1.05)  "
            f"{'OK' if ratio1 <= 1.05 else 'OVER'}"
        )

    if args.families:
        for family_name, alpha_r in (("seesaw", 0.05), ("eqlv2", 0.2)):
            ft, fcpu = bench_family_step(family_name, alpha_r, args.warmup, args.repeats, args.gt_classes)
            print(f"\n(1b) {family_name}: base loss vs + PCB (alpha_r {alpha_r}) (median of {args.repeats}):")
            for key, label in (("base", "base"), ("pcb", "+ PCB")):
                print(f"    {family_name} {label:<24} {ft[key] * 1e3:8.2f} ms / {fcpu[key] * 1e3:8.2f} ms")
            for what, d in (("wall", ft), ("CPU ", fcpu)):
                ratio = d["pcb"] / d["base"]
                print(
                    f"    ratio + PCB / base ({what})       {ratio:8.3f}x   (goal <= 1.05)  "
                    f"{'OK' if ratio <= 1.05 else 'OVER'}"
                )

    if args.skip_head:
        return
    dims = [("class-specific deltas [R, 4K]", 4 * K)]
    if args.agnostic:
        dims.append(("class-agnostic deltas [R, 4]", 4))
    for name, box_dim in dims:
        h, hc = bench_head(box_dim, min(args.warmup, 1), args.head_repeats)
        flops = head_macs(box_dim, 3) / head_macs(box_dim, 1)
        print(
            f"\n(2) RoI box head forward+backward from [{ROIS}, {CHANNELS}, {ROI}, {ROI}], {name} "
            f"(median of {args.head_repeats}; wall / process CPU):"
        )
        print(f"    plain head                      {h['plain'] * 1e3:8.1f} ms / {hc['plain'] * 1e3:8.1f} ms")
        print(
            f"    iterative head, 3 steps         {h['iterative'] * 1e3:8.1f} ms / "
            f"{hc['iterative'] * 1e3:8.1f} ms"
        )
        for what, d in (("wall", h), ("CPU ", hc)):
            ratio2 = d["iterative"] / d["plain"]
            print(
                f"    ratio iterative / plain ({what})  {ratio2:8.3f}x   (goal <= 3.2)  "
                f"{'OK' if ratio2 <= 3.2 else 'OVER'};  measured / FLOP ratio {ratio2 / flops:.3f}"
            )
        print(f"    matmul-FLOP ratio (3 passes + 2 x two MLPs) {flops:.3f}x")


if __name__ == "__main__":
    main()
