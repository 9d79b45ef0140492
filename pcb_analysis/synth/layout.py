"""Where everything goes: object polygons, the classes of each image, and the LVIS v1 dictionaries.

One `numpy.random.Generator` seeded with `cfg.seed` drives the whole layout, consumed in a fixed order:
class plan, then train images, then val images (docs/synth.md §4). Pixel convention: origin at the
top-left corner, x right, y down, pixel (x, y) covers [x, x+1) x [y, y+1) as in pycocotools. A polygon
is a flat [x1, y1, x2, y2, ...] list of floats rounded to 2 decimals, inside the image; `bbox` is its
tight [x, y, w, h]; `area` is the pycocotools area of its mask. Image ids run 1..N (train) then
N+1..N+M (val); annotation ids continue from train into val. Category statistics (image_count,
instance_count, frequency) are counted on train and repeated unchanged in val, as in LVIS.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils

from pcb_analysis.errors import PcbkitError
from pcb_analysis.synth.plan import (
    GENERATOR_VERSION,
    MAX_CLASSES_PER_IMAGE,
    VARIANTS,
    ClassSpec,
    SynthConfig,
    class_target,
    frequency_bucket,
    plan_classes,
)

MAX_OBJECTS_PER_IMAGE = 4  # annotated instances in one image (a not-exhaustive extra comes on top)
SECOND_INSTANCE_PROB = 0.2
NOT_EXHAUSTIVE_PROB = 0.1
NEG_SIBLING_PROB = 0.6  # neg mode "sibling": chance that an absent confusable class is listed
NEG_RANDOM_EXTRA = 2  # neg mode "sibling": up to this many random absent classes on top

OBJ_MIN_FRAC = 0.15  # object extent as a fraction of the image side
OBJ_MAX_FRAC = 0.55
MAX_BOX_OVERLAP = 0.15  # intersection / smaller box area, between placed objects
PLACEMENT_TRIES = 30
SPLIT_STREAM = {"train": 0, "val": 1}  # negatives of a split: default_rng([seed, SPLIT_STREAM, NEG_STREAM])
NEG_STREAM = 2  # (render.py's pixel streams are [seed, image id, 1])


# ----------------------------------------------------------------------------- geometry


def _unit_shapes() -> dict[str, np.ndarray]:
    """Polygon vertices [V, 2] of each shape, centred at 0 and scaled to max |coordinate| = 1."""

    def circle(n: int, a0: float = 0.0) -> np.ndarray:
        t = a0 + 2 * np.pi * np.arange(n) / n
        return np.stack([np.cos(t), np.sin(t)], axis=1)

    star_r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    star_t = -np.pi / 2 + np.pi * np.arange(10) / 5
    gap = np.deg2rad(25.0)
    outer_t = np.linspace(gap, 2 * np.pi - gap, 28)
    inner_t = outer_t[::-1]
    ring = np.concatenate(
        [
            np.stack([np.cos(outer_t), np.sin(outer_t)], 1),
            0.55 * np.stack([np.cos(inner_t), np.sin(inner_t)], 1),
        ]
    )
    w = 0.32
    cross = np.array(
        [
            [-w, -1],
            [w, -1],
            [w, -w],
            [1, -w],
            [1, w],
            [w, w],
            [w, 1],
            [-w, 1],
            [-w, w],
            [-1, w],
            [-1, -w],
            [-w, -w],
        ]
    )
    shapes = {
        "disc": circle(40),
        "square": np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=float),
        "triangle": circle(3, -np.pi / 2),
        "ring": ring,
        "star": np.stack([star_r * np.cos(star_t), star_r * np.sin(star_t)], axis=1),
        "cross": cross.astype(float),
        "ellipse": circle(40) * np.array([1.0, 0.55]),
        "hexagon": circle(6),
        "diamond": np.array([[0, -1], [0.6, 0], [0, 1], [-0.6, 0]], dtype=float),
        "arrow": np.array(
            [[-1, -0.25], [0.2, -0.25], [0.2, -0.6], [1, 0], [0.2, 0.6], [0.2, 0.25], [-1, 0.25]], dtype=float
        ),
    }
    return {k: v / np.abs(v).max() for k, v in shapes.items()}


_UNIT_SHAPES = _unit_shapes()


def _box_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection of two [x0, y0, x1, y1] boxes over the smaller box's area."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return float(iw * ih / smaller)


def _place_objects(rng: np.random.Generator, size: int, specs: Sequence[ClassSpec]) -> list[list[float]]:
    """One polygon (flat [x1, y1, ...], 2 decimals) per object, inside the image, mostly not overlapping."""
    n = len(specs)
    max_frac = max(OBJ_MIN_FRAC, min(OBJ_MAX_FRAC, 0.8 / math.sqrt(n)))
    boxes: list[np.ndarray] = []
    polygons: list[list[float]] = []
    for spec in specs:
        frac = float(rng.uniform(OBJ_MIN_FRAC, max_frac))
        best: tuple[float, np.ndarray, np.ndarray] | None = None
        for attempt in range(PLACEMENT_TRIES):
            if attempt and attempt % 10 == 0:
                frac = max(OBJ_MIN_FRAC, frac * 0.85)
            aspect = float(rng.uniform(0.92, 1.08))
            theta = float(rng.uniform(0.0, 2 * np.pi))
            pts = _UNIT_SHAPES[spec.shape] * np.array([math.sqrt(aspect), 1 / math.sqrt(aspect)])
            rot = np.array([[math.cos(theta), math.sin(theta)], [-math.sin(theta), math.cos(theta)]])
            pts = pts @ rot * (frac * size / 2)
            lo, hi = pts.min(axis=0), pts.max(axis=0)
            extent = float((hi - lo).max())
            if extent > size - 2:
                pts = pts * ((size - 2) / extent)
                lo, hi = pts.min(axis=0), pts.max(axis=0)
            cx = float(rng.uniform(1 - lo[0], size - 1 - hi[0]))
            cy = float(rng.uniform(1 - lo[1], size - 1 - hi[1]))
            pts = pts + np.array([cx, cy])
            box = np.array([lo[0] + cx, lo[1] + cy, hi[0] + cx, hi[1] + cy])
            overlap = max((_box_overlap(box, b) for b in boxes), default=0.0)
            if best is None or overlap < best[0]:
                best = (overlap, pts, box)
            if overlap <= MAX_BOX_OVERLAP:
                break
        assert best is not None
        _, pts, box = best
        boxes.append(box)
        flat = np.clip(np.round(pts, 2), 0.0, float(size)).ravel()
        polygons.append([float(v) for v in flat])
    return polygons


# ----------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class PlacedObject:
    class_index: int  # index into the sorted class list (category id - 1)
    polygon: tuple[float, ...]
    annotated: bool


@dataclass(frozen=True)
class ImageLayout:
    id: int
    split: str
    objects: tuple[PlacedObject, ...]  # in drawing order (later objects are drawn on top)
    neg_category_ids: tuple[int, ...]
    not_exhaustive_category_ids: tuple[int, ...]

    @property
    def file_name(self) -> str:
        return f"{self.split}/{self.id:012d}.png"


def _assign_classes(
    rng: np.random.Generator, n_images: int, targets: Sequence[int], heads: Sequence[int]
) -> list[list[int]]:
    """Classes present in each image: exactly `targets[k]` distinct images for class k, then every
    image left empty gets one head class (heads stay frequent whatever they gain)."""
    remaining = np.full(n_images, MAX_CLASSES_PER_IMAGE, dtype=np.int64)
    members: list[list[int]] = [[] for _ in range(n_images)]
    for k in sorted(range(len(targets)), key=lambda i: (-targets[i], i)):
        avail = np.flatnonzero(remaining > 0)
        if len(avail) < targets[k]:
            raise PcbkitError(f"internal: no room for class {k} in {n_images} images")  # pragma: no cover
        weights = remaining[avail] / remaining[avail].sum()
        for i in rng.choice(avail, size=targets[k], replace=False, p=weights):
            members[int(i)].append(k)
            remaining[i] -= 1
    head_w = np.array([targets[h] for h in heads], dtype=float)
    head_w /= head_w.sum()
    for i in range(n_images):
        if not members[i]:
            members[i].append(int(heads[int(rng.choice(len(heads), p=head_w))]))
    return members


def _negatives_sibling(
    rng: np.random.Generator, specs: Sequence[ClassSpec], present: set[int]
) -> set[int]:
    """Per image: each absent class confusable with a present one (same shape or colour) with
    probability NEG_SIBLING_PROB, plus 0..NEG_RANDOM_EXTRA random absent classes (generator v1's rule)."""
    neg: set[int] = set()
    for k in range(len(specs)):
        if k in present:
            continue
        if any(specs[k].confusable_with(specs[p]) for p in present) and rng.random() < NEG_SIBLING_PROB:
            neg.add(k)
    absent = [k for k in range(len(specs)) if k not in present and k not in neg]
    n_extra = min(len(absent), int(rng.integers(0, NEG_RANDOM_EXTRA + 1)))
    neg.update(int(k) for k in rng.choice(absent, size=n_extra, replace=False))
    return neg


def _negatives_random(
    rng: np.random.Generator, n_classes: int, drawn: Sequence[set[int]], members: Sequence[Sequence[int]]
) -> list[set[int]]:
    """Per class (LVIS's way, docs/synth.md §4): a uniform random sample of the images in which the
    class is not drawn at all, as many as the images that hold it in this split."""
    neg: list[set[int]] = [set() for _ in drawn]
    for k in range(n_classes):
        n_pos = sum(1 for m in members if k in m)
        candidates = [i for i, d in enumerate(drawn) if k not in d]
        for i in rng.choice(len(candidates), size=min(n_pos, len(candidates)), replace=False):
            neg[candidates[int(i)]].add(k)
    return neg


def _layout_split(
    rng: np.random.Generator,
    cfg: SynthConfig,
    specs: Sequence[ClassSpec],
    split: str,
    first_image_id: int,
) -> list[ImageLayout]:
    n_images = cfg.train_images if split == "train" else cfg.val_images
    targets = [class_target(s.train_target, s.tier, cfg.train_images, split, n_images) for s in specs]
    heads = [k for k, s in enumerate(specs) if s.variant == "head"]
    members = _assign_classes(rng, n_images, targets, heads)
    placed: list[tuple[list[tuple[int, bool]], list[list[float]], list[int]]] = []
    for present in members:
        objects: list[tuple[int, bool]] = []
        for idx, k in enumerate(present):
            objects.append((k, True))
            still_to_add = len(present) - idx - 1
            if rng.random() < SECOND_INSTANCE_PROB and len(objects) + still_to_add < MAX_OBJECTS_PER_IMAGE:
                objects.append((k, True))
        not_exhaustive: list[int] = []
        if rng.random() < NOT_EXHAUSTIVE_PROB and len(objects) < MAX_OBJECTS_PER_IMAGE:
            k = present[int(rng.integers(len(present)))]
            objects.append((k, False))
            not_exhaustive.append(k + 1)
        objects = [objects[j] for j in rng.permutation(len(objects))]
        polygons = _place_objects(rng, cfg.size, [specs[k] for k, _ in objects])
        placed.append((objects, polygons, not_exhaustive))
    # Negatives come from their own stream, so the neg mode changes neg_category_ids and nothing else.
    neg_rng = np.random.default_rng([cfg.seed, SPLIT_STREAM[split], NEG_STREAM])
    if cfg.neg_mode == "sibling":
        negatives = [_negatives_sibling(neg_rng, specs, set(present)) for present in members]
    else:
        drawn = [{k for k, _ in objects} for objects, _, _ in placed]
        negatives = _negatives_random(neg_rng, len(specs), drawn, members)
    return [
        ImageLayout(
            id=first_image_id + i,
            split=split,
            objects=tuple(
                PlacedObject(k, tuple(p), ann) for (k, ann), p in zip(objects, polygons, strict=True)
            ),
            neg_category_ids=tuple(sorted(k + 1 for k in negatives[i])),
            not_exhaustive_category_ids=tuple(not_exhaustive),
        )
        for i, (objects, polygons, not_exhaustive) in enumerate(placed)
    ]


def layout_dataset(cfg: SynthConfig) -> tuple[list[ClassSpec], dict[str, list[ImageLayout]]]:
    rng = np.random.default_rng(cfg.seed)
    specs = plan_classes(cfg, rng)
    train = _layout_split(rng, cfg, specs, "train", 1)
    val = _layout_split(rng, cfg, specs, "val", 1 + cfg.train_images)
    return specs, {"train": train, "val": val}


# ----------------------------------------------------------------------------- LVIS dictionaries


def _annotations(images: Sequence[ImageLayout], size: int, first_ann_id: int) -> list[dict[str, Any]]:
    anns: list[dict[str, Any]] = []
    for img in images:
        objs = [o for o in img.objects if o.annotated]
        if not objs:
            continue
        rles = mask_utils.frPyObjects([list(o.polygon) for o in objs], size, size)
        areas = mask_utils.area(rles)
        for o, area in zip(objs, areas, strict=True):
            xs, ys = o.polygon[0::2], o.polygon[1::2]
            x0, y0 = min(xs), min(ys)
            anns.append(
                {
                    "id": first_ann_id + len(anns),
                    "image_id": img.id,
                    "category_id": o.class_index + 1,
                    "segmentation": [list(o.polygon)],
                    "bbox": [x0, y0, round(max(xs) - x0, 2), round(max(ys) - y0, 2)],
                    "area": float(area),
                }
            )
    return anns


def _categories(specs: Sequence[ClassSpec], train_anns: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    images_of: dict[int, set[int]] = {}
    instances: dict[int, int] = {}
    for a in train_anns:
        images_of.setdefault(a["category_id"], set()).add(a["image_id"])
        instances[a["category_id"]] = instances.get(a["category_id"], 0) + 1
    cats: list[dict[str, Any]] = []
    for k, s in enumerate(specs):
        cid = k + 1
        image_count = len(images_of.get(cid, ()))
        pattern = "plain" if s.variant in ("head", "bridge") else VARIANTS[s.variant]
        definition = f"a synthetic {s.colour} {s.shape}, {pattern}"
        if s.colour2:
            definition += f", {round(100 * s.colour2_frac)}% of it {s.colour2}"
        if s.absorbers:
            definition += f"; resembles {' and '.join(s.absorbers)}"
        cats.append(
            {
                "id": cid,
                "name": s.name,
                "synset": f"{s.family}.n.{s.family_rank:02d}",
                "synonyms": [s.name],
                "def": definition,
                "frequency": frequency_bucket(image_count),
                "image_count": image_count,
                "instance_count": instances.get(cid, 0),
            }
        )
    return cats


def _lvis_dict(
    cfg: SynthConfig,
    split: str,
    images: Sequence[ImageLayout],
    anns: list[dict[str, Any]],
    cats: list[dict[str, Any]],
) -> dict[str, Any]:
    return {
        "info": {
            "description": f"pcbkit synthetic long-tailed instance segmentation ({split} split)",
            "version": GENERATOR_VERSION,
            "pcbkit_synth": asdict(cfg),
        },
        "licenses": [],
        "images": [
            {
                "id": img.id,
                "file_name": img.file_name,
                "height": cfg.size,
                "width": cfg.size,
                "neg_category_ids": list(img.neg_category_ids),
                "not_exhaustive_category_ids": list(img.not_exhaustive_category_ids),
            }
            for img in images
        ],
        "annotations": anns,
        "categories": cats,
    }


def make_lvis_dicts(cfg: SynthConfig) -> dict[str, dict[str, Any]]:
    """The LVIS annotation dictionaries of both splits (no files, no images): {'train': ..., 'val': ...}."""
    specs, layouts = layout_dataset(cfg)
    return lvis_dicts(cfg, specs, layouts)


def lvis_dicts(
    cfg: SynthConfig, specs: Sequence[ClassSpec], layouts: Mapping[str, Sequence[ImageLayout]]
) -> dict[str, dict[str, Any]]:
    train_anns = _annotations(layouts["train"], cfg.size, 1)
    val_anns = _annotations(layouts["val"], cfg.size, 1 + len(train_anns))
    cats = _categories(specs, train_anns)
    return {
        "train": _lvis_dict(cfg, "train", layouts["train"], train_anns, cats),
        "val": _lvis_dict(cfg, "val", layouts["val"], val_anns, cats),
    }


