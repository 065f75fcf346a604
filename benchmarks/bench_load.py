"""Bounded CIC-IDS2017 reader (cyber_moe.data.load_flows) against plain pandas.read_csv, measured in the same run.

The real CIC-IDS2017 sample (299 flows) is replicated to --rows rows in a temp dir (its Timestamp, Infinity and
duplicate-column quirks included). Each reader runs in a fresh child process, so each peak RSS (ru_maxrss) is its
own; the interpreter's RSS after the imports alone is reported too. Prints rows/s, peak RSS and the ratios.

    .venv/bin/python benchmarks/bench_load.py [--rows 1000000] [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

SAMPLE = "cicids2017/Friday-WorkingHours-Afternoon-DDos.pcap_ISCX.head299.csv"

CHILD = r"""
import json, resource, sys, time
import pandas as pd
from cyber_moe.data import load_flows
mode, path = sys.argv[1], sys.argv[2]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
if mode == "bounded":
    df, rep = load_flows("cic-ids2017", path)
elif mode == "pandas":
    df = pd.read_csv(path, encoding="latin-1")
else:
    df = None
dt = time.perf_counter() - t
print(json.dumps({"mode": mode, "rows": 0 if df is None else len(df), "seconds": dt,
                  "frame_mb": 0 if df is None else df.memory_usage(deep=True).sum() / 2**20,
                  "import_rss_mb": base / 1024, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_file(shared: Path, n_rows: int, out: Path) -> int:
    "Write the sample's header and its 299 rows repeated to `n_rows` rows; returns the rows written."
    raw = (shared / SAMPLE).read_bytes()
    header, _, body = raw.partition(b"\n")
    lines = body.rstrip(b"\n").split(b"\n")
    reps, rest = divmod(n_rows, len(lines))
    block = b"\n".join(lines) + b"\n"
    with open(out, "wb") as fh:
        fh.write(header + b"\n")
        for _ in range(reps):
            fh.write(block)
        fh.write(b"".join(line + b"\n" for line in lines[:rest]))
    return n_rows


def run(mode: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, mode, str(path)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shared", type=Path, default=root.parent / "shared" / "data")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cic_replicated.csv"
        make_file(args.shared, args.rows, path)
        size_mb = path.stat().st_size / 2**20
        res = {m: run(m, path) for m in ("imports", "bounded", "pandas")}
    b, p, base = res["bounded"], res["pandas"], res["imports"]["peak_rss_mb"]
    assert b["rows"] == p["rows"] == args.rows, (b["rows"], p["rows"])
    print(f"CIC-IDS2017 sample replicated to {args.rows:,} rows ({size_mb:,.0f} MB CSV, 85 columns)")
    print(f"interpreter after imports: {base:,.0f} MB RSS")
    print(f"{'reader':<34} {'seconds':>8} {'rows/s':>12} {'peak RSS MB':>12} {'frame MB':>9}")
    for name, r in (("load_flows (pyarrow, float32)", b), ("pandas.read_csv (defaults)", p)):
        print(f"{name:<34} {r['seconds']:>8.2f} {r['rows'] / r['seconds']:>12,.0f} {r['peak_rss_mb']:>12,.0f} {r['frame_mb']:>9,.0f}")
    print(
        f"ratios bounded / pandas: speed x{p['seconds'] / b['seconds']:.2f}, peak RSS x{b['peak_rss_mb'] / p['peak_rss_mb']:.2f} "
        f"(above imports x{(b['peak_rss_mb'] - base) / (p['peak_rss_mb'] - base):.2f}), "
        f"frame x{b['frame_mb'] / p['frame_mb']:.2f}"
    )
    print("load_flows also checks labels, counts non-finite values, drops the duplicate column and parses timestamps.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
