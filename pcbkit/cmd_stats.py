"""`pcbkit stats`: stream a logit dump into class statistics (S, n, H -> confusion matrix, mean score),
then print the regime diagnostics (docs/statistics.md §4; sums stored in the statistics file). With
--split-folds F, also the out-of-fold statistics of F seeded image folds (docs/statistics.md §5)."""

from __future__ import annotations

import time

import click

from pcb_analysis.paths import check_output_path


@click.command("stats")
@click.option(
    "--dump", "dump_dir", required=True, type=click.Path(file_okay=False),
    help="Dump directory (with manifest.json).",
)
@click.option(
    "--out", required=True, type=click.Path(dir_okay=False),
    help="Statistics file to write (.npz, atomically).",
)
@click.option(
    "--gt", default=None, type=click.Path(dir_okay=False),
    help="The split's LVIS annotation file: ground-truth instances per class (on the dump's images) "
    "for the diagnostics, stored in OUT.",
)
@click.option(
    "--no-clip-mass", is_flag=True,
    help="Skip the second pass over the dump that measures the mass cm's clipping removes.",
)
@click.option(
    "--clip-rows", type=click.IntRange(min=0), default=262_144, show_default=True,
    help="At most this many positives (every s-th) for the clipped mass; 0: all of them.",
)
@click.option(
    "--split-name", default=None,
    help="Split name recorded in the statistics (default: the dump's split).",
)
@click.option(
    "--chunk-rows", type=click.IntRange(min=1), default=8192, show_default=True,
    help="Rows read per chunk.",
)
@click.option(
    "--allow-partial", is_flag=True,
    help="Accept an unfinished dump and use its complete shards only.",
)
@click.option(
    "--threads", type=click.IntRange(min=0), default=0,
    help="torch intra-op threads (0: torch's default).",
)
@click.option(
    "--split-folds", "split_folds", type=click.IntRange(min=2), default=None,
    help="Also write OUT-stem.fold<i>of<F>.npz, i = 1..F: the statistics of every image EXCEPT fold i "
    "(folds: a seeded hash of the image id), for `pcbkit calibrate --cross-fit`. One more dump pass.",
)
@click.option(
    "--fold-seed", type=click.IntRange(min=0), default=0, show_default=True,
    help="Seed of the image-to-fold hash (with --split-folds).",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def stats_cmd(
    dump_dir: str,
    out: str,
    gt: str | None,
    no_clip_mass: bool,
    clip_rows: int,
    split_name: str | None,
    chunk_rows: int,
    allow_partial: bool,
    threads: int,
    split_folds: int | None,
    fold_seed: int,
    no_progress: bool,
) -> None:
    """Accumulate S, n, H over the dump's positive proposals and save them with provenance.

    Streams the dump in bounded memory (a second pass over its positives measures cm's clipped
    mass; --no-clip-mass skips it), then prints the regime diagnostics. A truncated or corrupted
    shard, NaN/inf logits or a category-space mismatch stop the run with an error naming the
    shard, and an existing OUT is left untouched.
    """
    # torch (behind pcb_analysis.dumps / .stats) is imported only when the command runs, not for --help
    import torch

    from pcb_analysis.dumps import DumpReader
    from pcb_analysis.folds import fold_statistics, write_fold_statistics
    from pcb_analysis.regime import diagnose, stats_from_dump

    check_output_path(out, "--out")  # before the dump is read, not after
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    reader = DumpReader(dump_dir, allow_unfinished=allow_partial)
    # bounded by memory before anything is allocated: the read buffers plus a float32 softmax of a chunk
    chunk_rows = reader.check_chunk_memory(chunk_rows, ("image_ids", "logits", "labels"),
                                           work_bytes_per_row=8 * (reader.num_classes + 1))
    st = stats_from_dump(reader, gt=gt, clip_mass=not no_clip_mass, clip_rows=clip_rows or None,
                         progress=not no_progress, chunk_rows=chunk_rows, split=split_name)
    folds = []
    if split_folds is not None:  # computed before anything is written: a bad dump leaves no file
        folds = fold_statistics(reader, split_folds, fold_seed, gt=gt, progress=not no_progress,
                                chunk_rows=chunk_rows, split=split_name)
    elapsed = time.perf_counter() - t0
    st.save(out)  # atomic: an existing good OUT survives any failure before this point or during it
    for path, fold in zip(write_fold_statistics(out, folds), folds, strict=True):
        info = fold.extra["fold"]
        click.echo(f"wrote {path}: every image except fold {info['fold']} of {info['folds']} "
                   f"({info['images']} images, {int(fold.n.sum()):,} positives; seed {info['seed']})")
    for line in st.summary_lines(reader.num_rows):
        click.echo(line)
    for line in diagnose(st).lines():
        click.echo(line)
    rate = reader.num_rows / elapsed if elapsed > 0 else float("inf")
    click.echo(f"wrote {out} ({elapsed:.1f} s, {rate:,.0f} rows/s)")
