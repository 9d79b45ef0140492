"""`pcbkit calibrate`: parse the options, run `pcb_train.calibrate.run_calibration`, print the table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from pcb_analysis.paths import check_name, check_output_path


def _statistics_table() -> Any:
    # lazy: pcb_analysis.calibration imports torch, which `pcbkit --help` must not pay for
    from pcb_analysis import calibration

    return calibration


class _StatisticChoice(click.Choice):
    """`--stat`'s choices: the parameter-free rows of the statistics table and the swept estimators,
    read when first needed."""

    def __init__(self) -> None:
        super().__init__(())

    @property  # type: ignore[override]
    def choices(self) -> tuple[str, ...]:
        # lazy, like the table: pcb_train.calibrate imports torch
        from pcb_train.calibrate.rows import STAT_CHOICES

        return STAT_CHOICES

    @choices.setter
    def choices(self, value: Any) -> None:  # click.Choice.__init__ assigns it; the table decides
        pass


class _TableHelpOption(click.Option):
    """An option whose help names statistics of the table: {defaults} and {matrix}, filled when shown."""

    def get_help_record(self, ctx: click.Context) -> tuple[str, str] | None:
        record = super().get_help_record(ctx)
        if record is None:
            return None
        table = _statistics_table()
        spec, text = record
        return spec, text.format(defaults=", ".join(table.DEFAULT_STATISTICS),
                                 matrix=", ".join(table.MATRIX_STATISTICS))


FILE = click.Path(dir_okay=False, path_type=Path)
FOLDER = click.Path(file_okay=False, path_type=Path)


@click.command("calibrate")
@click.option("--stat", "stat_names", multiple=True, type=_StatisticChoice(), cls=_TableHelpOption,
              help="Statistic to evaluate (repeatable). Default: {defaults} (without --gamma/--tau). "
                   "cm-diagshrink, cm-tikhonov, ibu, ms-eq need their --grid.")
@click.option("--grid", "grid_texts", multiple=True, metavar="KNOB=V1,V2,...",
              help="Sweep a knob, one row per value (repeatable): lambda (cm-diagshrink, [0,1]), tau "
                   "(cm-tikhonov, >=0), k (ibu, int >=0), eta (ms-eq, >=0), a (row prior of every "
                   "selected matrix statistic, >=0). E.g. --stat cm-diagshrink --grid lambda=0,0.5,1.")
@click.option("--ibu-start", type=click.Choice(["ms", "uniform"]), default="ms", show_default=True,
              help="ibu's start in a k sweep (from ms, k=0 is the ms row; uniform refuses k=0).")
@click.option("--ms-eq-iterations", type=click.IntRange(min=1), default=10, show_default=True,
              help="ms-eq's iterations in an eta sweep (fitted on the statistics' dump).")
@click.option("--cross-fit", is_flag=True,
              help="Cross-fitted protocol: calibrate each image of fold i with the statistics of the other "
                   "folds, read from STATS-stem.fold<i>of<F>.npz (`pcbkit stats --split-folds F`); one "
                   "results file per row, evaluated once.")
@click.option("--stats", "stats_path", required=True, type=FILE,
              help="Statistics file from `pcbkit stats` (.npz).")
@click.option("--checkpoint", type=FILE, default=None, help="pcbkit checkpoint (in-model mode).")
@click.option("--config", "config_path", type=FILE, default=None,
              help="Config YAML of the checkpoint's model (in-model mode).")
@click.option("--gt", required=True, type=FILE, help="LVIS annotation file of the evaluated split.")
@click.option("--images", type=FOLDER, default=None, help="Image folder (in-model mode).")
@click.option("--dump", "dump_dir", type=FOLDER, default=None,
              help="Offline mode: a full dump with per-class boxes (`dump-logits --boxes per-class`); "
                   "box AP without the model.")
@click.option("--out", required=True, type=FOLDER,
              help="Output folder: <split>-<stat>.json results, metrics.json, metrics.csv.")
@click.option("--split", default=None,
              help="Name of the evaluated split (default: the dump's split, else the --gt file's stem).")
@click.option("--ridge", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
              cls=_TableHelpOption, help="M <- (1-L) M + L I for {matrix}.")
@click.option("--gamma", "gamma_text", default=None,
              help="NorCal rows p/n_img^gamma, a comma list (e.g. 0,0.5,1).")
@click.option("--tau", "tau_text", default=None,
              help="Logit-adjustment rows z - tau*log(instance prior), a comma list (e.g. 0.5,1).")
@click.option("--max-images", type=click.IntRange(min=1), default=None,
              help="Evaluate the first N images (by id) only.")
@click.option("--batch-size", type=click.IntRange(min=1), default=2, show_default=True,
              help="Images per forward pass.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Image-decoding worker processes.")
@click.option("--no-fixed-ap", is_flag=True,
              help="Skip fixed AP (uncapped detections, 10,000 per class: <split>-<stat>-fixed.json).")
@click.option("--max-dets", type=click.IntRange(min=1), default=300, show_default=True,
              help="Also evaluate standard AP at N detections per image (at most the detector's cap), e.g. "
                   "the LVIS-equivalent round(300 K / 1230); computed from the same results files.")
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON instead of the table.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def calibrate_cmd(
    stat_names: tuple[str, ...],
    grid_texts: tuple[str, ...],
    ibu_start: str,
    ms_eq_iterations: int,
    cross_fit: bool,
    stats_path: Path,
    checkpoint: Path | None,
    config_path: Path | None,
    gt: Path,
    images: Path | None,
    dump_dir: Path | None,
    out: Path,
    split: str | None,
    ridge: float,
    gamma_text: str | None,
    tau_text: str | None,
    max_images: int | None,
    batch_size: int,
    device: str,
    workers: int,
    no_fixed_ap: bool,
    max_dets: int,
    as_json: bool,
    no_progress: bool,
) -> None:
    """Apply post-hoc calibrations inside post-processing (calibrate, then score > 1e-4, class-wise
    NMS 0.5, top 300; masks on the calibrated detections) and evaluate each on LVIS: mask AP, APr,
    APc, APf, box AP, and fixed AP (no per-image cap, 10,000 detections per class: Dave et al.
    2021). All statistics share ONE inference pass.

    Statistics of the evaluated split give the paper's upper bound (Table 1); those of the
    training split the train-set matrix (Table 4); the output records which (`protocol`);
    --cross-fit calibrates each image with statistics that never saw it. --grid sweeps an
    estimator's knob, one row per value. With --dump no model is run: box AP from a dump, the same
    post-processing.
    """
    # lazy: the library imports torch, which `pcbkit --help` must not pay for
    from pcb_train.calibrate import (
        CalibrateConfig,
        format_report_table,
        parse_grid,
        parse_grids,
        run_calibration,
        select_stats,
    )

    check_output_path(out, "--out", folder=True)
    if split is not None:
        check_name(split, "--split")
    gammas = parse_grid(gamma_text, "--gamma")
    taus = parse_grid(tau_text, "--tau")
    grids = parse_grids(grid_texts)
    cfg = CalibrateConfig(
        stats=stats_path,
        gt=gt,
        out=out,
        stat=select_stats(stat_names, gammas, taus),
        checkpoint=checkpoint,
        config=config_path,
        images=images,
        dump=dump_dir,
        split=split,
        ridge=ridge,
        gammas=gammas,
        taus=taus,
        max_images=max_images,
        batch_size=batch_size,
        device=device,
        num_workers=workers,
        progress=not no_progress,
        fixed_ap=not no_fixed_ap,
        max_dets=max_dets,
        grids=grids,
        ibu_start=ibu_start,
        ms_eq_iterations=ms_eq_iterations,
        cross_fit=cross_fit,
    )
    report = run_calibration(cfg)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
        return
    click.echo(format_report_table(report))
    click.echo(f"wrote {len(report.rows)} results file(s) and metrics to {out} ({report.seconds:.1f} s)")
