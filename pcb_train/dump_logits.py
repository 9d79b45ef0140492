"""`pcbkit dump-logits`: run a detector over a split and stream its RoI head's logits into a dump.

R proposals of an image, K foreground classes; logits [R, K+1], background = column K (the last
step's logits for the PCB iterative head: the backend's `proposal_records` hands those out).

Per image the backend gives its test-time RPN proposals (top-N after NMS) with
    boxes [R, 4] xyxy (original pixels), logits [R, K+1], labels [R] (-1 ignore, 0..K-1 the
    ground-truth class matched at IoU >= 0.5, K background), ious [R], and optionally the
    regressed boxes: none, agnostic [R, 4] (top foreground class) or per-class [R, K*4]
and `DumpWriter` appends them to the dump (pcb_analysis.dumps: per-column .npy shards, CRC-32,
completion records). `positives_only` keeps the rows with labels in 0..K-1 (what the statistics
read; ~50x smaller at LVIS scale); every image is still listed in its shard, so resuming works.

Resumable: images of complete shards are skipped on a rerun (the open shard of an interrupted run
is dropped and redone). Bounded memory: one batch of images and records at a time. Device from
the caller (`cpu`, `cuda`, `auto`); nothing calls `.cuda()`.

Distributed (torchrun: RANK / WORLD_SIZE / LOCAL_RANK in the environment): the process group is
initialised here when it is not already (NCCL on CUDA, gloo on CPU), rank r dumps the image ids
`ids[r::W]` of the id-sorted split (no padding: every image exactly once), writes its own shards
and rank manifest; after a barrier rank 0 merges the manifests into `manifest.json`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from pcb_analysis.categories import CategorySpace
from pcb_analysis.errors import PcbkitError, input_error
from pcb_train.backends.base import CheckpointInfo, DetectorBackend, ProposalRecord
from pcb_train.config import ModelConfig, TrainConfig, load_config, to_dict
from pcb_train.data import LVISDetectionDataset, collate, targets_to

logger = logging.getLogger(__name__)

DeviceName = Literal["auto", "cpu", "cuda"]
BoxesKind = Literal["none", "agnostic", "per_class"]
BOXES_CHOICES: dict[str, BoxesKind] = {"none": "none", "agnostic": "agnostic", "per-class": "per_class"}
"""CLI spelling -> the dump format's regressed-box kind."""

DEFAULT_SHARD_ROWS = 65_536


# --------------------------------------------------------------------------------------------
# environment: device, ranks, provenance


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a torchrun job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_from_env(env: Mapping[str, str] | None = None) -> DistInfo:
    """Read RANK / WORLD_SIZE / LOCAL_RANK (torchrun's variables); absent: a single process."""
    env = os.environ if env is None else env
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError as err:
        raise PcbkitError(f"RANK / WORLD_SIZE / LOCAL_RANK must be integers ({err})") from err
    if world < 1 or not 0 <= rank < world:
        raise PcbkitError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return DistInfo(rank, world, local)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`cpu`, `cuda` (the process's local GPU; an error without CUDA) or `auto` (CUDA when available)."""
    if name not in ("auto", "cpu", "cuda"):
        raise PcbkitError(f"--device: unknown device {name!r}; expected cpu, cuda or auto")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise PcbkitError("--device cuda: no CUDA device is available (use --device cpu or auto)")
    index = local_rank % max(torch.cuda.device_count(), 1)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def init_distributed(dist_info: DistInfo, device: torch.device) -> bool:
    """Initialise the default process group for a multi-process job; True when this call created it."""
    if dist_info.world_size == 1:
        return False
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() != dist_info.world_size or dist.get_rank() != dist_info.rank:
            raise PcbkitError(
                f"the process group (rank {dist.get_rank()} of {dist.get_world_size()}) disagrees with "
                f"RANK={dist_info.rank} / WORLD_SIZE={dist_info.world_size}"
            )
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=dist_info.rank, world_size=dist_info.world_size)
    return True


