"""`pcbkit calibrate`: post-hoc calibration inside post-processing, evaluated on LVIS (Tables 1, 4).

R proposals, K foreground classes; q [R, K+1] = softmax over all K+1 logits, background last.
Every row of the table is a transform q -> q~ that keeps the background (docs/method.md §3),
applied BEFORE the standard post-processing (`pcb_train.backends.select_detections`). Two
modes share that post-processing: in-model (`calibrate_model(s)`, `model`: one backbone pass for
every statistic, mask and box AP) and offline (`calibrate_from_dump`, `offline`: box AP from a
dump). Rows (`rows`): the statistics table of `pcb_analysis.calibration`, knob sweeps (`sweeps`,
§7), norcal(gamma), logit-adj(tau). Standard AP and fixed AP (docs/calibration.md §3); results and
metrics per row (`results`, `report`); where the statistics come from and the protocol (in-sample,
train, cross-fitted: `protocols`) are recorded (docs/calibration.md §4, §8).
"""

from __future__ import annotations

from pcb_train.calibrate.model import MASK_THRESHOLD, calibrate_model, calibrate_models
from pcb_train.calibrate.offline import (
    OFFLINE_CHUNK_ROWS,
    calibrate_from_dump,
    class_probabilities_for,
    iter_dump_images,
    postprocess_records,
)
from pcb_train.calibrate.options import SHARED_PASS_FIELDS, CalibrateConfig
from pcb_train.calibrate.protocols import PROTOCOLS, CrossFit, calibration_rows, load_cross_fit, protocol_of
from pcb_train.calibrate.report import (
    DUMP_COLUMNS,
    MODEL_COLUMNS,
    CalibrationReport,
    format_report_table,
    table_csv,
)
from pcb_train.calibrate.results import RESULTS_PROTOCOL, RowResults, evaluate_results, open_row_results
from pcb_train.calibrate.rows import (
    DEFAULT_STATS,
    STAT_CHOICES,
    TRAIN_MATRIX,
    UPPER_BOUND,
    StatRow,
    build_rows,
    instance_prior,
    load_statistics,
    parse_grid,
    select_stats,
    statistics_relation,
    tau_prior,
)
from pcb_train.calibrate.sweeps import (
    DEFAULT_IBU_START,
    DEFAULT_MS_EQ_ITERATIONS,
    KNOBS,
    SWEEP_STATISTICS,
    Grid,
    KnobRow,
    grid_rows,
    parse_grids,
)

__all__ = [
    "DEFAULT_IBU_START",
    "DEFAULT_MS_EQ_ITERATIONS",
    "DEFAULT_STATS",
    "KNOBS",
    "PROTOCOLS",
    "SWEEP_STATISTICS",
    "CrossFit",
    "Grid",
    "KnobRow",
    "calibration_rows",
    "grid_rows",
    "load_cross_fit",
    "parse_grids",
    "protocol_of",
    "DUMP_COLUMNS",
    "MASK_THRESHOLD",
    "MODEL_COLUMNS",
    "OFFLINE_CHUNK_ROWS",
    "RESULTS_PROTOCOL",
    "SHARED_PASS_FIELDS",
    "STAT_CHOICES",
    "TRAIN_MATRIX",
    "UPPER_BOUND",
    "CalibrateConfig",
    "CalibrationReport",
    "RowResults",
    "StatRow",
    "build_rows",
    "calibrate_from_dump",
    "calibrate_model",
    "calibrate_models",
    "class_probabilities_for",
    "evaluate_results",
    "format_report_table",
    "instance_prior",
    "iter_dump_images",
    "load_statistics",
    "open_row_results",
    "parse_grid",
    "postprocess_records",
    "run_calibration",
    "select_stats",
    "statistics_relation",
    "table_csv",
    "tau_prior",
]


def run_calibration(cfg: CalibrateConfig) -> CalibrationReport:
    """`calibrate_from_dump` when `cfg.dump` is set, else `calibrate_model`."""
    return calibrate_from_dump(cfg) if cfg.dump is not None else calibrate_model(cfg)
