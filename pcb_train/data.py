"""LVIS-format instance-segmentation dataset for torch detectors (training and inference).

Item i -> (image, target):

    image               [3, H, W] float32 in [0, 1], RGB, the file's own resolution
    target["boxes"]     [N, 4] float32, xyxy in pixels (the COCO / pycocotools convention: a
                        pixel covers [x, x+1) x [y, y+1); LVIS `bbox` [x, y, w, h] -> [x, y, x+w, y+h])
    target["labels"]    [N] int64, contiguous class indices 0..K-1 of the CategorySpace (sorted
                        LVIS ids; no background class here: K is background only in logits)
    target["masks"]     [N, H, W] uint8, from the polygons (or RLE) with pycocotools (with_masks)
    target["iscrowd"]   [N] bool (COCO-style crowd regions; always False for LVIS)
    target["image_id"]  [] int64, the LVIS image id

Images are ordered by image id (deterministic, independent of the JSON's order). Boxes with no
area (w <= 0 or h <= 0) are dropped (torchvision refuses them); with `train=True` crowd regions
are dropped and images without annotations are skipped when `filter_empty`.

Augmentation hooks (training only): horizontal flip with probability `flip_prob` (image, boxes and
masks), then any `transforms` callables `(image, target) -> (image, target)`. Multi-scale resizing
is done by the model's own input transform (torchvision: `GeneralizedRCNNTransform` draws the short
side from `DataConfig.train_min_sizes` per image), so the dataset returns the file's resolution.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pycocotools.mask as mask_utils
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import input_error
from pcb_analysis.lvis_json import read_lvis_json

logger = logging.getLogger(__name__)

Target = dict[str, Tensor]
Transform = Callable[[Tensor, Target], tuple[Tensor, Target]]
_PYCOCOTOOLS_COPY_WARNING = r"__array__ implementation doesn't accept a copy keyword"


@dataclass(frozen=True)
class ImageEntry:
    """One image of the split: LVIS id, resolved file path, size from the JSON."""

    image_id: int
    path: Path
    height: int
    width: int


def _candidate_paths(image_root: Path, img: Mapping[str, Any]) -> list[Path]:
    """Where an image may live: `file_name` under the root (LVIS v0.5, pcbkit synth), else the last
    two parts of `coco_url` (LVIS v1: `train2017/000000391895.jpg`), else its bare file name."""
    out: list[Path] = []
    name = img.get("file_name")
    if isinstance(name, str) and name:
        out.append(image_root / name)
        out.append(image_root / Path(name).name)
    url = img.get("coco_url")
    if isinstance(url, str) and url:
        parts = url.rstrip("/").split("/")
        if len(parts) >= 2:
            out.append(image_root / parts[-2] / parts[-1])
        out.append(image_root / parts[-1])
    seen: set[Path] = set()
    return [p for p in out if not (p in seen or seen.add(p))]


def load_lvis_json(ann_file: str | Path) -> dict[str, Any]:
    """Read an LVIS-format annotation file (`pcb_analysis.lvis_json.read_lvis_json`: clear errors)."""
    return read_lvis_json(ann_file, "annotation")


def check_categories(found: CategorySpace, expected: CategorySpace | int | None, source: str | Path) -> None:
    """Refuse an annotation file whose categories differ from the model's (a space, or just K)."""
    if expected is None:
        return
    if isinstance(expected, CategorySpace):
        expected.check_same(found, f"{source}: categories")
    elif found.num_classes != int(expected):
        raise input_error(
            source, f"categories: the file has K={found.num_classes} classes, the model has K={int(expected)}"
        )


def decode_segmentation(segm: Any, height: int, width: int) -> np.ndarray:
    """LVIS/COCO segmentation (polygon list, uncompressed or compressed RLE) -> [H, W] uint8 mask."""
    if isinstance(segm, list):
        polys = [p for p in segm if isinstance(p, list) and len(p) >= 6]
        if not polys:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segm, dict) and "counts" in segm:
        rle = mask_utils.frPyObjects(segm, height, width) if isinstance(segm["counts"], list) else segm
    else:
        raise ValueError(f"unsupported segmentation of type {type(segm).__name__}")
    with warnings.catch_warnings():
        # pycocotools' decode hands numpy 2 an object without the `copy` keyword: harmless, but it
        # warns once per mask; silence exactly that message
        warnings.filterwarnings("ignore", message=_PYCOCOTOOLS_COPY_WARNING, category=DeprecationWarning)
        return np.ascontiguousarray(mask_utils.decode(rle), dtype=np.uint8)


