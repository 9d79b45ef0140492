"""`pcbkit dump-logits`: run a detector over a split and stream its RoI head's logits into a dump.

Per test-time proposal of an image (R of them, K foreground classes) the backend's
`proposal_records` gives boxes [R, 4] xyxy (original pixels), logits [R, K+1] (background = column
K; the last step of an iterative head), labels [R] (-1 ignore, 0..K-1 the class matched at IoU >=
0.5, K background), ious [R] and optionally regressed boxes (none, agnostic [R, 4], per-class
[R, K*4]); `DumpWriter` appends them (pcb_analysis.dumps). `positives_only` keeps labels 0..K-1.
Resumable (complete shards are skipped after their CRC-32 is checked; damaged ones are redone),
bounded memory (one batch), device from the caller. Under torchrun rank r dumps positions r, r + W,
... of the id-sorted split into its own shards; rank 0 merges the manifests after a barrier. The
folder is locked while a run writes (one lock per rank); a resume is refused for another
checkpoint, ground truth (`gt_hash`), config or a smaller --max-images, every shard carries the
run's identity, and the run fails unless the dump ends whole. Why and how: docs/calibration.md §5.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pcb_analysis.dumps import MANIFEST_NAME, DumpReader, DumpWriter, merge_manifests, rank_manifest_name
from pcb_analysis.errors import PcbkitError
from pcb_analysis.folder_lock import folder_lock, remove_stale_temporaries
from pcb_train.backends.base import ProposalRecord
from pcb_train.data import targets_to
from pcb_train.distributed import (
    DistContext,
    barrier,
    context_from_env,
    init_distributed,
    resolve_device,
    shard_indices,
    shutdown,
)
from pcb_train.inference import iter_batches, load_detector, open_split
from pcb_train.provenance import provenance

logger = logging.getLogger(__name__)

DeviceName = Literal["auto", "cpu", "cuda"]
BoxesKind = Literal["none", "agnostic", "per_class"]
BOXES_CHOICES: dict[str, BoxesKind] = {"none": "none", "agnostic": "agnostic", "per-class": "per_class"}
"""CLI spelling -> the dump format's regressed-box kind."""

DEFAULT_SHARD_ROWS = 65_536


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


def file_hash(path: str | Path) -> str:
    """sha256 prefix (16 hex digits) of a file's bytes: the ground truth's part of a dump's identity."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()[:16]


def _own_files(rank: int) -> tuple[str, ...]:
    """The manifest files rank `rank` writes: their stale temporaries are its to remove (under its lock)."""
    return (rank_manifest_name(rank), MANIFEST_NAME) if rank == 0 else (rank_manifest_name(rank),)


def check_whole(out: Path, expected_images: int) -> None:
    """Refuse (PcbkitError) to report a dump as written unless its manifest is finished and lists
    every image of the split."""
    reader = DumpReader(out, allow_unfinished=True)
    if not reader.finished or reader.num_images != expected_images:
        raise PcbkitError(
            f"{out}: the dump is not whole ({reader.num_images} of {expected_images} image(s) in complete "
            f"shards, finished={reader.finished}): rerun the same command to complete it"
        )


def _write_batches(
    writer: DumpWriter,
    backend: Any,
    batches: Iterable[Any],
    cfg: DumpLogitsConfig,
    device: Any,
    summary: DumpSummary,
) -> None:
    """Run the detector on every batch and append each image's proposal rows (positives only when asked)."""
    k = writer.num_classes
    for images, targets in batches:
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


def dump_logits(cfg: DumpLogitsConfig, ctx: DistContext | None = None) -> DumpSummary:
    """Run the detector of `cfg.checkpoint` over the split and write (or resume) the dump at `cfg.out`.

    Inputs are checked before anything is written: ground truth, image files, config class count,
    checkpoint (class count, structure, categories). Under torchrun each rank calls this; see the
    module docstring.
    """
    ctx = ctx if ctx is not None else context_from_env()
    t0 = time.perf_counter()
    dataset = open_split(cfg.gt, cfg.images, max_images=cfg.max_images)
    categories = dataset.categories
    device = resolve_device(cfg.device, ctx.local_rank)
    backend, info, _ = load_detector(cfg.checkpoint, cfg.config, categories, cfg.gt, device)
    ctx = init_distributed(ctx, device)
    try:
        mine = shard_indices(len(dataset), ctx.rank, ctx.world_size)
        prov = provenance(
            info,
            backend.config,
            cfg.config,
            {"dump": {"positives_only": cfg.positives_only, "boxes": cfg.boxes}},
        )
        prov.update({"gt": str(cfg.gt), "gt_hash": file_hash(cfg.gt), "images": str(cfg.images),
                     "max_images": cfg.max_images})
        summary = DumpSummary(
            out=cfg.out,
            split=cfg.split,
            rank=ctx.rank,
            world_size=ctx.world_size,
            images_total=len(dataset),
            images_rank=len(mine),
            images_skipped=0,
            images_written=0,
        )
        # rank 0 holds the folder's lock, every other rank one of its own (it writes its own shards)
        lock_rank = ctx.rank if ctx.rank > 0 else None
        with folder_lock(cfg.out, "pcbkit dump-logits", lock_rank):
            remove_stale_temporaries(cfg.out, _own_files(ctx.rank))
            with DumpWriter(
                cfg.out,
                categories,
                cfg.split,
                prov,
                shard_rows=cfg.shard_rows,
                rank=ctx.rank,
                world_size=ctx.world_size,
                regressed=cfg.boxes,
                image_ids=[e.image_id for e in dataset.entries],
            ) as writer:
                done = writer.done_image_ids
                todo = [i for i in mine if dataset.entries[i].image_id not in done]
                summary.images_skipped = len(mine) - len(todo)
                if summary.images_skipped:
                    logger.info(
                        "%s: resuming, %d of %d image(s) of rank %d already dumped",
                        cfg.out, summary.images_skipped, len(mine), ctx.rank,
                    )
                batches = iter_batches(
                    dataset,
                    todo,
                    cfg.batch_size,
                    cfg.num_workers,
                    device=device,
                    progress=cfg.progress and ctx.is_main,
                    desc=f"dump {cfg.split}",
                )
                _write_batches(writer, backend, batches, cfg, device, summary)
            if ctx.distributed:
                barrier(ctx)
                if ctx.is_main:
                    merge_manifests(cfg.out, ctx.world_size)
                    summary.merged = True
                barrier(ctx)  # nobody returns (and reads manifest.json) before it exists
            else:
                summary.merged = True
            if ctx.is_main:
                check_whole(cfg.out, len(dataset))
        summary.seconds = time.perf_counter() - t0
        return summary
    finally:
        shutdown(ctx)
