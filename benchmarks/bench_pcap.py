"""Capture scoring (cyber_moe.alerts): pcap -> verdicts flows/s against NFStream's own flows/s on the same pcap,
measured in the same run (target: at least 50% of NFStream's rate).

Generates (or reuses, under --out-dir) the embedded simulator's pcap, then times on it: `pcap_to_flows` alone
(NFStream), `score_pcap` (NFStream + Community IDs + model), alert building (ECS and EVE) and `watch` replaying
the pcap in micro-batches. The model is a bundle with the default ModelConfig sizes on the nfstream schema (an
untrained network: inference costs the same as a trained one). Appends a table to benchmarks/RESULTS.md
unless --no-append.

    .venv/bin/python benchmarks/bench_pcap.py [--flows 30000] [--days 3] [--seed 0] [--out-dir outputs/bench_pcap] [--no-append]
"""

from __future__ import annotations

import argparse
import os
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from common import emit_table
from cyber_moe.alerts import alerts_ecs, alerts_eve, community_ids, score_pcap, watch
from cyber_moe.bundle import ModelBundle
from cyber_moe.testing import untrained_bundle
from cyber_moe.nfstream import NFSTREAM, pcap_to_flows
from cyber_moe.synth import load_or_generate

ROOT = Path(__file__).resolve().parent.parent


def default_bundle(train) -> ModelBundle:
    "A bundle on the nfstream schema with the default ModelConfig sizes (untrained weights, threshold at the median p_attack)."
    b = untrained_bundle(train, schema=NFSTREAM, name="bench", version="1")
    b.threshold = float(np.median(b.predict(train.head(5000))["p_attack"]))
    return b


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=30_000)
    ap.add_argument("--days", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=str(ROOT / "outputs" / "bench_pcap"))
    ap.add_argument("--no-append", action="store_true")
    a = ap.parse_args(argv)
    train, info = load_or_generate(seed=a.seed, n_days=a.days, n_flows_target=a.flows, out_dir=a.out_dir)
    pcap = Path(info["pcap"])
    bundle = default_bundle(train)
    n_params = sum(p.numel() for p in bundle.net.parameters())
    load0 = os.getloadavg()[0]
    flows, t_nfs = timed(lambda: pcap_to_flows(pcap))
    _, t_cid = timed(lambda: community_ids(flows))
    n_default = torch.get_num_threads()
    _, t_pred = timed(lambda: bundle.predict(flows))
    torch.set_num_threads(1)
    _, t_pred1 = timed(lambda: bundle.predict(flows))
    torch.set_num_threads(n_default)
    scored, t_score = timed(lambda: score_pcap(bundle, pcap))
    ecs, t_ecs = timed(lambda: alerts_ecs(scored, bundle))
    eve, t_eve = timed(lambda: alerts_eve(scored, bundle))
    got = []
    stats, t_watch = timed(lambda: watch(pcap, bundle, on_alert=got.append, alert_format="eve", batch_size=1024))
    load1 = os.getloadavg()[0]
    n = len(flows)
    assert len(scored) == n and stats["n_flows"] == n and len(got) == len(eve), (len(scored), stats, len(got), len(eve))
    rate = lambda s: n / s
    rows = [
        ("NFStream alone (`pcap_to_flows`)", t_nfs, rate(t_nfs)),
        ("  Community IDs (`communityid` library)", t_cid, rate(t_cid)),
        (f"  model predict on the flow frame, {n_default} torch threads (torch default)", t_pred, rate(t_pred)),
        ("  model predict on the flow frame, 1 torch thread", t_pred1, rate(t_pred1)),
        (
            f"`score_pcap`: pcap -> verdicts (NFStream, IDs and model overlapped; {scored.attrs['capture'].get('n_threads', '?')} torch thread(s))",
            t_score,
            rate(t_score),
        ),
        (f"`alerts_ecs` ({len(ecs):,} alerts)", t_ecs, rate(t_ecs)),
        (f"`alerts_eve` ({len(eve):,} alerts)", t_eve, rate(t_eve)),
        ("`watch` replaying the pcap (batches of 1,024, EVE alerts to a callback)", t_watch, rate(t_watch)),
    ]
    ratio, ratio_w = rate(t_score) / rate(t_nfs), rate(t_watch) / rate(t_nfs)
    lines = [
        f"\n## Scoring captures (`benchmarks/bench_pcap.py`, cyber_moe.alerts), {date.today()}\n",
        f"Generated pcap (seed {a.seed}, {a.days} days): {n:,} flows, {info['n_packets']:,} packets; model: default "
        f"ModelConfig sizes ({n_params:,} parameters, untrained), threshold at the median p_attack; load average {load0:.1f} before, {load1:.1f} after (2 cores shared with other jobs).\n",
        "| step | seconds | flows/s |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {sec:.2f} | {fl:,.0f} |" for name, sec, fl in rows]
    lines.append(f"| ratio `score_pcap` / NFStream flows/s (target >= 0.50) | | x{ratio:.2f} |")
    lines.append(f"| ratio `watch` / NFStream flows/s | | x{ratio_w:.2f} |")
    emit_table(lines, None if a.no_append else Path(__file__).resolve().parent / "RESULTS.md")
    return 0 if ratio >= 0.5 else 1


if __name__ == "__main__":
    raise SystemExit(main())
