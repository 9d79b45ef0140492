"""Benchmark: `pcbkit stats` streaming speed and memory at LVIS scale (K = 1,203 + background).

Writes a float16 dump of >= 2 million proposal rows to a temporary directory (removed at the end),
then times, each in a fresh subprocess (so peak RSS is per phase):

  (a) pcbkit   `ClassStats.from_dump`: manifest + size checks, CRC-32, finiteness, softmax, S/n/H update
  (b) numpy    a straightforward baseline: np.load(mmap) chunks, float64 softmax rows, np.add.at
               (run on a subset of rows when slow; its rows/s is extrapolated and says so)
  (c) roofline just reading the logits + labels shards and computing the foreground softmax
               (float32, torch), nothing else

and prints rows/s, the ratios (c)/(a) (goal <= 1.3) and (a)/(b) (goal >= 10) and the peak RSS of
(a) at two dump sizes (goal < 1.5 GB, independent of the dump size). The dump normally fits in the
page cache, so this measures CPU cost, not the disk. Logits [R, K+1], background = column K.

    python bench/stats_speed.py [--rows 2000000] [--classes 1203] [--positive-fraction 1.0]

Imports of torch and pcbkit stay inside the phase functions on purpose: each phase runs in its own
subprocess and reports its peak RSS, which must not include what the other phases load.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def peak_rss_bytes() -> int:
    """Peak resident set of this process image (VmHWM; ru_maxrss would include the parent's after
    fork+exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def cpu_seconds() -> float:
    """User + system CPU time of this process, all threads (robust to other load on a shared box)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# ------------------------------------------------------------------------------------ dump


def write_dump(
    out: Path, rows: int, k: int, positive_fraction: float, shard_rows: int, seed: int = 0
) -> float:
    """A dump of `rows` rows in images of 1,000 proposals; returns seconds spent writing."""
    from tqdm import tqdm

    from pcb_analysis.categories import CategorySpace
    from pcb_analysis.dumps import DumpWriter

    rng = np.random.default_rng(seed)
    freq = np.array(["r", "c", "f"])[rng.integers(0, 3, k)]
    space = CategorySpace(
        ids=tuple(range(1, k + 1)),
        names=tuple(f"class_{i}" for i in range(k)),
        frequency=tuple(str(f) for f in freq),
        image_count=tuple(int(c) for c in rng.integers(1, 1000, k)),
    )
    per_image = 1000
    pool_rows = 32 * per_image  # a pool of distinct rows; images take random windows of it
    pool = (rng.standard_normal((pool_rows, k + 1), dtype=np.float32) * 2.0).astype(np.float16)
    boxes = rng.uniform(0, 800, (per_image, 4)).astype(np.float32)
    ious = rng.uniform(0, 1, per_image).astype(np.float32)
    t0 = time.perf_counter()
    n_images = (rows + per_image - 1) // per_image
    with DumpWriter(out, space, "bench", {"bench": True}, shard_rows=shard_rows) as w:
        for i in tqdm(range(n_images), desc="write dump", unit="img", mininterval=1.0):
            r = min(per_image, rows - i * per_image)
            start = int(rng.integers(0, pool_rows - r + 1))
            labels = rng.integers(0, k, r)
            neg = rng.random(r) >= positive_fraction
            labels[neg] = np.where(rng.random(int(neg.sum())) < 0.9, k, -1)
            w.add_image(i, boxes[:r], pool[start : start + r], labels, ious[:r])
    return time.perf_counter() - t0


# ---------------------------------------------------------------------------------- phases


def phase_pcbkit(dump: Path, chunk_rows: int, max_shards: int | None) -> dict:
    from pcb_analysis.dumps import DumpReader
    from pcb_analysis.stats import ClassStats

    reader = DumpReader(dump)
    if max_shards is not None:  # the same reader on a smaller dump: peak RSS must not depend on size
        reader.shards = reader.shards[:max_shards]
        reader.num_rows = sum(s.rows for s in reader.shards)
    t0, c0 = time.perf_counter(), cpu_seconds()
    st = ClassStats.from_dump(reader, progress=False, chunk_rows=chunk_rows)
    return {
        "rows": reader.num_rows,
        "seconds": time.perf_counter() - t0,
        "cpu": cpu_seconds() - c0,
        "positives": int(st.n.sum()),
        "peak_rss": peak_rss_bytes(),
    }


def _iter_logits_labels(dump: Path, chunk_rows: int, max_rows: int | None):
    """Plain sequential reads of logits + labels into reused buffers (what any reader must do)."""
    man = json.loads((dump / "manifest.json").read_text())
    k1 = man["num_classes"] + 1
    zbuf = np.empty((chunk_rows, k1), np.float16)
    ybuf = np.empty(chunk_rows, np.int32)
    done = 0
    for s in man["shards"]:
        with open(dump / s["name"] / "logits.npy", "rb", buffering=0) as fz, open(
            dump / s["name"] / "labels.npy", "rb", buffering=0
        ) as fy:
            fz.seek(s["columns"]["logits"]["data_offset"])
            fy.seek(s["columns"]["labels"]["data_offset"])
            for start in range(0, s["rows"], chunk_rows):
                n = min(chunk_rows, s["rows"] - start)
                fz.readinto(memoryview(zbuf[:n]).cast("B"))
                fy.readinto(memoryview(ybuf[:n]).cast("B"))
                yield zbuf[:n], ybuf[:n]
                done += n
                if max_rows is not None and done >= max_rows:
                    return


def phase_roofline(dump: Path, chunk_rows: int, variant: str) -> dict:
    """Read logits + labels and compute the foreground softmax, nothing else.

    variant "inplace": convert into a reused float32 buffer, softmax of that (the fastest we know);
    variant "softmax": torch.softmax(fp16 slice, dtype=float32) (the one-liner).
    """
    import torch

    k = json.loads((dump / "manifest.json").read_text())["num_classes"]
    buf = torch.empty(chunk_rows, k, dtype=torch.float32)
    rows = 0
    t0, c0 = time.perf_counter(), cpu_seconds()
    for z, _y in _iter_logits_labels(dump, chunk_rows, None):
        zt = torch.from_numpy(z)[:, :k]
        if variant == "inplace":
            b = buf[: len(z)]
            b.copy_(zt)
            torch.softmax(b, dim=1)
        else:
            torch.softmax(zt, dim=1, dtype=torch.float32)
        rows += len(z)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"rows": rows, "seconds": seconds, "cpu": cpu, "peak_rss": peak_rss_bytes()}


def phase_numpy(dump: Path, chunk_rows: int, max_rows: int | None) -> dict:
    """Straightforward numpy: mmap each shard, float64 softmax, np.add.at into S, n, H."""
    man = json.loads((dump / "manifest.json").read_text())
    k = man["num_classes"]
    S = np.zeros((k, k), np.float64)
    n = np.zeros(k, np.int64)
    H = np.zeros((k, k), np.int64)
    rows = 0
    t0, c0 = time.perf_counter(), cpu_seconds()
    for s in man["shards"]:
        z_all = np.load(dump / s["name"] / "logits.npy", mmap_mode="r")
        y_all = np.load(dump / s["name"] / "labels.npy", mmap_mode="r")
        for start in range(0, s["rows"], chunk_rows):
            z = np.asarray(z_all[start : start + chunk_rows, :k], dtype=np.float64)
            y = np.asarray(y_all[start : start + chunk_rows])
            z = z - z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            pos = (y >= 0) & (y < k)
            yp, pp = y[pos], p[pos]
            np.add.at(S, yp, pp)
            np.add.at(n, yp, 1)
            np.add.at(H, (yp, pp.argmax(axis=1)), 1)
            rows += len(y)
            if max_rows is not None and rows >= max_rows:
                break
        if max_rows is not None and rows >= max_rows:
            break
    return {
        "rows": rows,
        "seconds": time.perf_counter() - t0,
        "cpu": cpu_seconds() - c0,
        "positives": int(n.sum()),
        "peak_rss": peak_rss_bytes(),
    }


def run_phase(args: argparse.Namespace, phase: str, dump: Path, extra: list[str] | None = None) -> dict:
    cmd = [
        sys.executable, __file__, "--phase", phase, "--dump", str(dump), "--chunk-rows", str(args.chunk_rows),
        *(["--threads", str(args.threads)] if args.threads else []),
        *(extra or []),
    ]
    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def _row(label: str, r: dict) -> str:
    return (
        f"{label:<46}{r['rows']:>11,}{r['seconds']:>9.2f}{r['cpu']:>9.2f}{r['rows'] / r['seconds']:>11,.0f}"
        f"{r['rows'] / r['cpu']:>12,.0f}{r['peak_rss'] / 2**20:>8,.0f} MB"
    )


# -------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000,
                    help="proposal rows in the dump (default 2,000,000)")
    ap.add_argument("--classes", type=int, default=1203, help="K foreground classes (default 1203, LVIS v1)")
    ap.add_argument("--positive-fraction", type=float, default=1.0,
                    help="fraction of rows with a class label (1.0 = a --positives-only dump, the worst case "
                         "for pcbkit; ~0.02 is a full LVIS dump)")
    ap.add_argument("--shard-rows", type=int, default=65_536)
    ap.add_argument("--chunk-rows", type=int, default=8_192)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads in every phase (default 1; 0 = torch's default). "
                         "pcbkit's reader adds one I/O thread of its own")
    ap.add_argument("--baseline-rows", type=int, default=200_000,
                    help="rows timed for the numpy baseline (its rows/s is extrapolated to the dump)")
    ap.add_argument("--repeats", type=int, default=3,
                    help="timed runs of (a) and (c), best kept (shared CPU)")
    ap.add_argument("--tmp", type=str, default=None, help="parent directory of the temporary dump")
    ap.add_argument("--keep", action="store_true", help="keep the dump (prints its path)")
    # internal: one phase in this subprocess
    ap.add_argument("--phase", choices=["pcbkit", "numpy", "roofline", "roofline-softmax"], default=None,
                    help=argparse.SUPPRESS)
    ap.add_argument("--dump", type=str, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--max-rows", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--max-shards", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.phase is not None:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        dump = Path(args.dump)
        if args.phase == "pcbkit":
            out = phase_pcbkit(dump, args.chunk_rows, args.max_shards)
        elif args.phase == "roofline":
            out = phase_roofline(dump, args.chunk_rows, "inplace")
        elif args.phase == "roofline-softmax":
            out = phase_roofline(dump, args.chunk_rows, "softmax")
        else:
            out = phase_numpy(dump, args.chunk_rows, args.max_rows)
        print(json.dumps(out))
        return

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="pcbkit-bench-", dir=args.tmp))
    dump = tmp / "dump"
    try:
        threads = args.threads or torch.get_num_threads()
        print(f"pcbkit stats benchmark: {args.rows:,} rows, K = {args.classes} (+1 background), "
              f"float16 logits, positive fraction {args.positive_fraction}, "
              f"chunks of {args.chunk_rows:,} rows; "
              f"torch {torch.__version__}, {threads} torch thread(s), {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.1f} at start")
        wsec = write_dump(dump, args.rows, args.classes, args.positive_fraction, args.shard_rows)
        size = sum(f.stat().st_size for f in dump.rglob("*") if f.is_file())
        n_shards = len(json.loads((dump / "manifest.json").read_text())["shards"])
        print(f"dump: {size / 1e9:.2f} GB in {n_shards} shards, written in {wsec:.1f} s "
              f"({args.rows / wsec:,.0f} rows/s)")

        run_phase(args, "roofline", dump)  # warm the page cache
        best: dict[str, dict] = {}
        for _ in range(max(1, args.repeats)):  # interleaved, best kept: other load only ever slows a run
            for phase in ("roofline", "pcbkit", "roofline-softmax"):
                r = run_phase(args, phase, dump)
                if phase not in best or r["seconds"] < best[phase]["seconds"]:
                    best[phase] = {**r, "cpu_min": min(r["cpu"], best.get(phase, r)["cpu"])}
        quarter = run_phase(args, "pcbkit", dump, ["--max-shards", str(max(1, n_shards // 4))])
        base = run_phase(args, "numpy", dump, ["--max-rows", str(args.baseline_rows)])

        a, c, c2 = best["pcbkit"], best["roofline"], best["roofline-softmax"]
        ra, rc, rb = a["rows"] / a["seconds"], c["rows"] / c["seconds"], base["rows"] / base["seconds"]
        subset = base["rows"] < a["rows"]
        print()
        title = "phase (best of " + str(args.repeats) + " wall times)"
        print(f"{title:<46}{'rows':>11}{'wall s':>9}{'CPU s':>9}"
              f"{'rows/s':>11}{'rows/CPU s':>12}{'peak RSS':>11}")
        print(_row("(a) pcbkit ClassStats.from_dump", a))
        print(_row("(a) same, first quarter of the shards", quarter))
        print(_row("(b) numpy np.add.at, float64" + (" (subset)" if subset else ""), base))
        print(_row("(c) roofline: read + softmax (f32 buffer)", c))
        print(_row("(c') read + torch.softmax(fp16, dtype=f32)", c2))
        print()
        if subset:
            print(f"numpy baseline timed on the first {base['rows']:,} rows only; rows/s extrapolated: "
                  f"~{a['rows'] / rb:,.0f} s for the whole dump")
        print(f"(a) time / (c) roofline time:  wall {rc / ra:.2f}x, CPU {a['cpu'] / c['cpu']:.2f}x  "
              f"(goal <= 1.3x; vs (c'): wall {c2['rows'] / c2['seconds'] / ra:.2f}x)")
        print(f"(a) / (b) speed:               wall {ra / rb:.1f}x, CPU "
              f"{(a['rows'] / a['cpu']) / (base['rows'] / base['cpu']):.1f}x  (goal >= 10x)")
        print(f"(a) peak RSS:                  {a['peak_rss'] / 2**30:.2f} GB at {a['rows']:,} rows, "
              f"{quarter['peak_rss'] / 2**30:.2f} GB at {quarter['rows']:,} rows  (goal < 1.5 GB; "
              f"'import torch' alone is ~0.7 GB here)")
        expected = int(round(a["rows"] * args.positive_fraction))
        if args.positive_fraction == 1.0 and a["positives"] != expected:
            print(f"warning: positives counted {a['positives']:,} != rows {a['rows']:,}")
    finally:
        if args.keep:
            print(f"dump kept at {dump}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
