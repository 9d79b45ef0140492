"""`pcbkit stats`: stream a logit dump into class statistics (S, n, H -> confusion matrix, mean score)."""

from __future__ import annotations

from typing import Any

import click


@click.command("stats")
@click.option("--dump", "dump_dir", required=True, type=click.Path(file_okay=False), help="Dump directory (with manifest.json).")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Statistics file to write (.npz, atomically).")
@click.option("--split-name", default=None, help="Split name recorded in the statistics (default: the dump's split).")
@click.option("--chunk-rows", type=click.IntRange(min=1), default=8192, show_default=True, help="Rows read per chunk.")
@click.option("--allow-partial", is_flag=True, help="Accept an unfinished dump and use its complete shards only.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="torch intra-op threads (0: torch's default).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def stats_cmd(
    dump_dir: str,
    out: str,
    split_name: str | None,
    chunk_rows: int,
    allow_partial: bool,
    threads: int,
    no_progress: bool,
) -> None:
    """Accumulate S, n, H over the dump's positive proposals and save them with provenance.

    Streams the dump in bounded memory; a truncated or corrupted shard, NaN/inf logits or a
    category-space mismatch stop the run with an error naming the shard, and an existing OUT is
    left untouched.
    """
    import time

    from pcb_analysis.dumps import DumpReader, stats_from_dump

    if threads:
        import torch

        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    reader = DumpReader(dump_dir, allow_unfinished=allow_partial)
    st = stats_from_dump(reader, progress=not no_progress, chunk_rows=chunk_rows, split=split_name)
    elapsed = time.perf_counter() - t0
    st.save(out)  # atomic: an existing good OUT survives any failure before this point or during it
    for line in summary_lines(st, reader.categories, reader.num_rows):
        click.echo(line)
    rate = reader.num_rows / elapsed if elapsed > 0 else float("inf")
    click.echo(f"wrote {out} ({elapsed:.1f} s, {rate:,.0f} rows/s)")


def summary_lines(st: Any, categories: Any, rows: int) -> list[str]:
    """Rows read, positives, classes without positives, mean score (diagonal) per r/c/f bucket."""
    import torch

    n = st.n.to(torch.int64)
    empty = st.empty_classes()
    ms = st.mean_score(warn=False).to(torch.float64)
    k = int(n.numel())
    lines = [
        f"rows read: {rows:,}; positives: {int(n.sum()):,}; background: {st.background:,}; ignored: {st.ignored:,} "
        f"(split {st.split or '?'}, K={k})",
    ]
    n_empty = int(empty.sum())
    if n_empty:
        names = [categories.names[i] for i in torch.nonzero(empty).flatten().tolist()]
        by_bucket = ", ".join(
            f"{f} {sum(1 for i in categories.bucket_indices(f) if bool(empty[i]))}" for f in ("r", "c", "f")
        )
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        lines.append(f"classes with no positives: {n_empty} of {k} ({by_bucket}): {shown}")
    else:
        lines.append(f"classes with no positives: 0 of {k}")
    parts = []
    for f in ("r", "c", "f"):
        idx = [i for i in categories.bucket_indices(f) if not bool(empty[i])]
        total = len(categories.bucket_indices(f))
        if idx:
            parts.append(f"{f} {float(ms[idx].mean()):.4f} ({len(idx)}/{total} classes)")
        else:
            parts.append(f"{f} - (0/{total} classes)")
    filled = torch.nonzero(~empty).flatten()
    overall = f"{float(ms[filled].mean()):.4f}" if len(filled) else "-"
    lines.append("mean score (diagonal, non-empty classes): " + "; ".join(parts) + f"; all {overall}")
    return lines
