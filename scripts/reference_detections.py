"""Write REFERENCE detections for an LVIS split: jittered ground truth, NOT a detector's output.

Used by `make demo` until the training pipeline exists, to exercise `pcbkit evaluate` end to end.
"""

from __future__ import annotations

import argparse
import sys

from pcb_analysis.atomic import write_json_atomic
from pcb_analysis.errors import PcbkitError
from pcb_analysis.eval_cases import jittered_detections
from pcb_analysis.lvis_json import read_lvis_json


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--gt", required=True, help="LVIS annotation file")
    ap.add_argument("--out", required=True, help="results JSON to write")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        gt = read_lvis_json(args.gt)
    except PcbkitError as err:  # its message starts with the path
        print(f"reference_detections: error: {err}", file=sys.stderr)
        return 2
    try:
        dets = jittered_detections(gt, seed=args.seed)
    except (KeyError, PcbkitError) as err:
        print(f"reference_detections: error: {args.gt}: {err}", file=sys.stderr)
        return 2
    write_json_atomic(args.out, dets)
    print(f"wrote {len(dets)} REFERENCE detections (jittered ground truth, not a model) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
