"""Deterministic synthetic long-tailed instance-segmentation dataset in LVIS v1 format.

Layout written by `generate(out_dir, cfg)`:
    out_dir/train.json, out_dir/val.json        LVIS v1 annotation files (written last, atomically)
    out_dir/images/train/<id:012d>.png          RGB images, `file_name` is relative to out_dir/images
    out_dir/images/val/<id:012d>.png
    out_dir/synth_config.json                   the config that produced the images (reuse guard)

Conventions
- K classes with ids 1..K, assigned in alphabetical order of name (as in LVIS). Image ids run
  1..N over train and N+1..N+M over val; annotation ids are unique across both splits (val continues
  after train).
- Pixel coordinates: origin at the top-left image corner, x to the right, y down, a pixel covers
  [x, x+1) x [y, y+1) (the COCO / pycocotools convention). Polygons are `[[x1, y1, x2, y2, ...]]`
  with floats rounded to 2 decimals and lie inside the image; `bbox = [x, y, w, h]` is the
  polygon's tight box; `area` is the polygon's mask area as pycocotools computes it
  (`frPyObjects` + `area`), and the rendered object is exactly that mask.
- Category statistics (`image_count`, `instance_count`, `frequency`) come from the TRAIN split and
  are repeated unchanged in val.json, like real LVIS. Frequency uses the LVIS thresholds:
  r = 1-10 training images, c = 11-100, f = more than 100.
- Confusable families: classes come in families of one shape and one base colour (e.g. `disc_red`).
  Each family has one frequent "head" class (`disc_red_head`) and rarer siblings that differ by one
  small attribute (hue tint, paler, darker, stripes, dots, a rim, a wider aspect ratio), e.g.
  `disc_red_striped`. The family is visible in the name and in the synset stem
  (`disc_red.n.01` is the head, `.n.02`, ... its siblings); categories carry only LVIS fields.
  Labels are never biased: any confusion a detector learns comes from similarity plus imbalance.
- Federated fields: `neg_category_ids` lists categories verified absent (mostly confusable siblings
  of the present classes, plus a few random ones); on about 10% of images one present category is
  listed in `not_exhaustive_category_ids` and one more instance of it is drawn without annotation.
- Determinism: only `numpy.random.default_rng`. The layout (annotations) comes from one generator
  seeded with `cfg.seed` and consumed in a fixed order; the pixels of image `i` come from
  `default_rng([seed, i, 1])`, so skipping an image (reuse) never changes anything else. Same config
  gives byte-identical JSON and PNG files.
"""

from __future__ import annotations

import colorsys
import functools
import io
import json
import logging
import math
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from pcb_analysis.atomic import write_json_atomic, write_with_atomic
from pcb_analysis.errors import PcbkitError

logger = logging.getLogger(__name__)

GENERATOR_VERSION = "1"
SPLITS = ("train", "val")

# LVIS frequency thresholds on the number of training images of a class.
RARE_MAX_IMAGES = 10
COMMON_MAX_IMAGES = 100

MIN_CLASSES = 6
MAX_CLASSES = 240
MIN_SIZE = 48
MIN_TRAIN_IMAGES = 150  # frequent classes need more than 100 training images
MAX_SIZE = 1024

MAX_CLASSES_PER_IMAGE = 4  # distinct annotated classes in one image
MAX_OBJECTS_PER_IMAGE = 4  # annotated instances in one image (a not-exhaustive extra comes on top)
MAX_FILL = 0.8  # class-image slots used at most, as a fraction of images * MAX_CLASSES_PER_IMAGE
SECOND_INSTANCE_PROB = 0.2
NOT_EXHAUSTIVE_PROB = 0.1
NEG_SIBLING_PROB = 0.6

OBJ_MIN_FRAC = 0.15  # object extent as a fraction of the image side
OBJ_MAX_FRAC = 0.55
MAX_BOX_OVERLAP = 0.15  # intersection / smaller box area, between placed objects
PLACEMENT_TRIES = 30

# Training-image targets per tier. Heads get more than 100 images (f), commons 11-100, rares 1-10.
HEAD_MIN_IMAGES = 110
HEAD_MAX_IMAGES = 360
COMMON_MIN_IMAGES = 14
COMMON_MAX_IMAGES_TARGET = 90
RARE_MIN_IMAGES = 2

