"""What the synthetic dataset holds: its config, the class families and each class's image target.

K classes come in shape/colour families: one frequent head per family plus rarer siblings that differ
by one small attribute (docs/synth.md §2). Every class gets a target number of TRAINING images chosen
inside its planned LVIS bucket (r: 1-10, c: 11-100, f: >100); a split of N images scales the targets by
N / train_images (at least one image). `plan_classes` consumes the layout generator first (fixed order),
and returns the specs sorted by name, so category id = index + 1.
`SynthConfig` validates on construction and names the CLI option in its errors; its capacity check
(every class must fit at most MAX_CLASSES_PER_IMAGE per image, MAX_FILL of the slots) is here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pcb_analysis.errors import ApiMisuseError, PcbkitError

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
MAX_FILL = 0.8  # class-image slots used at most, as a fraction of images * MAX_CLASSES_PER_IMAGE

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

# ----------------------------------------------------------------------------- config


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



def frequency_bucket(image_count: int) -> str:
    """LVIS frequency of a class from its number of training images: 'r' (1-10), 'c' (11-100), 'f' (>100)."""
    if image_count < 1:
        raise ApiMisuseError(
            f"a class needs at least one training image to have a frequency (got {image_count})"
        )
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


def split_target(train_target: int, train_images: int, split_images: int) -> int:
    """A class's image target in a split of `split_images` images: train proportions, at least one."""
    return max(1, round(train_target * split_images / train_images))


def _demand(num_classes: int, train_images: int, split_images: int) -> int:
    f, c, r = _tier_targets(num_classes, train_images)
    return sum(split_target(t, train_images, split_images) for t in f + c + r)


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
class ClassSpec:
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


def plan_classes(cfg: SynthConfig, rng: np.random.Generator) -> list[ClassSpec]:
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
    specs: list[ClassSpec] = []
    for fam, (shape, colour) in enumerate(_family_combos()[:n_f]):
        specs.append(ClassSpec(f"{shape}_{colour}_head", shape, colour, "head", 1, "f", f_t[fam], 1.0))
        variants = [variant_names[i] for i in rng.permutation(len(variant_names))]
        for rank, (tier, target) in enumerate(sibling_tiers[fam]):
            variant = variants[rank]
            aspect = 1.5 if variant == "wide" else 1.0
            specs.append(
                ClassSpec(
                    f"{shape}_{colour}_{variant}", shape, colour, variant, rank + 2, tier, target, aspect
                )
            )
    return sorted(specs, key=lambda s: s.name)


