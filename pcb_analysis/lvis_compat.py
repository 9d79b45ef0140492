"""lvis-api (PyPI `lvis` 0.5.3) on current numpy, and a runner that uses it as the reference.

lvis 0.5.3 calls `np.float`, which numpy removed in 1.24. Rather than pinning an old numpy or
patching numpy globally, `lvis.eval`'s own module-level `np` name is pointed at a thin proxy of
numpy that also answers `float` (the builtin, which is what `np.float` always was). Nothing
outside `lvis.eval` sees a change. lvis also needs pycocotools without declaring it; pcbkit
declares it.
"""

from __future__ import annotations

import copy
import json
import logging
import types
import warnings
from pathlib import Path
from typing import Any

import numpy as np


class _NumpyWithFloat(types.ModuleType):
    """numpy, plus the removed alias `float` -> builtin float."""

    float = float

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def lvis_eval_module() -> types.ModuleType:
    """Import `lvis.eval` with the numpy alias in place (idempotent)."""
    # lvis-api is an optional reference (tests, benchmarks, `--reference`), never needed by pcbkit itself
    import lvis.eval as lvis_eval_mod

    if not isinstance(lvis_eval_mod.np, _NumpyWithFloat):
        lvis_eval_mod.np = _NumpyWithFloat("numpy")
    logging.getLogger("lvis").setLevel(logging.ERROR)
    return lvis_eval_mod


def reference_evaluate(
    gt: str | Path | dict[str, Any],
    results: str | Path | list[dict[str, Any]],
    iou_type: str = "segm",
    *,
    max_dets: int = 300,
) -> dict[str, float]:
    """Run lvis-api itself (slow, pure Python): the reference pcbkit's fast evaluator must match."""
    from lvis import LVIS, LVISResults  # optional reference: imported only when it is asked for

    mod = lvis_eval_module()
    if isinstance(gt, dict):
        lvis_gt = LVIS.__new__(LVIS)
        lvis_gt.logger = logging.getLogger("lvis.lvis")
        lvis_gt.dataset = copy.deepcopy(gt)
        lvis_gt._create_index()
    else:
        lvis_gt = LVIS(str(gt))
    if isinstance(results, (str, Path)):
        with open(results, encoding="utf-8") as f:
            results = json.load(f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # lvis calls the deprecated Logger.warn
        lvis_dt = LVISResults(lvis_gt, copy.deepcopy(results), max_dets=max_dets)
        ev = mod.LVISEval(lvis_gt, lvis_dt, iou_type=iou_type)
        ev.params.max_dets = max_dets
        ev.run()
    out = {k: float(v) for k, v in ev.get_results().items()}
    if max_dets < 0:  # lvis-api names AR after max_dets; pcbkit says "all" for "no cap"
        out = {k.replace(f"@{max_dets}", "@all"): v for k, v in out.items()}
    return out