_OPTION = {
    "seed": "--seed",
    "num_classes": "--classes",
    "train_images": "--train-images",
    "val_images": "--val-images",
    "size": "--size",
}

# Base colours as HSV in [0, 1].
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.0, 0.78, 0.86),
    "orange": (0.075, 0.8, 0.92),
    "yellow": (0.15, 0.78, 0.9),
    "green": (0.34, 0.66, 0.66),
    "cyan": (0.5, 0.7, 0.78),
    "blue": (0.62, 0.72, 0.8),
    "purple": (0.76, 0.55, 0.68),
    "magenta": (0.89, 0.62, 0.86),
}

SHAPES = ("disc", "square", "triangle", "ring", "star", "cross", "ellipse", "hexagon", "diamond", "arrow")

# Sibling variants: name -> description used in the category definition.
VARIANTS: dict[str, str] = {
    "tinted": "with a slightly shifted hue",
    "pale": "in a paler shade",
    "dark": "in a darker shade",
    "striped": "with dark stripes",
    "dotted": "with light dots",
    "rimmed": "with a dark rim",
    "wide": "stretched to a wider aspect ratio",
}

_FILE_RE = re.compile(r"^\d{12}\.png$")


# ----------------------------------------------------------------------------- config and results


@dataclass(frozen=True)
class SynthConfig:
    """What to generate. Validated on construction; a bad value raises `PcbkitError` naming the option."""

    seed: int = 0
    num_classes: int = 48
    train_images: int = 1500
    val_images: int = 400
    size: int = 128

    def __post_init__(self) -> None:
        for name in _OPTION:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise PcbkitError(f"{_OPTION[name]} must be an integer (got {value!r})")
        if self.seed < 0:
            raise PcbkitError(f"--seed must be >= 0 (got {self.seed})")
        for name in ("num_classes", "train_images", "val_images", "size"):
            if getattr(self, name) <= 0:
                raise PcbkitError(f"{_OPTION[name]} must be positive (got {getattr(self, name)})")
        if not MIN_CLASSES <= self.num_classes <= MAX_CLASSES:
            raise PcbkitError(
                f"--classes must be between {MIN_CLASSES} and {MAX_CLASSES} to form rare, common and "
                f"frequent classes in shape/colour families (got {self.num_classes})"
            )
        if not MIN_SIZE <= self.size <= MAX_SIZE:
            raise PcbkitError(f"--size must be between {MIN_SIZE} and {MAX_SIZE} pixels (got {self.size})")
        if self.train_images < MIN_TRAIN_IMAGES or _demand(
            self.num_classes, self.train_images, self.train_images
        ) > _capacity(self.train_images):
            need = _min_images(self.num_classes, "train_images", self.val_images)
            raise PcbkitError(
                f"--train-images {self.train_images} is too few for {self.num_classes} classes with the LVIS "
                f"frequency thresholds (frequent classes need >100 training images): use at least {need}"
            )
        if _demand(self.num_classes, self.train_images, self.val_images) > _capacity(self.val_images):
            need = _min_images(self.num_classes, "val_images", self.train_images)
            raise PcbkitError(
                f"--val-images {self.val_images} is too few to hold every one of the {self.num_classes} "
                f"classes at the training proportions: use at least {need}"
            )


@dataclass(frozen=True)
class SynthSummary:
    """What `generate` wrote. Counts per split are keyed by 'train' / 'val'; buckets by 'r' / 'c' / 'f'."""

    out_dir: Path
    annotation_files: Mapping[str, Path]
    image_dirs: Mapping[str, Path]
    num_images: Mapping[str, int]
    num_annotations: Mapping[str, int]
    bucket_counts: Mapping[str, int]
    images_written: int
    images_reused: int


def frequency_bucket(image_count: int) -> str:
    """LVIS frequency of a class from its number of training images: 'r' (1-10), 'c' (11-100), 'f' (>100)."""
    if image_count < 1:
        raise ValueError(f"a class needs at least one training image to have a frequency (got {image_count})")
    if image_count <= RARE_MAX_IMAGES:
        return "r"
    if image_count <= COMMON_MAX_IMAGES:
        return "c"
    return "f"