def git_sha(start: Path | None = None) -> str | None:
    """The commit of the source tree this code runs from (None outside a git checkout)."""
    where = start if start is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and sha else None


def provenance(
    info: CheckpointInfo, model_config: ModelConfig, config_path: str | Path, extra: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """What an artifact records about its origin.

    checkpoint_hash (sha256 prefix) and config (the resolved model config plus `extra`, the
    options that change the rows) must match for a dump to be resumed or its ranks merged."""
    return {
        "checkpoint": str(info.path),
        "checkpoint_hash": info.sha256,
        "config_file": str(config_path),
        "config": {"model": to_dict(model_config), **dict(extra or {})},
        "git_sha": git_sha(),
        "torch_version": torch.__version__,
    }


# --------------------------------------------------------------------------------------------
# model and split


def open_split(
    gt: str | Path, images: str | Path, *, max_images: int | None = None, with_masks: bool = False
) -> LVISDetectionDataset:
    """The evaluation split (id-sorted), checking that it has images and that their files exist."""
    if max_images is not None and max_images < 1:
        raise PcbkitError(f"--max-images must be >= 1 (got {max_images})")
    dataset = LVISDetectionDataset(gt, images, None, train=False, with_masks=with_masks, max_images=max_images)
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
    from pcb_train.backends import build_backend

    ckpt = Path(checkpoint)
    if not ckpt.is_file():
        raise input_error(ckpt, "checkpoint file not found")
    cfg = load_config(config_path)
    if cfg.model.num_classes != categories.num_classes:
        raise input_error(
            config_path,
            f"model.num_classes is {cfg.model.num_classes}, the ground truth {gt} has K={categories.num_classes} categories",
        )
    backend = build_backend(cfg.model)
    info = backend.load_checkpoint(ckpt)
    if info.categories is not None and info.categories.hash != categories.hash:
        raise input_error(
            ckpt,
            f"the checkpoint's categories (hash {info.categories.hash}, K={info.categories.num_classes}) differ from "
            f"the ground truth {gt} (hash {categories.hash}, K={categories.num_classes})",
        )
    backend.to(device)
    backend.model.eval()
    return backend, info, cfg


def shard_indices(n: int, dist_info: DistInfo) -> list[int]:
    """Positions `rank::world_size` of an n-image split: disjoint, covering, no padding."""
    return list(range(dist_info.rank, n, dist_info.world_size))


def iter_batches(
    dataset: LVISDetectionDataset, indices: Sequence[int], batch_size: int, num_workers: int = 0
) -> Iterator[tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]]:
    """(images, targets) batches of `dataset[indices]` in order; workers decode images ahead."""
    from torch.utils.data import DataLoader, Subset

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
    )
    yield from loader


# --------------------------------------------------------------------------------------------
# the dump


@dataclass(frozen=True)
class DumpLogitsConfig:
    """Options of one dump (see `pcbkit dump-logits --help`)."""

    checkpoint: Path
    config: Path
    gt: Path
    images: Path
    split: str
    out: Path
    positives_only: bool = False
    max_images: int | None = None
    batch_size: int = 2
    device: DeviceName = "auto"
    boxes: BoxesKind = "none"
    num_workers: int = 0
    shard_rows: int = DEFAULT_SHARD_ROWS
    progress: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise PcbkitError(f"--batch-size must be >= 1 (got {self.batch_size})")
        if self.boxes not in ("none", "agnostic", "per_class"):
            raise PcbkitError(f"--boxes: unknown kind {self.boxes!r}; expected none, agnostic or per-class")
        if self.num_workers < 0:
            raise PcbkitError(f"--workers must be >= 0 (got {self.num_workers})")
        if not self.split:
            raise PcbkitError("--split must be a non-empty name")


@dataclass
class DumpSummary:
    """What one process wrote (rows and positives of this run only; resumed images are skipped)."""

    out: Path
    split: str
    rank: int
    world_size: int
    images_total: int  # images of the split (all ranks)
    images_rank: int  # images assigned to this rank
    images_skipped: int  # already in complete shards (resume)
    images_written: int
    rows: int = 0
    positives: int = 0
    seconds: float = 0.0
    merged: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images_written / self.seconds if self.seconds > 0 else float("nan")


