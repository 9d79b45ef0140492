"""Deterministic synthetic long-tailed instance-segmentation dataset in LVIS v1 format (`pcbkit synth`).

`generate(out_dir, cfg)` writes, images first and the two JSON files last (each atomically):
    out_dir/train.json, out_dir/val.json        LVIS v1 annotation files (val.json marks a finished run)
    out_dir/images/{train,val}/<id:012d>.png    RGB images; `file_name` is relative to out_dir/images
    out_dir/synth_config.json                   the config that made the images (reuse guard)
K classes, ids 1..K in alphabetical order of name: heads, patterned commons, rare bridges (plan.py);
polygons, federated fields and LVIS dicts come from layout.py, pixels from render.py. Only
`numpy.random.default_rng` is used: the same config gives byte-identical files. Design and
conventions in docs/synth.md.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from pcb_analysis.atomic import write_json_atomic, write_with_atomic
from pcb_analysis.errors import PcbkitError
from pcb_analysis.synth.layout import (
    MAX_BOX_OVERLAP,
    MAX_OBJECTS_PER_IMAGE,
    NEG_RANDOM_EXTRA,
    NEG_SIBLING_PROB,
    NOT_EXHAUSTIVE_PROB,
    OBJ_MAX_FRAC,
    OBJ_MIN_FRAC,
    PLACEMENT_TRIES,
    SECOND_INSTANCE_PROB,
    ImageLayout,
    PlacedObject,
    layout_dataset,
    lvis_dicts,
    make_lvis_dicts,
)
from pcb_analysis.synth.plan import (
    COLOURS,
    COMMON_MAX_IMAGES,
    COMMON_MAX_IMAGES_TARGET,
    COMMON_MIN_IMAGES,
    GENERATOR_VERSION,
    HEAD_MAX_IMAGES,
    HEAD_MIN_IMAGES,
    MAX_CLASSES,
    MAX_CLASSES_PER_IMAGE,
    MAX_FILL,
    MAX_SIZE,
    MIN_CLASSES,
    MIN_SIZE,
    MIN_TRAIN_IMAGES,
    NEG_MODES,
    RARE_MAX_IMAGES,
    RARE_MIN_IMAGES,
    SHAPES,
    SPLITS,
    VAL_MIN_COMMON,
    VAL_MIN_RARE,
    VARIANTS,
    ClassSpec,
    SynthConfig,
    class_target,
    frequency_bucket,
    plan_classes,
    val_floor,
)
from pcb_analysis.synth.render import png_bytes, render_image

# The single-module version's private names. `generate` calls `_render` through this module's globals,
# so a test can patch `pcb_analysis.synth._render` (e.g. to interrupt a run after a few images).
_layout = layout_dataset
_render = render_image

__all__ = [
    "COLOURS", "COMMON_MAX_IMAGES", "COMMON_MAX_IMAGES_TARGET", "COMMON_MIN_IMAGES", "GENERATOR_VERSION",
    "HEAD_MAX_IMAGES", "HEAD_MIN_IMAGES", "MAX_BOX_OVERLAP", "MAX_CLASSES", "MAX_CLASSES_PER_IMAGE",
    "MAX_FILL", "MAX_OBJECTS_PER_IMAGE", "MAX_SIZE", "MIN_CLASSES", "MIN_SIZE", "MIN_TRAIN_IMAGES",
    "NEG_MODES", "NEG_RANDOM_EXTRA", "NEG_SIBLING_PROB", "NOT_EXHAUSTIVE_PROB", "OBJ_MAX_FRAC",
    "OBJ_MIN_FRAC", "PLACEMENT_TRIES", "RARE_MAX_IMAGES", "RARE_MIN_IMAGES", "SECOND_INSTANCE_PROB",
    "SHAPES", "SPLITS", "VAL_MIN_COMMON", "VAL_MIN_RARE", "VARIANTS", "ClassSpec", "ImageLayout",
    "PlacedObject", "SynthConfig", "SynthSummary", "class_target", "frequency_bucket", "generate",
    "layout_dataset", "lvis_dicts", "make_lvis_dicts", "plan_classes", "png_bytes", "render_image",
    "val_floor",
]

logger = logging.getLogger(__name__)

_FILE_RE = re.compile(r"^\d{12}\.png$")  # our PNG names: stale ones are deleted on a config change



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
    """Write the dataset of `cfg` under `out_dir` (layout: module docstring; docs/synth.md §1).

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
    specs, layouts = layout_dataset(cfg)
    dicts = lvis_dicts(cfg, specs, layouts)
    written = reused = 0
    if write_images:
        reuse = _prepare_image_dirs(out, cfg)
        all_images = [img for split in SPLITS for img in layouts[split]]
        for img in tqdm(
            all_images, desc="synth images", unit="img", disable=not progress, dynamic_ncols=True
        ):
            target = out / "images" / img.file_name
            if reuse and target.is_file():
                reused += 1
                continue
            _write_bytes(target, png_bytes(_render(cfg, img, specs)))
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
