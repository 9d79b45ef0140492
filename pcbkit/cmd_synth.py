"""`pcbkit synth`: write the embedded synthetic long-tailed dataset (LVIS v1 format).

Only click (and the standard library) is imported at module level: the generator pulls in numpy, PIL
and pycocotools, so it loads inside the command and `pcbkit --help` stays instant. The option defaults
repeat `pcb_analysis.synth.SynthConfig`'s (a test keeps them equal).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from pcb_analysis.paths import check_output_path


@click.command("synth", short_help="Generate the synthetic long-tailed LVIS dataset.")
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder: train.json, val.json and images/{train,val}/ go here.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Random seed (same seed, same bytes).")
@click.option("--classes", type=int, default=48, show_default=True, help="Number of categories K.")
@click.option("--train-images", type=int, default=1500, show_default=True, help="Training images.")
@click.option("--val-images", type=int, default=400, show_default=True, help="Validation images.")
@click.option("--size", type=int, default=128, show_default=True, help="Image side in pixels (square).")
@click.option(
    "--neg-mode",
    type=click.Choice(["random", "sibling"]),
    default="random",
    show_default=True,
    help="neg_category_ids: a random sample of images per class (LVIS) or absent look-alikes per image.",
)
def synth_cmd(
    out_dir: Path, seed: int, classes: int, train_images: int, val_images: int, size: int, neg_mode: str
) -> None:
    """Generate the synthetic long-tailed LVIS-format dataset (confusable r/c/f class families)."""
    from pcb_analysis.synth import SynthConfig, generate  # heavy: see the module docstring

    check_output_path(out_dir, "--out", folder=True)
    cfg = SynthConfig(
        seed=seed, num_classes=classes, train_images=train_images, val_images=val_images, size=size,
        neg_mode=neg_mode,
    )
    start = time.perf_counter()
    summary = generate(out_dir, cfg, progress=True)
    seconds = time.perf_counter() - start
    b = summary.bucket_counts
    click.echo(f"synthetic LVIS dataset in {summary.out_dir} ({seconds:.1f} s)")
    for split in ("train", "val"):
        click.echo(
            f"  {split:<5} {summary.annotation_files[split]}: {summary.num_images[split]} images, "
            f"{summary.num_annotations[split]} annotations, images in {summary.image_dirs[split]}"
        )
    click.echo(
        f"  classes {cfg.num_classes}: r {b['r']} / c {b['c']} / f {b['f']} (LVIS thresholds on training "
        f"image counts); images written {summary.images_written}, reused {summary.images_reused}"
    )
