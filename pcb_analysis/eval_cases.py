"""Random LVIS-format ground truth and detections for testing and benchmarking evaluators.

The cases are built to exercise every rule of LVIS evaluation: negative and not-exhaustive
category lists, images without annotations, duplicate detections, more than 300 detections per
image, tied scores, rare categories without any detection, annotations in every area range, and
categories with no ground truth in the split. Not a training dataset (see `pcb_analysis.synth`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils


@dataclass(frozen=True)
class EvalCase:
    """An LVIS ground-truth dict and a results list (boxes and RLE masks)."""

    gt: dict[str, Any]
    results: list[dict[str, Any]]


def _polygon(rng: np.random.Generator, cx: float, cy: float, r: float, n: int = 8) -> list[float]:
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = r * rng.uniform(0.6, 1.0, n)
    xs = cx + rad * np.cos(ang)
    ys = cy + rad * np.sin(ang)
    return np.round(np.stack([xs, ys], 1).reshape(-1), 2).tolist()


def _rle_json(poly: list[float], h: int, w: int) -> dict[str, Any]:
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
    return {"size": [h, w], "counts": rle["counts"].decode("ascii")}


def make_case(
    seed: int = 0,
    num_images: int = 40,
    num_cats: int = 12,
    size: int = 128,
    dets_per_image: int = 30,
    crowded_images: int = 2,
    with_masks: bool = True,
) -> EvalCase:
    """A random case; `crowded_images` images get more than 300 detections."""
    rng = np.random.default_rng(seed)
    cats = []
    freqs = ["r", "c", "f"]
    for c in range(num_cats):
        cats.append(
            {
                "id": c + 1,
                "name": f"cat_{c + 1}",
                "synset": f"cat_{c + 1}.n.01",
                "frequency": freqs[c % 3],
                "image_count": int(rng.integers(1, 500)),
                "instance_count": int(rng.integers(1, 900)),
            }
        )
    # The last category never has ground truth in this split (its AP must be excluded).
    gt_cats = np.arange(1, num_cats)
    images, anns, results = [], [], []
    ann_id = 1
    for i in range(num_images):
        img_id = 1000 + 7 * i  # non-contiguous ids, not in file order below
        h = size + int(rng.integers(0, 32))
        w = size + int(rng.integers(0, 32))
        n_obj = 0 if i % 9 == 4 else int(rng.integers(1, 7))  # some images have no annotation
        present = rng.choice(gt_cats, size=min(n_obj, 3), replace=False) if n_obj else np.zeros(0, int)
        objs = []
        for _ in range(n_obj):
            cat = int(rng.choice(present))
            # radii from 3 px to ~60 px: small, medium and large areas all occur
            r = float(rng.choice([rng.uniform(3, 8), rng.uniform(8, 30), rng.uniform(40, 110)]))
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            poly = _polygon(rng, cx, cy, r)
            rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
            area = float(mask_utils.area(rle))
            if area <= 0:
                continue
            x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            anns.append(
                {
                    "id": ann_id,
                    "image_id": img_id,
                    "category_id": cat,
                    "segmentation": [poly],
                    "bbox": [round(x, 2), round(y, 2), round(bw, 2), round(bh, 2)],
                    "area": area,
                }
            )
            objs.append((cat, poly, r))
            ann_id += 1
        present_set = {c for c, _, _ in objs}
        absent = [c for c in range(1, num_cats + 1) if c not in present_set]
        neg = sorted(int(c) for c in rng.choice(absent, size=min(3, len(absent)), replace=False))
        nel = sorted({objs[0][0]}) if objs and i % 4 == 1 else []
        images.append(
            {
                "id": img_id,
                "file_name": f"val/{img_id:012d}.png",
                "height": h,
                "width": w,
                "neg_category_ids": neg,
                "not_exhaustive_category_ids": nel,
            }
        )
        n_det = dets_per_image + (320 if i < crowded_images else 0)
        for k in range(n_det):
            kind = rng.random()
            if objs and kind < 0.5:  # jittered true positive (possibly a duplicate)
                cat, poly, r = objs[int(rng.integers(0, len(objs)))]
                p = (np.asarray(poly) + rng.normal(0, 0.08 * r, len(poly))).round(2).tolist()
                if rng.random() < 0.15:  # wrong label on a right box
                    cat = int(rng.integers(1, num_cats + 1))
            else:  # background or a negative/unlisted category
                cat = int(rng.choice(neg)) if neg and kind < 0.75 else int(rng.integers(1, num_cats + 1))
                p = _polygon(rng, rng.uniform(0, w), rng.uniform(0, h), float(rng.uniform(4, 50)))
            rle = mask_utils.merge(mask_utils.frPyObjects([p], h, w))
            if float(mask_utils.area(rle)) <= 0:
                continue
            x, y, bw, bh = (float(v) for v in mask_utils.toBbox(rle))
            # coarse scores make ties frequent
            score = round(float(rng.uniform(0.0, 1.0)), 2) if k % 3 else round(float(rng.uniform(0, 1)), 6)
            det = {"image_id": img_id, "category_id": cat, "bbox": [x, y, bw, bh], "score": score}
            if with_masks:
                det["segmentation"] = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
            results.append(det)
    order = rng.permutation(len(images))
    gt = {
        "info": {"description": "pcbkit evaluation test case"},
        "images": [images[j] for j in order],
        "annotations": anns,
        "categories": cats,
    }
    perm = rng.permutation(len(results))
    return EvalCase(gt=gt, results=[results[j] for j in perm])


def jittered_detections(
    gt: dict[str, Any], seed: int = 0, label_noise: float = 0.1, false_positives: int = 3
) -> list[dict[str, Any]]:
    """REFERENCE detections from ground truth (not a detector): every instance is detected with a
    jittered polygon, a random score, and with probability `label_noise` a wrong category; each
    image also gets `false_positives` random boxes of random categories."""
    rng = np.random.default_rng(seed)
    imgs = {im["id"]: im for im in gt["images"]}
    cat_ids = [c["id"] for c in gt["categories"]]
    out: list[dict[str, Any]] = []

    def add(img: dict[str, Any], cat: int, poly: list[float], score: float) -> None:
        h, w = int(img["height"]), int(img["width"])
        rle = mask_utils.merge(mask_utils.frPyObjects([poly], h, w))
        if float(mask_utils.area(rle)) <= 0:
            return
        x, y, bw, bh = (round(float(v), 2) for v in mask_utils.toBbox(rle))
        seg = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
        det = {"image_id": img["id"], "category_id": cat, "bbox": [x, y, bw, bh], "score": score}
        out.append({**det, "segmentation": seg})

    for ann in gt["annotations"]:
        img = imgs[ann["image_id"]]
        for poly in ann["segmentation"]:
            scale = 0.04 * max(ann["bbox"][2], ann["bbox"][3])
            p = (np.asarray(poly) + rng.normal(0, scale, len(poly))).round(2).tolist()
            cat = ann["category_id"] if rng.random() >= label_noise else int(rng.choice(cat_ids))
            add(img, cat, p, round(float(rng.uniform(0.3, 1.0)), 4))
    for img in gt["images"]:
        h, w = int(img["height"]), int(img["width"])
        for _ in range(false_positives):
            r = float(rng.uniform(0.05, 0.3)) * min(h, w)
            # one expression on purpose: the random draws happen in argument order
            add(
                img,
                int(rng.choice(cat_ids)),
                _polygon(rng, rng.uniform(0, w), rng.uniform(0, h), r),
                round(float(rng.uniform(0, 0.6)), 4),
            )
    return out
