"""`pcbkit dump-logits`: parse the options, run `pcb_train.dump_logits.dump_logits`, print a summary."""

from __future__ import annotations

from pathlib import Path

import click

from pcb_analysis.paths import check_name, check_output_path

FILE = click.Path(dir_okay=False, path_type=Path)
FOLDER = click.Path(file_okay=False, path_type=Path)


@click.command("dump-logits")
@click.option("--checkpoint", required=True, type=FILE, help="pcbkit checkpoint (model_final.pth).")
@click.option("--config", "config_path", required=True, type=FILE,
              help="Config YAML whose model section built the checkpoint.")
@click.option("--gt", required=True, type=FILE, help="LVIS annotation file of the split (e.g. val.json).")
@click.option("--images", required=True, type=FOLDER,
              help="Image folder the annotation's file names are relative to.")
@click.option("--split", required=True, help="Split name recorded in the dump (e.g. val, train).")
@click.option("--out", required=True, type=FOLDER,
              help="Dump directory (created; an existing dump of the same run is resumed).")
@click.option("--positives-only", is_flag=True,
              help="Keep only proposals matched to a ground-truth class (IoU >= 0.5): what `pcbkit stats` "
                   "needs.")
@click.option("--max-images", type=click.IntRange(min=1), default=None,
              help="Dump only the first N images (by id).")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True,
              help="Images per forward pass.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="auto: CUDA when available (under torchrun: the rank's local GPU).")
@click.option("--boxes", type=click.Choice(["none", "agnostic", "per-class"]), default="none",
              show_default=True,
              help="Also store regressed boxes: per-class ones let `pcbkit calibrate --dump` evaluate box AP "
                   "offline.")
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Image-decoding worker processes.")
@click.option("--shard-rows", type=click.IntRange(min=1), default=65_536, show_default=True,
              help="Rows per shard (the unit a resumed run keeps).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def dump_logits_cmd(
    checkpoint: Path,
    config_path: Path,
    gt: Path,
    images: Path,
    split: str,
    out: Path,
    positives_only: bool,
    max_images: int | None,
    batch_size: int,
    device: str,
    boxes: str,
    workers: int,
    shard_rows: int,
    no_progress: bool,
) -> None:
    """Run the detector over a split and dump, per test-time proposal, the RoI head's class logits
    [K+1] (background last; the last step of an iterative head), its matched ground-truth class at
    IoU >= 0.5 and the IoU.

    Streams in bounded memory and resumes after an interruption (rerun the same command). Under
    torchrun (`torchrun --nproc_per_node N -m pcbkit dump-logits ...`) every rank dumps its share
    of the images into its own shards and rank 0 merges the manifests.
    """
    # lazy: the library imports torch, which `pcbkit --help` must not pay for
    from pcb_train.dump_logits import BOXES_CHOICES, DumpLogitsConfig, dump_logits

    check_output_path(out, "--out", folder=True)
    check_name(split, "--split")  # calibrate names its results files after the dump's split
    cfg = DumpLogitsConfig(
        checkpoint=checkpoint,
        config=config_path,
        gt=gt,
        images=images,
        split=split,
        out=out,
        positives_only=positives_only,
        max_images=max_images,
        batch_size=batch_size,
        device=device,  # type: ignore[arg-type]
        boxes=BOXES_CHOICES[boxes],
        num_workers=workers,
        shard_rows=shard_rows,
        progress=not no_progress,
    )
    s = dump_logits(cfg)
    if s.rank != 0:
        return
    resumed = f", {s.images_skipped} already dumped" if s.images_skipped else ""
    ranks = f" (rank 0 of {s.world_size}; manifests merged)" if s.world_size > 1 else ""
    click.echo(
        f"dumped {s.images_written} image(s){resumed}{ranks}: {s.rows:,} rows, {s.positives:,} positives "
        f"in {s.seconds:.1f} s ({s.images_per_second:.2f} img/s)"
    )
    click.echo(f"wrote {s.out}")
