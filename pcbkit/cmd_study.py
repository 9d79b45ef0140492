"""`pcbkit study`: parse the options, run `pcb_train.study.run_study_models`, print the report path.

One model: `--config C --checkpoint P [--name N]` (as before). Several side by side: `--model
NAME=CONFIG:CHECKPOINT`, repeated (the first is the reference of the comparisons; `--name` then names
the study's folders and title). CONFIG must not contain ':'."""

from __future__ import annotations

from pathlib import Path

import click

from pcb_analysis.errors import PcbkitError
from pcb_analysis.paths import check_name, check_output_path

FILE = click.Path(dir_okay=False)
FOLDER = click.Path(file_okay=False)


@click.command("study")
@click.option("--config", type=FILE, default=None, help="Model config (YAML); one model.")
@click.option("--checkpoint", type=FILE, default=None, help="Trained checkpoint; one model.")
@click.option("--model", "model_specs", multiple=True, metavar="NAME=CONFIG:CHECKPOINT",
              help="A model of a side-by-side study (repeat; the first is the reference).")
@click.option("--train-gt", required=True, type=FILE, help="LVIS train annotations.")
@click.option("--val-gt", required=True, type=FILE, help="LVIS val annotations.")
@click.option("--images", required=True, type=FOLDER, help="Image root (file_name relative to it).")
@click.option("--name", default="study", show_default=True,
              help="Name of the model in the report (with --model: of the study).")
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
    config: str | None, checkpoint: str | None, model_specs: tuple[str, ...], train_gt: str, val_gt: str,
    images: str, name: str, work: str | None,
    report: str | None, train_dump_images: int | None, val_images: int | None, batch_size: int, device: str,
    no_fixed_ap: bool, bootstrap: int, force: bool,
) -> None:
    """Run the study for one or more checkpoints: dump, stats, calibrate (val and train matrices), report."""
    # lazy: the library imports torch, which `pcbkit --help` must not pay for
    from pcb_train.study import StudyInputs, StudyModel, run_study_models

    check_name(name, "--name")  # folders and files of the study are named after it
    models = [StudyModel(name=n, config=c, checkpoint=k)
              for n, c, k in study_models(config, checkpoint, name, model_specs)]
    for path, option in ((work, "--work"), (report, "--report")):
        if path is not None:
            check_output_path(path, option, folder=True)
    inp = StudyInputs(
        train_gt=Path(train_gt), val_gt=Path(val_gt), images=Path(images),
        work=Path(work or f"runs/study/{name}"), report=Path(report or f"reports/{name}"),
        train_dump_images=train_dump_images, val_images=val_images, batch_size=batch_size, device=device,
        force=force, fixed_ap=not no_fixed_ap, bootstrap=bootstrap,
    )
    path = run_study_models(models, inp, title=name)
    click.echo(f"report: {path}")


def parse_model_spec(spec: str) -> tuple[str, Path, Path]:
    """'NAME=CONFIG:CHECKPOINT' -> (name, config, checkpoint); one-line PcbkitError when malformed."""
    name, eq, rest = spec.partition("=")
    config, colon, checkpoint = rest.partition(":")
    if not (eq and colon and name and config and checkpoint):
        raise PcbkitError(f"--model {spec!r}: expected NAME=CONFIG:CHECKPOINT")
    check_name(name, "--model")
    return name, Path(config), Path(checkpoint)


def study_models(
    config: str | None, checkpoint: str | None, name: str, specs: tuple[str, ...]
) -> list[tuple[str, Path, Path]]:
    """The study's (name, config, checkpoint) list from either --config/--checkpoint/--name or --model."""
    if specs:
        if config is not None or checkpoint is not None:
            raise PcbkitError("--model: give either --model (repeatable) or --config/--checkpoint, not both")
        models = [parse_model_spec(s) for s in specs]
        names = [m[0] for m in models]
        if len(set(names)) != len(names):
            raise PcbkitError(f"--model: model names must differ (got {', '.join(names)})")
        return models
    if config is None or checkpoint is None:
        raise PcbkitError("study: give --config and --checkpoint, or --model NAME=CONFIG:CHECKPOINT")
    return [(name, Path(config), Path(checkpoint))]