def horizontal_flip(image: Tensor, target: Target) -> tuple[Tensor, Target]:
    """Mirror image [3, H, W], boxes (x -> W - x, swapping x1 and x2) and masks [N, H, W]."""
    width = image.shape[-1]
    out = dict(target)
    boxes = target["boxes"]
    if boxes.numel():
        out["boxes"] = torch.stack(
            [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1
        )
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    return image.flip(-1), out


class LVISDetectionDataset(Dataset):
    """An LVIS-format split as a torch Dataset (see the module docstring for items and conventions).

    Args:
        ann_file: LVIS annotation JSON.
        image_root: folder the images' `file_name` (or `coco_url` tail) is relative to.
        categories: the model's category space (checked by hash), or just its K (checked by count),
            or None (no check; the file's own categories are used).
        train: enables augmentation, drops crowd regions, and skips empty images when `filter_empty`.
        flip_prob: horizontal flip probability (training only).
        transforms: further training-time `(image, target) -> (image, target)` hooks.
        with_masks: decode instance masks (needed to train the mask head; dumps do not need them).
        filter_empty: with `train`, skip images without (valid) annotations.
        image_ids: restrict to these image ids (kept in id order); `max_images`: the first N of them.
        check_files: verify at construction that every image file exists (a clear error naming the
            first missing file instead of a failure deep inside a data-loader worker).
        generator: torch RNG for the flip decisions (None: the global / per-worker RNG).
    """

    def __init__(
        self,
        ann_file: str | Path,
        image_root: str | Path,
        categories: CategorySpace | int | None = None,
        train: bool = False,
        *,
        flip_prob: float = 0.5,
        transforms: Sequence[Transform] = (),
        with_masks: bool = True,
        filter_empty: bool = True,
        image_ids: Sequence[int] | None = None,
        max_images: int | None = None,
        check_files: bool = True,
        generator: torch.Generator | None = None,
    ) -> None:
        self.ann_file = Path(ann_file)
        self.image_root = Path(image_root)
        self.train = bool(train)
        self.flip_prob = float(flip_prob) if train else 0.0
        self.transforms = tuple(transforms) if train else ()
        self.with_masks = bool(with_masks)
        self.generator = generator
        if not self.image_root.is_dir():
            raise input_error(self.image_root, "image folder not found")
        data = load_lvis_json(self.ann_file)
        self.categories = CategorySpace.from_categories(data["categories"], source=self.ann_file)
        check_categories(self.categories, categories, self.ann_file)
        index_of = self.categories.index_of()

        anns_by_image: dict[int, list[dict[str, Any]]] = {}
        for i, ann in enumerate(data["annotations"]):
            try:
                iid, cid = int(ann["image_id"]), int(ann["category_id"])
                bbox = [float(v) for v in ann["bbox"]]
            except (KeyError, TypeError, ValueError) as err:
                raise input_error(self.ann_file, f"annotations[{i}]: malformed ({err!r})") from err
            if cid not in index_of:
                raise input_error(
                    self.ann_file, f"annotations[{i}]: category_id {cid} is not in 'categories'"
                )
            if len(bbox) != 4:
                raise input_error(self.ann_file, f"annotations[{i}]: bbox must have 4 numbers")
            anns_by_image.setdefault(iid, []).append(ann)

        images = sorted(data["images"], key=lambda im: int(im["id"]))
        if image_ids is not None:
            wanted = {int(x) for x in image_ids}
            known = {int(im["id"]) for im in images}
            unknown = sorted(wanted - known)
            if unknown:
                raise input_error(self.ann_file, f"image ids not in the file: {unknown[:5]}")
            images = [im for im in images if int(im["id"]) in wanted]
        entries: list[ImageEntry] = []
        missing: list[tuple[int, Path]] = []
        skipped_empty = 0
        for im in images:
            iid = int(im["id"])
            if self.train and filter_empty and not any(self._usable(a) for a in anns_by_image.get(iid, ())):
                skipped_empty += 1
                continue
            if max_images is not None and len(entries) >= max_images:
                break
            candidates = _candidate_paths(self.image_root, im)
            if not candidates:
                raise input_error(self.ann_file, f"image {iid}: neither 'file_name' nor 'coco_url' is given")
            path = next((p for p in candidates if p.is_file()), None) if check_files else candidates[0]
            if path is None:
                missing.append((iid, candidates[0]))
                continue
            entries.append(ImageEntry(iid, path, int(im["height"]), int(im["width"])))
        if missing:
            iid, path = missing[0]
            raise input_error(
                path,
                f"image file not found (image id {iid} of {self.ann_file}; {len(missing)} image(s) missing)",
            )
        if skipped_empty:
            logger.info("%s: skipped %d training images without annotations", self.ann_file, skipped_empty)
        self.entries: list[ImageEntry] = entries
        self._anns = {e.image_id: anns_by_image.get(e.image_id, []) for e in entries}
        self._index_of = index_of

    @staticmethod
    def _usable(ann: Mapping[str, Any]) -> bool:
        w, h = float(ann["bbox"][2]), float(ann["bbox"][3])
        return w > 0 and h > 0 and not ann.get("iscrowd", 0)

    @property
    def image_ids(self) -> list[int]:
        return [e.image_id for e in self.entries]

    @property
    def num_classes(self) -> int:
        return self.categories.num_classes

    def __len__(self) -> int:
        return len(self.entries)

    def load_image(self, i: int) -> Tensor:
        """Image i as [3, H, W] float32 in [0, 1]; its size must match the JSON's height/width."""
        e = self.entries[i]
        try:
            with Image.open(e.path) as im:
                arr = np.array(im.convert("RGB"), dtype=np.uint8)
        except FileNotFoundError as err:
            raise input_error(e.path, f"image file not found (image id {e.image_id})") from err
        except OSError as err:
            raise input_error(e.path, f"cannot read image ({err})") from err
        if arr.shape[0] != e.height or arr.shape[1] != e.width:
            raise input_error(
                e.path,
                f"image is {arr.shape[1]}x{arr.shape[0]} but {self.ann_file} says {e.width}x{e.height} "
                f"(image id {e.image_id})",
            )
        return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)

    def load_target(self, i: int) -> Target:
        """The annotations of image i (see the module docstring), before augmentation."""
        e = self.entries[i]
        boxes: list[list[float]] = []
        labels: list[int] = []
        crowd: list[bool] = []
        masks: list[np.ndarray] = []
        for ann in self._anns[e.image_id]:
            x, y, w, h = (float(v) for v in ann["bbox"])
            if w <= 0 or h <= 0:
                continue
            is_crowd = bool(ann.get("iscrowd", 0))
            if is_crowd and self.train:
                continue
            boxes.append([x, y, x + w, y + h])
            labels.append(self._index_of[int(ann["category_id"])])
            crowd.append(is_crowd)
            if self.with_masks:
                try:
                    masks.append(decode_segmentation(ann.get("segmentation", []), e.height, e.width))
                except (ValueError, TypeError) as err:
                    raise input_error(
                        self.ann_file, f"annotation {ann.get('id')}: bad segmentation ({err})"
                    ) from err
        target: Target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "iscrowd": torch.tensor(crowd, dtype=torch.bool),
            "image_id": torch.tensor(e.image_id, dtype=torch.int64),
        }
        if self.with_masks:
            target["masks"] = (
                torch.from_numpy(np.stack(masks))
                if masks
                else torch.zeros((0, e.height, e.width), dtype=torch.uint8)
            )
        return target

    def __getitem__(self, i: int) -> tuple[Tensor, Target]:
        image = self.load_image(i)
        target = self.load_target(i)
        if self.flip_prob > 0.0 and float(torch.rand((), generator=self.generator)) < self.flip_prob:
            image, target = horizontal_flip(image, target)
        for t in self.transforms:
            image, target = t(image, target)
        return image, target


def collate(batch: Sequence[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """DataLoader collate: lists of images and targets (detection images differ in size)."""
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    return images, targets


def targets_to(targets: Sequence[Target], device: torch.device | str) -> list[Target]:
    """Move every tensor of every target to `device` (non_blocking where possible)."""
    return [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