# ----------------------------------------------------------------------------- class plan


def _tier_sizes(num_classes: int) -> tuple[int, int, int]:
    """(frequent, common, rare) class counts: one third heads, the rest split between c and r."""
    n_f = num_classes // 3
    n_c = (num_classes - n_f) // 2
    return n_f, n_c, num_classes - n_f - n_c


def _tier_targets(num_classes: int, train_images: int) -> tuple[list[int], list[int], list[int]]:
    """Training-image targets per tier, sorted ascending: a geometric spread inside each LVIS bucket."""
    n_f, n_c, n_r = _tier_sizes(num_classes)
    hi_f = max(HEAD_MIN_IMAGES, min(HEAD_MAX_IMAGES, train_images // 5))
    hi_c = max(COMMON_MIN_IMAGES, min(COMMON_MAX_IMAGES_TARGET, train_images // 4))
    f = [round(x) for x in np.geomspace(HEAD_MIN_IMAGES, hi_f, n_f)]
    c = [round(x) for x in np.geomspace(COMMON_MIN_IMAGES, hi_c, n_c)]
    r = [round(x) for x in np.linspace(RARE_MIN_IMAGES, RARE_MAX_IMAGES, n_r)]
    return f, c, r


def _split_target(train_target: int, train_images: int, split_images: int) -> int:
    """A class's image target in a split of `split_images` images: train proportions, at least one."""
    return max(1, round(train_target * split_images / train_images))


def _demand(num_classes: int, train_images: int, split_images: int) -> int:
    f, c, r = _tier_targets(num_classes, train_images)
    return sum(_split_target(t, train_images, split_images) for t in f + c + r)


def _capacity(split_images: int) -> float:
    return MAX_FILL * MAX_CLASSES_PER_IMAGE * split_images


def _min_images(num_classes: int, field: str, other: int) -> int:
    """Smallest train (or val) image count that passes the capacity check, the other count fixed."""
    n = MIN_TRAIN_IMAGES if field == "train_images" else 1
    while n < 10_000_000:
        train, split = (n, n) if field == "train_images" else (other, n)
        if _demand(num_classes, train, split) <= _capacity(split):
            return n
        n += 1 if n < 1000 else n // 100
    raise PcbkitError(f"{_OPTION[field]}: no feasible value found")  # pragma: no cover


@dataclass(frozen=True)
class _ClassSpec:
    """One class: its family, look, and target number of training images."""

    name: str
    shape: str
    colour: str
    variant: str  # "head" or a key of VARIANTS
    family_rank: int  # 1 for the head, 2.. for the siblings
    tier: str  # planned bucket: 'f', 'c' or 'r'
    train_target: int
    aspect: float  # width / height before rotation

    @property
    def family(self) -> str:
        return f"{self.shape}_{self.colour}"


def _family_combos() -> list[tuple[str, str]]:
    """All (shape, colour) pairs, ordered so that neighbouring families differ in shape and colour."""
    colours = list(COLOURS)
    return [
        (shape, colours[(s + d) % len(colours)])
        for d in range(len(colours))
        for s, shape in enumerate(SHAPES)
    ]


def _plan_classes(cfg: SynthConfig, rng: np.random.Generator) -> list[_ClassSpec]:
    """Families, variants and targets; returned sorted by name (category id = index + 1)."""
    n_f, n_c, n_r = _tier_sizes(cfg.num_classes)
    f_t, c_t, r_t = _tier_targets(cfg.num_classes, cfg.train_images)
    f_t = [f_t[i] for i in rng.permutation(n_f)]
    c_t = [c_t[i] for i in rng.permutation(n_c)]
    r_t = [r_t[i] for i in rng.permutation(n_r)]
    # Deal sibling tiers to families round-robin (commons first), so each family gets one c and one r
    # when the tiers are equal in size.
    sibling_tiers: list[list[tuple[str, int]]] = [[] for _ in range(n_f)]
    family_order = rng.permutation(n_f)
    for k, item in enumerate([("c", t) for t in c_t] + [("r", t) for t in r_t]):
        sibling_tiers[family_order[k % n_f]].append(item)
    variant_names = list(VARIANTS)
    specs: list[_ClassSpec] = []
    for fam, (shape, colour) in enumerate(_family_combos()[:n_f]):
        specs.append(_ClassSpec(f"{shape}_{colour}_head", shape, colour, "head", 1, "f", f_t[fam], 1.0))
        variants = [variant_names[i] for i in rng.permutation(len(variant_names))]
        for rank, (tier, target) in enumerate(sibling_tiers[fam]):
            variant = variants[rank]
            aspect = 1.5 if variant == "wide" else 1.0
            specs.append(
                _ClassSpec(
                    f"{shape}_{colour}_{variant}", shape, colour, variant, rank + 2, tier, target, aspect
                )
            )
    return sorted(specs, key=lambda s: s.name)


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


def _place_objects(rng: np.random.Generator, size: int, specs: Sequence[_ClassSpec]) -> list[list[float]]:
    """One polygon (flat [x1, y1, ...], 2 decimals) per object, inside the image and mostly not overlapping."""
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
            aspect = spec.aspect * float(rng.uniform(0.92, 1.08))
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
class _Object:
    class_index: int  # index into the sorted class list (category id - 1)
    polygon: tuple[float, ...]
    annotated: bool


@dataclass(frozen=True)
class _ImageLayout:
    id: int
    split: str
    objects: tuple[_Object, ...]  # in drawing order (later objects are drawn on top)
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


def _layout_split(
    rng: np.random.Generator,
    cfg: SynthConfig,
    specs: Sequence[_ClassSpec],
    split: str,
    first_image_id: int,
) -> list[_ImageLayout]:
    n_images = cfg.train_images if split == "train" else cfg.val_images
    targets = [_split_target(s.train_target, cfg.train_images, n_images) for s in specs]
    heads = [k for k, s in enumerate(specs) if s.variant == "head"]
    family_members: dict[str, list[int]] = {}
    for k, s in enumerate(specs):
        family_members.setdefault(s.family, []).append(k)
    members = _assign_classes(rng, n_images, targets, heads)
    images: list[_ImageLayout] = []
    for i, present in enumerate(members):
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
        present_set = set(present)
        neg: set[int] = set()
        for fam in sorted({specs[k].family for k in present}):
            for sib in family_members[fam]:
                if sib not in present_set and rng.random() < NEG_SIBLING_PROB:
                    neg.add(sib)
        absent = [k for k in range(len(specs)) if k not in present_set and k not in neg]
        n_extra = min(len(absent), int(rng.integers(0, 3)))
        neg.update(int(k) for k in rng.choice(absent, size=n_extra, replace=False))
        images.append(
            _ImageLayout(
                id=first_image_id + i,
                split=split,
                objects=tuple(
                    _Object(k, tuple(p), ann) for (k, ann), p in zip(objects, polygons, strict=True)
                ),
                neg_category_ids=tuple(sorted(k + 1 for k in neg)),
                not_exhaustive_category_ids=tuple(not_exhaustive),
            )
        )
    return images


def _layout(cfg: SynthConfig) -> tuple[list[_ClassSpec], dict[str, list[_ImageLayout]]]:
    rng = np.random.default_rng(cfg.seed)
    specs = _plan_classes(cfg, rng)
    train = _layout_split(rng, cfg, specs, "train", 1)
    val = _layout_split(rng, cfg, specs, "val", 1 + cfg.train_images)
    return specs, {"train": train, "val": val}


# ----------------------------------------------------------------------------- LVIS dictionaries


def _annotations(images: Sequence[_ImageLayout], size: int, first_ann_id: int) -> list[dict[str, Any]]:
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


def _categories(specs: Sequence[_ClassSpec], train_anns: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    images_of: dict[int, set[int]] = {}
    instances: dict[int, int] = {}
    for a in train_anns:
        images_of.setdefault(a["category_id"], set()).add(a["image_id"])
        instances[a["category_id"]] = instances.get(a["category_id"], 0) + 1
    cats: list[dict[str, Any]] = []
    for k, s in enumerate(specs):
        cid = k + 1
        image_count = len(images_of.get(cid, ()))
        if s.variant == "head":
            definition = f"a synthetic {s.colour} {s.shape}, plain; head of the {s.family} family"
        else:
            definition = (
                f"a synthetic {s.colour} {s.shape} {VARIANTS[s.variant]}; "
                f"member of the {s.family} family, resembles {s.family}_head"
            )
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
    images: Sequence[_ImageLayout],
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
    specs, layouts = _layout(cfg)
    return _dicts_from_layout(cfg, specs, layouts)


def _dicts_from_layout(
    cfg: SynthConfig, specs: Sequence[_ClassSpec], layouts: Mapping[str, Sequence[_ImageLayout]]
) -> dict[str, dict[str, Any]]:
    train_anns = _annotations(layouts["train"], cfg.size, 1)
    val_anns = _annotations(layouts["val"], cfg.size, 1 + len(train_anns))
    cats = _categories(specs, train_anns)
    return {
        "train": _lvis_dict(cfg, "train", layouts["train"], train_anns, cats),
        "val": _lvis_dict(cfg, "val", layouts["val"], val_anns, cats),
    }


# ----------------------------------------------------------------------------- rendering


def _rgb(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))) * 255.0


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(radius):
        p = np.pad(out, 1, constant_values=False)
        out = out & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    return out


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinate grids (yy, xx), each [size, size] float64, read-only."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    yy.flags.writeable = False
    xx.flags.writeable = False
    return yy, xx


def _render(cfg: SynthConfig, img: _ImageLayout, specs: Sequence[_ClassSpec]) -> np.ndarray:
    """RGB uint8 [H, W, 3]: plain background, the objects' exact polygon masks in drawing order, then a
    smooth luminance texture (low-frequency noise and two faint waves) over everything."""
    rng = np.random.default_rng([cfg.seed, img.id, 1])
    size = cfg.size
    yy, xx = _grid(size)
    bg = _rgb(float(rng.random()), float(rng.uniform(0.0, 0.12)), float(rng.uniform(0.45, 0.8)))
    canvas = np.empty((size, size, 3))
    canvas[:] = bg
    if img.objects:
        rles = mask_utils.frPyObjects([list(o.polygon) for o in img.objects], size, size)
        with warnings.catch_warnings():  # pycocotools' decode trips a numpy 2 DeprecationWarning
            warnings.simplefilter("ignore", DeprecationWarning)
            masks = mask_utils.decode(rles).astype(bool)  # [H, W, n]
    period = max(4.0, size / 21)
    for j, obj in enumerate(img.objects):
        spec = specs[obj.class_index]
        h, s, v = COLOURS[spec.colour]
        if spec.variant == "tinted":
            h += 0.05
        elif spec.variant == "pale":
            s *= 0.55
        elif spec.variant == "dark":
            v *= 0.68
        h += rng.normal(0.0, 0.01)
        s *= rng.uniform(0.9, 1.1)
        v *= rng.uniform(0.9, 1.08)
        colour = _rgb(h, s, v)
        xs, ys = obj.polygon[0::2], obj.polygon[1::2]
        window = (
            slice(max(0, int(min(ys)) - 1), min(size, int(max(ys)) + 2)),
            slice(max(0, int(min(xs)) - 1), min(size, int(max(xs)) + 2)),
        )
        mask = masks[..., j][window]
        region = canvas[window]
        if spec.variant in ("striped", "dotted"):
            angle = rng.uniform(0.0, np.pi)
            phase = rng.uniform(0.0, 1.0, size=2)
            u = xx[window] * math.cos(angle) + yy[window] * math.sin(angle)
            if spec.variant == "striped":
                pattern = (u / period + phase[0]) % 1.0 < 0.5
                alt = colour * 0.72
            else:
                w = -xx[window] * math.sin(angle) + yy[window] * math.cos(angle)
                du = (u / (1.4 * period) + phase[0]) % 1.0 - 0.5
                dw = (w / (1.4 * period) + phase[1]) % 1.0 - 0.5
                pattern = du * du + dw * dw < 0.28**2
                alt = _rgb(h, s * 0.4, min(1.0, v + 0.25))
            region[mask] = colour
            region[mask & pattern] = alt
        else:
            region[mask] = colour
        if spec.variant == "rimmed":
            rim = mask & ~_erode(mask, max(1, round(size / 64)))
            region[rim] = colour * 0.5
    coarse = max(2, size // 4)
    noise = rng.normal(0.0, 7.0, size=(coarse, coarse)).astype(np.float32)
    texture = np.asarray(Image.fromarray(noise).resize((size, size), Image.Resampling.BILINEAR))
    for _ in range(2):
        fx, fy = rng.uniform(-3.0, 3.0, size=2)
        texture = texture + rng.uniform(2.0, 5.0) * np.sin(
            2 * np.pi * (fx * xx + fy * yy) / size + rng.uniform(0, 2 * np.pi)
        )
    canvas += texture[..., None]
    return np.clip(np.round(canvas), 0, 255).astype(np.uint8)


def _png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_bytes(target: Path, data: bytes) -> None:
    def writer(tmp: Path) -> None:
        tmp.write_bytes(data)

    write_with_atomic(target, writer)


# ----------------------------------------------------------------------------- generate


def _prepare_image_dirs(out_dir: Path, cfg: SynthConfig) -> bool:
    """Make the image folders; return True when existing PNGs were made by this very config.

    Otherwise PNGs named like ours (12 digits + .png) and stale temporaries are deleted before the new
    config marker is written, so a later rerun never reuses an image from another config.
    """
    marker = out_dir / "synth_config.json"
    current = {"generator_version": GENERATOR_VERSION, "config": asdict(cfg)}
    try:
        previous = json.loads(marker.read_text())
    except (OSError, ValueError):
        previous = None
    for split in SPLITS:
        (out_dir / "images" / split).mkdir(parents=True, exist_ok=True)
    if previous == current:
        return True
    marker.unlink(missing_ok=True)
    for split in SPLITS:
        for path in (out_dir / "images" / split).iterdir():
            if path.is_file() and (_FILE_RE.match(path.name) or path.name.endswith(".tmp")):
                path.unlink()
    write_json_atomic(marker, current, indent=2)
    return False


def generate(
    out_dir: str | Path, cfg: SynthConfig, progress: bool = True, write_images: bool = True
) -> SynthSummary:
    """Write the dataset of `cfg` under `out_dir` (see the module docstring for the layout).

    Images are written first, the two JSON files last, each atomically: a finished run is marked by
    val.json. A rerun with the same config keeps existing PNGs (they are complete by construction).
    `write_images=False` writes only the JSON files and leaves the image folders alone.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise PcbkitError(f"--out {out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PcbkitError(f"--out {out}: cannot create directory ({err.strerror})") from err
    specs, layouts = _layout(cfg)
    dicts = _dicts_from_layout(cfg, specs, layouts)
    written = reused = 0
    if write_images:
        reuse = _prepare_image_dirs(out, cfg)
        from tqdm import tqdm

        all_images = [img for split in SPLITS for img in layouts[split]]
        for img in tqdm(
            all_images, desc="synth images", unit="img", disable=not progress, dynamic_ncols=True
        ):
            target = out / "images" / img.file_name
            if reuse and target.is_file():
                reused += 1
                continue
            _write_bytes(target, _png_bytes(_render(cfg, img, specs)))
            written += 1
    files = {split: out / f"{split}.json" for split in SPLITS}
    for split in SPLITS:
        write_json_atomic(files[split], dicts[split])
    buckets = {b: 0 for b in ("r", "c", "f")}
    for cat in dicts["train"]["categories"]:
        buckets[cat["frequency"]] += 1
    logger.debug("synth: wrote %s (%d images written, %d reused)", out, written, reused)
    return SynthSummary(
        out_dir=out,
        annotation_files=files,
        image_dirs={split: out / "images" / split for split in SPLITS},
        num_images={split: len(dicts[split]["images"]) for split in SPLITS},
        num_annotations={split: len(dicts[split]["annotations"]) for split in SPLITS},
        bucket_counts=buckets,
        images_written=written,
        images_reused=reused,
    )
