"""`pcbkit study`: parse the options, run `pcb_train.study.run_study`, print the report path."""

from __future__ import annotations

from pathlib import Path

import click

from pcb_analysis.paths import check_name, check_output_path

FILE = click.Path(dir_okay=False)
FOLDER = click.Path(file_okay=False)


@click.command("study")
@click.option("--config", required=True, type=FILE, help="Model config (YAML).")
@click.option("--checkpoint", required=True, type=FILE, help="Trained checkpoint.")
@click.option("--train-gt", required=True, type=FILE, help="LVIS train annotations.")
@click.option("--val-gt", required=True, type=FILE, help="LVIS val annotations.")
@click.option("--images", required=True, type=FOLDER, help="Image root (file_name relative to it).")
@click.option("--name", default="study", show_default=True, help="Name of the model in the report.")
@click.option("--work", type=FOLDER, default=None, help="Dumps, stats, results [runs/study/NAME].")
@click.option("--report", type=FOLDER, default=None, help="Report dir [reports/NAME].")
@click.option("--train-dump-images", type=int, default=None,
              help="Cap on train images dumped for the train matrix.")
@click.option("--val-images", type=int, default=None, help="Cap on val images (default: all).")
@click.option("--batch-size", type=int, default=4, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--no-fixed-ap", is_flag=True,
              help="Skip fixed AP in calibrate (uncapped detections: the slow part on a CPU).")
@click.option("--bootstrap", type=click.IntRange(min=0), default=200, show_default=True,
              help="Image resamples of the paired bootstrap intervals (0: none).")
@click.option("--force", is_flag=True, help="Redo every step.")
def study_cmd(
    config: str, checkpoint: str, train_gt: str, val_gt: str, images: str, name: str, work: str | None,
    report: str | None, train_dump_images: int | None, val_images: int | None, batch_size: int, device: str,
    no_fixed_ap: bool, bootstrap: int, force: bool,
) -> None:
    """Run the study for a checkpoint: dump, stats, calibrate (val and train matrices), report."""
    # lazy: the library imports torch, which `pcbkit --help` must not pay for
    from pcb_train.study import StudyInputs, run_study

    check_name(name, "--name")  # folders and files of the study are named after it
    for path, option in ((work, "--work"), (report, "--report")):
        if path is not None:
            check_output_path(path, option, folder=True)
    inp = StudyInputs(
        train_gt=Path(train_gt), val_gt=Path(val_gt), images=Path(images),
        work=Path(work or f"runs/study/{name}"), report=Path(report or f"reports/{name}"),
        train_dump_images=train_dump_images, val_images=val_images, batch_size=batch_size, device=device,
        force=force, fixed_ap=not no_fixed_ap, bootstrap=bootstrap,
    )
    path = run_study(name, Path(config), Path(checkpoint), inp)
    click.echo(f"report: {path}")