def dump_logits(cfg: DumpLogitsConfig, dist_info: DistInfo | None = None) -> DumpSummary:
    """Run the detector of `cfg.checkpoint` over the split and write (or resume) the dump at `cfg.out`.

    Inputs are checked before anything is written: ground truth, image files, config class count,
    checkpoint (class count, structure, categories). Under torchrun each rank calls this; see the
    module docstring.
    """
    from tqdm import tqdm

    from pcb_analysis.dumps import DumpWriter, merge_manifests

    dist_info = dist_info if dist_info is not None else dist_from_env()
    t0 = time.perf_counter()
    dataset = open_split(cfg.gt, cfg.images, max_images=cfg.max_images)
    categories = dataset.categories
    device = resolve_device(cfg.device, dist_info.local_rank)
    backend, info, _ = load_detector(cfg.checkpoint, cfg.config, categories, cfg.gt, device)
    created_group = init_distributed(dist_info, device)
    k = categories.num_classes
    try:
        mine = shard_indices(len(dataset), dist_info)
        prov = provenance(
            info,
            backend.config,
            cfg.config,
            {"dump": {"positives_only": cfg.positives_only, "boxes": cfg.boxes}},
        )
        prov.update({"gt": str(cfg.gt), "images": str(cfg.images), "max_images": cfg.max_images})
        summary = DumpSummary(
            out=cfg.out,
            split=cfg.split,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            images_total=len(dataset),
            images_rank=len(mine),
            images_skipped=0,
            images_written=0,
        )
        with DumpWriter(
            cfg.out,
            categories,
            cfg.split,
            prov,
            shard_rows=cfg.shard_rows,
            rank=dist_info.rank,
            world_size=dist_info.world_size,
            regressed=cfg.boxes,
        ) as writer:
            done = writer.done_image_ids
            todo = [i for i in mine if dataset.entries[i].image_id not in done]
            summary.images_skipped = len(mine) - len(todo)
            if summary.images_skipped:
                logger.info(
                    "%s: resuming, %d of %d image(s) of rank %d already dumped",
                    cfg.out, summary.images_skipped, len(mine), dist_info.rank,
                )
            bar = tqdm(
                total=len(todo),
                unit="img",
                desc=f"dump {cfg.split}",
                disable=not (cfg.progress and dist_info.is_main),
                mininterval=0.5,
                dynamic_ncols=True,
            )
            with bar:
                for images, targets in iter_batches(dataset, todo, cfg.batch_size, cfg.num_workers):
                    images = [im.to(device, non_blocking=True) for im in images]
                    records = backend.proposal_records(images, targets_to(targets, device), regressed=cfg.boxes)
                    for rec in records:
                        labels = rec.labels
                        positive = (labels >= 0) & (labels < k)
                        if cfg.positives_only:
                            keep = positive.nonzero().flatten()
                            rec = ProposalRecord(
                                rec.image_id,
                                rec.boxes[keep],
                                rec.logits[keep],
                                labels[keep],
                                rec.ious[keep],
                                None if rec.regressed is None else rec.regressed[keep],
                            )
                        writer.add_image(rec.image_id, rec.boxes, rec.logits, rec.labels, rec.ious, rec.regressed)
                        summary.rows += len(rec)
                        summary.positives += int(positive.sum())
                        summary.images_written += 1
                    bar.update(len(records))
        if dist_info.world_size > 1:
            import torch.distributed as dist

            dist.barrier()
            if dist_info.is_main:
                merge_manifests(cfg.out, dist_info.world_size)
                summary.merged = True
            dist.barrier()  # nobody returns (and reads manifest.json) before it exists
        else:
            summary.merged = True
        summary.seconds = time.perf_counter() - t0
        return summary
    finally:
        if created_group:
            import torch.distributed as dist

            dist.destroy_process_group()
