"""What a training run reports: the log-window meter, metrics.jsonl / TensorBoard, the progress line.

A log window is the iterations since the last train record; `WindowMeter` sums their scalars
(and is checkpointed, so a resumed run logs the same means). Records are plain dicts written on
rank 0 only: `{"type": "train" | "eval", "iteration": <0-based index of the last step>, ...}`,
one JSON object per line in metrics.jsonl, numbers also as TensorBoard scalars (`train/<key>`,
`eval/<nested/key>`) when the `tensorboard` package is installed. A resumed run cuts both back
to its checkpoint's iteration (`truncate_metrics`, TensorBoard's `purge_step`).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pcb_analysis.atomic import os_errors_named, write_text_atomic

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
EVENTS_PREFIX = "events.out.tfevents."
LOSS_SHORT = {
    "loss_classifier": "cls",
    "loss_box_reg": "box",
    "loss_mask": "mask",
    "loss_objectness": "obj",
    "loss_rpn_box_reg": "rpn",
}


class WindowMeter:
    """Sums of per-iteration scalars since the last log line (checkpointed for exact resume)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0
        self.time = 0.0
        self.data_time = 0.0

    def add(self, values: Mapping[str, float], seconds: float, data_seconds: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1
        self.time += seconds
        self.data_time += data_seconds

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}

    def reset(self) -> None:
        self.sums, self.count, self.time, self.data_time = {}, 0, 0.0, 0.0

    def state_dict(self) -> dict[str, Any]:
        return {"sums": dict(self.sums), "count": self.count, "time": self.time, "data_time": self.data_time}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sums = {str(k): float(v) for k, v in state.get("sums", {}).items()}
        self.count = int(state.get("count", 0))
        self.time = float(state.get("time", 0.0))
        self.data_time = float(state.get("data_time", 0.0))


def format_seconds(s: float) -> str:
    """h:mm:ss of a duration in seconds."""
    s = max(0, int(round(s)))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_ap(v: Any) -> str:
    """An AP in [0, 1] as a percentage with one decimal; '-' for None."""
    return "-" if v is None else f"{100 * float(v):.1f}"


def progress_line(record: Mapping[str, Any], max_iter: int) -> str:
    """The one-line progress summary of a train record."""
    parts = [f"iter {record['iteration'] + 1}/{max_iter}", f"loss {record['loss']:.4f}"]
    terms = [f"{short} {record[k]:.3f}" for k, short in LOSS_SHORT.items() if k in record]
    if terms:
        parts[-1] += " (" + " ".join(terms) + ")"
    parts.append(f"lr {record['lr']:.5f}")
    parts.append(f"{record['time']:.3f} s/it (data {record['data_time']:.3f})")
    parts.append(f"eta {format_seconds(record['eta_seconds'])}")
    if "pcb_active" in record:
        state = "on" if record["pcb_active"] else ("waiting for classes" if record["pcb_started"] else "off")
        diag = record.get("cm_diag_mean")
        parts.append(f"pcb {state}" + (f" (cm diag {diag:.3f})" if diag is not None else ""))
    return "  ".join(parts)


def truncate_metrics(path: Path, keep_before: int) -> None:
    """Keep the records of iterations < keep_before (a resumed run rewrites the rest)."""
    if not path.is_file():
        return
    kept: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by the interruption
        if isinstance(rec, dict) and int(rec.get("iteration", keep_before)) < keep_before:
            kept.append(line)
    write_text_atomic(path, "".join(s + "\n" for s in kept))


class RunLog:
    """metrics.jsonl (+ TensorBoard) of rank 0; a no-op on other ranks."""

    def __init__(
        self, out_dir: Path, enabled: bool, purge_step: int | None, tensorboard: bool = True
    ) -> None:
        self.path = out_dir / METRICS_FILE
        self.enabled = enabled
        self.writer: Any = None
        if enabled and tensorboard:
            try:  # lazy: tensorboard is optional and slow to import
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                logger.info("TensorBoard events skipped: the `tensorboard` package is not installed")
            else:
                self.writer = SummaryWriter(log_dir=str(out_dir), purge_step=purge_step)

    def write(self, record: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        with os_errors_named(self.path), open(self.path, "a", encoding="utf-8") as f:  # full disk: one line
            f.write(json.dumps(record, allow_nan=False) + "\n")
        if self.writer is not None:
            step = int(record["iteration"])
            prefix = "train" if record.get("type") == "train" else "eval"
            for k, v in flatten(record).items():
                if k in ("iteration", "type") or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
            if "pcb_active" in record:
                self.writer.add_scalar("train/pcb_active", float(record["pcb_active"]), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


def flatten(d: Mapping[str, Any], sep: str = "/", prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> one level, keys joined by `sep` ("a/b" for TensorBoard, "a.b" for configs)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, sep, f"{prefix}{k}{sep}"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def finite_or_none(v: float) -> float | None:
    return v if math.isfinite(v) else None
