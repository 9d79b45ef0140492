"""Does a trained torchvision-backend model SEE its rare classes? A linear probe on its box-head features.

    python scripts/feature_probe.py RUN_DIR [--l2 1e-4] [--max-iter 300]

RUN_DIR holds `config.yaml` and `model_final.pth` (a `pcbkit train` folder, non-iterative head). For every
ground-truth box of the config's train and val splits: the box-head feature [D] (RoIAlign of the GT box,
TwoMLPHead) and the model's own softmax over K+1 classes. Printed per r/c/f bucket (means over the
classes with boxes in the split):
  model  - the mean probability the model's classifier gives the true class on its GT boxes;
  probe  - the same for a multinomial logistic regression (K classes, no background, features
           standardised, L2 `--l2`, LBFGS) fitted on the train boxes' features, read on the val boxes.
A probe far above the model on rare classes says the features separate them and the classifier's
bias holds them down (docs/synth.md §7). Not a pcbkit command: a diagnostic of the demo's benchmark.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms.functional import to_tensor

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pcb_train.backends.torchvision.model import build_model, load_weights  # noqa: E402
from pcb_train.config import load_config  # noqa: E402
from pcb_train.data import load_lvis_json  # noqa: E402


def box_features(
    model: torch.nn.Module, data: dict, images: Path
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features [N, D], class index [N], model's true-class probability [N]) of every GT box of
    the LVIS dict `data`."""
    index = {c["id"]: i for i, c in enumerate(sorted(data["categories"], key=lambda c: c["id"]))}
    by_image: dict[int, list[dict]] = {}
    for a in data["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    feats, labels, probs = [], [], []
    heads = model.roi_heads
    with torch.no_grad():
        for im in data["images"]:
            anns = by_image.get(im["id"], [])
            if not anns:
                continue
            img = to_tensor(Image.open(images / im["file_name"]).convert("RGB"))
            batch, _ = model.transform([img])
            maps = model.backbone(batch.tensors)
            h, w = batch.image_sizes[0]
            scale = torch.tensor([w / img.shape[2], h / img.shape[1]] * 2)
            xywh = [a["bbox"] for a in anns]
            boxes = torch.tensor([[x, y, x + bw, y + bh] for x, y, bw, bh in xywh]) * scale
            f = heads.box_head(heads.box_roi_pool(maps, [boxes.float()], batch.image_sizes))
            logits, _ = heads.box_predictor(f)
            y = torch.tensor([index[a["category_id"]] for a in anns])
            q = F.softmax(logits, dim=1)[torch.arange(len(y)), y + 1]  # torchvision: column 0 = background
            feats.append(f.numpy())
            labels.append(y.numpy())
            probs.append(q.numpy())
    return np.concatenate(feats), np.concatenate(labels), np.concatenate(probs)


def bucket_means(p: np.ndarray, y: np.ndarray, buckets: list[str]) -> str:
    out = []
    for b in "rcf":
        per = [p[y == k].mean() for k in range(len(buckets)) if buckets[k] == b and (y == k).any()]
        out.append(f"{b} {np.mean(per):.3f}" if per else f"{b} -")
    return "  ".join(out)


def probe(xtr: np.ndarray, ytr: np.ndarray, xva: np.ndarray, yva: np.ndarray, k: int, l2: float,
          max_iter: int) -> np.ndarray:
    """Val true-class probabilities of a logistic regression fitted on the train features."""
    xt = torch.tensor(xtr, dtype=torch.float64)
    mu, sd = xt.mean(0), xt.std(0) + 1e-6
    xt, xv = (xt - mu) / sd, (torch.tensor(xva, dtype=torch.float64) - mu) / sd
    lin = torch.nn.Linear(xt.shape[1], k).double()
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=max_iter, line_search_fn="strong_wolfe")
    yt = torch.tensor(ytr)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(lin(xt), yt) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return F.softmax(lin(xv), dim=1)[torch.arange(len(yva)), torch.tensor(yva)].numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--l2", type=float, default=1e-4)
    ap.add_argument("--max-iter", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = load_config(args.run_dir / "config.yaml")
    if cfg.model.iterative_head or cfg.model.backend != "torchvision":
        sys.exit(f"{args.run_dir / 'config.yaml'}: the probe reads a plain torchvision box head")
    model = build_model(cfg.model)
    load_weights(model, args.run_dir / "model_final.pth")
    model.eval()
    train = load_lvis_json(cfg.data.train_ann)
    cats = sorted(train["categories"], key=lambda c: c["id"])
    buckets = [c["frequency"] for c in cats]
    xtr, ytr, ptr = box_features(model, train, Path(cfg.data.train_images))
    xva, yva, pva = box_features(model, load_lvis_json(cfg.data.val_ann), Path(cfg.data.val_images))
    print(f"{len(ytr)} train / {len(yva)} val GT boxes, features [{xtr.shape[1]}]")
    print(f"model, train boxes: {bucket_means(ptr, ytr, buckets)}")
    print(f"model, val boxes:   {bucket_means(pva, yva, buckets)}")
    pv = probe(xtr, ytr, xva, yva, len(cats), args.l2, args.max_iter)
    print(f"probe, val boxes:   {bucket_means(pv, yva, buckets)}   (L2 {args.l2})")


if __name__ == "__main__":
    main()
