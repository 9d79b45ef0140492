"""What the synthetic dataset holds: its config, the classes and each class's image targets.

K classes (docs/synth.md §2): one third frequent HEADS (a plain shape in a colour, every head its own
shape/colour pair); COMMON siblings of a head (its shape and colour plus a clear pattern: stripes, dots
or a rim); RARE "bridge" classes with the shape of one head and the colour of another, so that their
confusion splits between two specific absorbers. Every class gets a target number of TRAINING images
inside its planned LVIS bucket (r: 1-10, c: 11-100, f: >100) and a VAL target: the train proportion,
raised to a floor for rare and common classes (`val_target`). `plan_classes` consumes the layout
generator first (fixed order) and returns the specs sorted by name, so category id = index + 1.
`SynthConfig` validates on construction and names the CLI option in its errors; its capacity check
(every class must fit at most MAX_CLASSES_PER_IMAGE per image, MAX_FILL of the slots) is here too.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pcb_analysis.errors import ApiMisuseError, PcbkitError

GENERATOR_VERSION = "3"
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
COMMON_MIN_IMAGES = 12
COMMON_MAX_IMAGES_TARGET = 90
RARE_MIN_IMAGES = 6  # rares 6-10 (v1: 2-10): weighted to the upper part of LVIS's 1-10 range

# Val floors (images, hence instances) per planned tier, each capped at a fraction of the val split so
# that small test splits stay feasible: 400 val images reach the full floors (10 and 30).
VAL_MIN_RARE = 10
VAL_MIN_COMMON = 30
VAL_FLOOR_FRAC_RARE = 0.025
VAL_FLOOR_FRAC_COMMON = 0.075
VAL_HEAD_SHARE = 0.5  # heads get this fraction of their train proportion in val (room for the floors)

# A rare bridge is two-toned: the colour of its colour head over most of it, the colour of its shape head
# over a class-specific fraction in [BRIDGE_FRAC_MIN, BRIDGE_FRAC_MAX] (cut by a straight line).
BRIDGE_FRAC_MIN = 0.25
BRIDGE_FRAC_MAX = 0.45

NEG_MODES = ("random", "sibling")  # how neg_category_ids are drawn (docs/synth.md §4)

_OPTION = {
    "seed": "--seed",
    "num_classes": "--classes",
    "train_images": "--train-images",
    "val_images": "--val-images",
    "size": "--size",
    "neg_mode": "--neg-mode",
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

# Patterns of common siblings (and of rare bridges once the plain bridges run out): name -> definition.
VARIANTS: dict[str, str] = {
    "striped": "with dark stripes",
    "dotted": "with light dots",
    "rimmed": "with a thick dark rim",
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
    neg_mode: str = "random"

    def __post_init__(self) -> None:
        if self.neg_mode not in NEG_MODES:
            raise PcbkitError(f"--neg-mode must be one of {', '.join(NEG_MODES)} (got {self.neg_mode!r})")
        for name in (n for n in _OPTION if n != "neg_mode"):
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
            self.num_classes, self.train_images, "train", self.train_images
        ) > _capacity(self.train_images):
            need = _min_images(self.num_classes, "train_images", self.val_images)
            raise PcbkitError(
                f"--train-images {self.train_images} is too few for {self.num_classes} classes with the LVIS "
                f"frequency thresholds (frequent classes need >100 training images): use at least {need}"
            )
        if _demand(self.num_classes, self.train_images, "val", self.val_images) > _capacity(self.val_images):
            need = _min_images(self.num_classes, "val_images", self.train_images)
            raise PcbkitError(
                f"--val-images {self.val_images} is too few to hold every one of the {self.num_classes} "
                f"classes at the training proportions and the rare/common val floors: use at least {need}"
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


def val_floor(tier: str, val_images: int) -> int:
    """Smallest number of val images of a class planned in `tier` ('f', 'c' or 'r'): VAL_MIN_RARE /
    VAL_MIN_COMMON, capped at VAL_FLOOR_FRAC_* of the val split (1 for heads, which are many anyway)."""
    if tier == "r":
        return max(1, min(VAL_MIN_RARE, int(VAL_FLOOR_FRAC_RARE * val_images)))
    if tier == "c":
        return max(1, min(VAL_MIN_COMMON, int(VAL_FLOOR_FRAC_COMMON * val_images)))
    return 1


def class_target(train_target: int, tier: str, train_images: int, split: str, split_images: int) -> int:
    """A class's image target in `split`: its train target; in val the train proportion, raised to
    `val_floor(tier)` for r and c and halved (VAL_HEAD_SHARE) for heads: val images favour rare and
    common classes (docs/synth.md §3)."""
    if split == "train":
        return train_target
    if tier == "f":
        return max(1, round(VAL_HEAD_SHARE * train_target * split_images / train_images))
    return max(val_floor(tier, split_images), split_target(train_target, train_images, split_images))


def _demand(num_classes: int, train_images: int, split: str, split_images: int) -> int:
    f, c, r = _tier_targets(num_classes, train_images)
    return sum(
        class_target(t, tier, train_images, split, split_images)
        for tier, targets in (("f", f), ("c", c), ("r", r))
        for t in targets
    )


def _capacity(split_images: int) -> float:
    return MAX_FILL * MAX_CLASSES_PER_IMAGE * split_images


def _min_images(num_classes: int, field: str, other: int) -> int:
    """Smallest train (or val) image count that passes the capacity check, the other count fixed."""
    n = MIN_TRAIN_IMAGES if field == "train_images" else 1
    while n < 10_000_000:
        train, split, images = (n, "train", n) if field == "train_images" else (other, "val", n)
        if _demand(num_classes, train, split, images) <= _capacity(images):
            return n
        n += 1 if n < 1000 else n // 100
    raise PcbkitError(f"{_OPTION[field]}: no feasible value found")  # pragma: no cover


@dataclass(frozen=True)
class ClassSpec:
    """One class: its look, planned tier, target number of training images and the heads it resembles."""

    name: str
    shape: str
    colour: str
    variant: str  # "head", "bridge", or a key of VARIANTS (a common sibling, or a patterned bridge)
    family_rank: int  # 1 for the first class of a (shape, colour) pair, 2.. for the next ones
    tier: str  # planned bucket: 'f', 'c' or 'r'
    train_target: int
    absorbers: tuple[str, ...] = ()  # names of the heads it shares shape or colour with (by design)
    colour2: str = ""  # rare bridges: the shape head's colour, painted over part of the object
    colour2_frac: float = 0.0  # the fraction of the object's area in colour2 (one value per class)

    @property
    def family(self) -> str:
        return f"{self.shape}_{self.colour}"

    def confusable_with(self, other: ClassSpec) -> bool:
        """Shares the shape or the colour of `other` (the 'siblings' of the sibling neg mode)."""
        return other.name != self.name and (other.shape == self.shape or other.colour == self.colour)


def _family_combos() -> list[tuple[str, str]]:
    """All (shape, colour) pairs, ordered so that neighbouring families differ in shape and colour."""
    colours = list(COLOURS)
    return [
        (shape, colours[(s + d) % len(colours)])
        for d in range(len(colours))
        for s, shape in enumerate(SHAPES)
    ]


def _bridges(
    rng: np.random.Generator, heads: list[tuple[str, str]], n_r: int
) -> list[tuple[int, int, str]]:
    """(shape head, colour head, variant) of each rare class. Shape head a and colour head b differ in
    both shape and colour and (shape_a, colour_b) is no head's look; each (a, b) is used once, with b
    taken among the least-used colour heads (ties broken at random), so that the rare rows spread over
    many different absorber pairs. Once the plain pairs run out, a pair is reused with a pattern."""
    n_f = len(heads)
    head_looks = set(heads)
    valid = [
        [
            b for b in range(n_f)
            if heads[b][0] != heads[a][0] and heads[b][1] != heads[a][1]
            and (heads[a][0], heads[b][1]) not in head_looks
        ]
        for a in range(n_f)
    ]
    shape_order = rng.permutation(n_f)
    colour_use = np.zeros(n_f, dtype=np.int64)
    used_looks: set[tuple[str, str, str]] = set()
    out: list[tuple[int, int, str]] = []
    for i in range(n_r):
        a = int(shape_order[i % n_f])
        if not valid[a]:  # pragma: no cover - every plan has at least two heads of different looks
            raise PcbkitError(f"internal: no bridge class possible for head {heads[a]}")
        tiebreak = rng.random(n_f)
        for variant in ("bridge", *VARIANTS):
            free = [b for b in valid[a] if (heads[a][0], heads[b][1], variant) not in used_looks]
            if free:
                b = min(free, key=lambda j: (colour_use[j], tiebreak[j]))
                break
        else:  # pragma: no cover - more rares than looks: K is capped far below this
            raise PcbkitError("internal: ran out of bridge looks")
        colour_use[b] += 1
        used_looks.add((heads[a][0], heads[b][1], variant))
        out.append((a, b, variant))
    return out


def plan_classes(cfg: SynthConfig, rng: np.random.Generator) -> list[ClassSpec]:
    """Heads, common siblings and rare bridges with their targets; sorted by name (id = index + 1)."""
    n_f, n_c, n_r = _tier_sizes(cfg.num_classes)
    f_t, c_t, r_t = _tier_targets(cfg.num_classes, cfg.train_images)
    f_t = [f_t[i] for i in rng.permutation(n_f)]
    c_t = [c_t[i] for i in rng.permutation(n_c)]
    r_t = [r_t[i] for i in rng.permutation(n_r)]
    heads = _family_combos()[:n_f]
    head_names = [f"{shape}_{colour}_head" for shape, colour in heads]
    specs = [
        ClassSpec(head_names[h], shape, colour, "head", 1, "f", f_t[h])
        for h, (shape, colour) in enumerate(heads)
    ]
    # Commons: dealt to the heads round-robin in a random order; each head's patterns in a random order.
    head_order = rng.permutation(n_f)
    patterns = list(VARIANTS)
    first_pattern = rng.integers(0, len(patterns), size=n_f)
    for k, target in enumerate(c_t):
        h = int(head_order[k % n_f])
        variant = patterns[(int(first_pattern[h]) + k // n_f) % len(patterns)]
        shape, colour = heads[h]
        rank = 2 + k // n_f
        specs.append(
            ClassSpec(
                f"{shape}_{colour}_{variant}", shape, colour, variant, rank, "c", target, (head_names[h],)
            )
        )
    looks: dict[tuple[str, str], int] = {}
    bridges = _bridges(rng, heads, n_r)
    fracs = rng.uniform(BRIDGE_FRAC_MIN, BRIDGE_FRAC_MAX, size=n_r)
    for (a, b, variant), target, frac in zip(bridges, r_t, fracs, strict=True):
        shape, colour = heads[a][0], heads[b][1]
        looks[(shape, colour)] = looks.get((shape, colour), 0) + 1
        name = f"{shape}_{colour}_{variant}"
        specs.append(
            ClassSpec(name, shape, colour, variant, looks[(shape, colour)], "r", target,
                      (head_names[a], head_names[b]), heads[a][1], round(float(frac), 3))
        )
    return sorted(specs, key=lambda s: s.name)
