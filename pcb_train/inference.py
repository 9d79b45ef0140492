"""Run a model over a split: open it, load the detector, iterate sharded batches with progress.

One path for every command that runs a trained detector over images: `dump-logits`, `calibrate`,
the trainer's evaluation and the study; `ground_truth_for_images` is what they are scored against
(the file restricted to the images actually run). A split is an LVIS annotation file plus an
image folder, id-sorted (`LVISDetectionDataset(train=False)`); each rank takes its strided share
of positions (`pcb_train.distributed.shard_indices`). Batches are (images [3, H, W] float in
[0, 1] on the model's device, targets on the CPU); image decoding runs ahead in `num_workers`
loader workers. The loader draws its seed from a private generator, so running inference (also
in the middle of training) never moves the caller's global RNG. Workers ignore SIGINT / SIGTERM
and their errors arrive as the one-line message they are (`pcb_train.workers`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError, input_error
from pcb_analysis.lvis_gt import GroundTruth, load_ground_truth
from pcb_train.backends import build_backend
from pcb_train.backends.base import CheckpointInfo, DetectorBackend
from pcb_train.config import TrainConfig, load_config
from pcb_train.data import LVISDetectionDataset, Target, collate, load_lvis_json
from pcb_train.workers import stop_signals_to_main, unwrap_worker_errors

Batch = tuple[list[Tensor], list[Target]]


def open_split(
    gt: str | Path, images: str | Path, *, max_images: int | None = None, with_masks: bool = False
) -> LVISDetectionDataset:
    """The evaluation split (id-sorted), checking that it has images and that their files exist."""
    if max_images is not None and max_images < 1:
        raise PcbkitError(f"--max-images must be >= 1 (got {max_images})")
    dataset = LVISDetectionDataset(
        gt, images, None, train=False, with_masks=with_masks, max_images=max_images
    )
    if len(dataset) == 0:
        raise input_error(gt, "empty split: field 'images' lists no image")
    return dataset


def load_detector(
    checkpoint: str | Path,
    config_path: str | Path,
    categories: CategorySpace,
    gt: str | Path,
    device: torch.device,
) -> tuple[DetectorBackend, CheckpointInfo, TrainConfig]:
    """Build the backend of `config_path`'s model section, load `checkpoint` and move it to `device`.

    Refuses (one-line `PcbkitError`s naming the files) a config whose class count differs from the
    ground truth's, and a checkpoint for another class count, structure or category space."""
    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise input_error(ckpt, "checkpoint file not found")
    cfg = load_config(config_path)
    if cfg.model.num_classes != categories.num_classes:
        raise input_error(
            config_path,
            f"model.num_classes is {cfg.model.num_classes}, the ground truth {gt} has "
            f"K={categories.num_classes} categories",
        )
    backend = build_backend(cfg.model)
    info = backend.load_checkpoint(ckpt)
    if info.categories is not None and info.categories.hash != categories.hash:
        raise input_error(
            ckpt,
            f"the checkpoint's categories (hash {info.categories.hash}, K={info.categories.num_classes}) "
            f"differ from the ground truth {gt} (hash {categories.hash}, K={categories.num_classes})",
        )
    backend.to(device)
    backend.model.eval()
    return backend, info, cfg


def iter_batches(
    dataset: LVISDetectionDataset,
    indices: Sequence[int],
    batch_size: int,
    num_workers: int = 0,
    *,
    device: torch.device | None = None,
    progress: bool = False,
    desc: str = "inference",
) -> Iterator[Batch]:
    """(images, targets) batches of `dataset[indices]` in order; images moved to `device` when given.

    progress: a bar counting images (rate and ETA); show it on the main rank only."""
    if not indices:
        return
    loader = DataLoader(
        Subset(dataset, list(indices)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=False,
        persistent_workers=False,
        generator=torch.Generator(),
        worker_init_fn=stop_signals_to_main() if num_workers else None,
    )
    with tqdm(
        total=len(indices), unit="img", desc=desc, disable=not progress, mininterval=0.5, dynamic_ncols=True
    ) as bar:
        for images, targets in unwrap_worker_errors(loader):
            if device is not None:
                images = [im.to(device, non_blocking=True) for im in images]
            yield images, targets
            bar.update(len(images))


def ground_truth_for_images(gt: str | Path, image_ids: Sequence[int] | None = None) -> GroundTruth:
    """The ground-truth index of `gt`, restricted to `image_ids` when they are a strict subset of
    the file's images (e.g. --max-images): images never run must not count as misses.

    None: every image of the file."""
    full = load_ground_truth(gt)  # cached per file: the usual whole-split case parses it once
    if image_ids is None:
        return full
    wanted = {int(i) for i in image_ids}
    if wanted == {int(i) for i in full.img_ids}:
        return full
    data = load_lvis_json(gt)
    sub = dict(data)
    sub["images"] = [im for im in data["images"] if int(im["id"]) in wanted]
    sub["annotations"] = [a for a in data["annotations"] if int(a["image_id"]) in wanted]
    index = load_ground_truth(sub)
    index.source = f"{gt} ({len(sub['images'])} of {len(data['images'])} images)"
    return index
