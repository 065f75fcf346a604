"""Generated data set (cyber_moe.synth): generation time and packets/s at the default size, against NFStream's own
flows/s and packets/s on the same pcap, measured in the same run.

Generates `--flows` flows (default 30,000, the pipeline's default) over `--days` days into a temp dir, then meters
the pcap a second time with `pcap_to_flows` alone. Appends a table to benchmarks/RESULTS.md unless --no-append.

    .venv/bin/python benchmarks/bench_synth.py [--flows 30000] [--days 3] [--seed 0] [--no-append]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import date
from pathlib import Path

from common import emit_table
from cyber_moe.nfstream import pcap_to_flows
from cyber_moe.synth import generate


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=30_000)
    ap.add_argument("--days", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-append", action="store_true")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        load0 = os.getloadavg()[0]
        t = time.perf_counter()
        flows, info = generate(seed=a.seed, n_days=a.days, n_flows_target=a.flows, out_dir=d)
        total = time.perf_counter() - t
        t = time.perf_counter()
        again = pcap_to_flows(info["pcap"])
        meter = time.perf_counter() - t
        mb = Path(info["pcap"]).stat().st_size / 2**20
        load1 = os.getloadavg()[0]
    tm, n_pk, n_fl = info["timing"], info["n_packets"], len(flows)
    assert len(again) == n_fl
    sim_write = tm["simulate_s"] + tm["write_pcap_s"]
    rows = [
        ("generate() end to end (simulate, write, NFStream, label)", total, n_fl / total, n_pk / total),
        ("  simulate packets (pure Python)", tm["simulate_s"], None, n_pk / tm["simulate_s"]),
        ("  write pcap (dpkt objects, SnapWriter)", tm["write_pcap_s"], None, n_pk / tm["write_pcap_s"]),
        ("  NFStream inside generate()", tm["nfstream_s"], n_fl / tm["nfstream_s"], n_pk / tm["nfstream_s"]),
        ("  label from ground truth", tm["label_s"], n_fl / tm["label_s"], None),
        ("NFStream alone on the same pcap (`pcap_to_flows`)", meter, n_fl / meter, n_pk / meter),
    ]
    fmt = lambda v: "" if v is None else f"{v:,.0f}"
    lines = [
        f"\n## Generated traffic (`benchmarks/bench_synth.py`, cyber_moe.synth), {date.today()}\n",
        f"seed {a.seed}, {a.days} days, target {a.flows:,} flows: {n_fl:,} flows, {n_pk:,} packets, "
        f"pcap {mb:.0f} MB (snaplen 128); load average {load0:.1f} before, {load1:.1f} after (2 cores shared "
        "with other jobs, so seconds vary between runs).\n",
        "| step | seconds | flows/s | packets/s |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {sec:.1f} | {fmt(fl)} | {fmt(pk)} |" for name, sec, fl, pk in rows]
    lines.append(f"| ratio: simulate+write packets/s over NFStream packets/s | | | x{(n_pk / sim_write) / (n_pk / meter):.2f} |")
    emit_table(lines, None if a.no_append else Path(__file__).resolve().parent / "RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
