"""Scoring at scale (cyber_moe.distributed): flow files scored with 1 and 2 Dask worker processes against single-process
`cyber-moe score` on the same files in the same run, and pcap metering of several captures in parallel against one process.

Generates (or reuses, under --out-dir) the embedded simulator's traffic, replicates its flows into --files Parquet files
(--rows flows in all), and cuts its pcap into --captures hourly-style files. The model is a bundle of --params' model
(default: params/default.yaml, what `make run` trains) on the nfstream schema, untrained (inference costs the same as a
trained one), saved with its ONNX graph.
Measured, all in this run:
  - single process: `cyber-moe score --input FILE --output FILE.parquet` once per file, as a user scores files today
    (torch, its default threads; process start and model load included, and also reported without them), on the
    first --single-files files (default: enough for 500,000 flows): its rate is the baseline, and at 10 million flows
    scoring every file this way would take longer than the rest of the benchmark together;
  - `score_many` on a LocalCluster of 1 and of 2 worker processes (1 thread each, ONNX Runtime with 1 intra-op thread, batches of distributed.BATCH_SIZE),
    end to end (cluster start included), the workers' peak RSS and flows per CPU-second of the tasks (the rate the
    code allows when other jobs share the cores);
  - metering: `pcap_to_flows` over the captures one after the other in one process, against the same calls as Dask
    tasks on 2 worker processes; and `score_many` on the captures (meter + score + alerts) with 2 workers.
Appends a table to benchmarks/RESULTS.md unless --no-append.

    .venv/bin/python benchmarks/bench_distributed.py [--rows 200000] [--files 8] [--single-files K] [--captures 6] [--flows 20000] [--no-append]
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd

from common import emit_table

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def meter(path: str) -> int:
    "A Dask task: NFStream over one capture; the number of flows."
    from cyber_moe.nfstream import pcap_to_flows

    return len(pcap_to_flows(path))


def run_cli_rss(args: list[str]) -> tuple[float, float]:
    "Run `cyber-moe ARGS` and wait for it with wait4, which reports that child's own peak RSS."
    t = time.perf_counter()
    p = subprocess.Popen([str(BIN / "cyber-moe"), *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise RuntimeError(f"cyber-moe {' '.join(args)} failed: {p.stderr.read().decode()[-500:]}")
    return time.perf_counter() - t, ru.ru_maxrss / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=200_000, help="flows in all the Parquet files together")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument(
        "--single-files", type=int, default=None, help="files scored by the single-process rows (default: enough for 500,000 flows)"
    )
    ap.add_argument("--captures", type=int, default=6)
    ap.add_argument("--flows", type=int, default=20_000, help="size of the generated traffic (flows) the files are made from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--params", default=str(ROOT / "params" / "default.yaml"), help="the model section of this file is measured")
    ap.add_argument("--out-dir", default=str(ROOT / "outputs" / "bench_distributed"))
    ap.add_argument("--no-append", action="store_true")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    import torch
    from cyber_moe.bundle import save_bundle, score_file
    from cyber_moe.testing import split_capture, untrained_bundle
    from cyber_moe.distributed import BATCH_SIZE, score_many
    from cyber_moe.nfstream import NFSTREAM, pcap_to_flows
    from cyber_moe.synth import load_or_generate
    from cyber_moe.config import load_config

    out = Path(a.out_dir)
    flows, info = load_or_generate(seed=a.seed, n_days=1, n_flows_target=a.flows, out_dir=out / "synth")
    model_cfg = load_config(a.params).model
    b = untrained_bundle(flows, schema=NFSTREAM, model_cfg=model_cfg, name="bench", version="1")
    b.threshold = float(np.quantile(b.predict(flows.head(5000))["p_attack"], 0.7))
    n_params = sum(p.numel() for p in b.net.parameters())
    model = save_bundle(b, out / "model")
    data = out / "flows"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    rng = np.random.default_rng(a.seed)
    per = a.rows // a.files
    files = []
    for i in range(a.files):
        p = data / f"flows-{i:02d}.parquet"
        flows.iloc[rng.integers(0, len(flows), per)].reset_index(drop=True).to_parquet(p, index=False)
        files.append(p)
    n_rows = per * a.files
    k = min(a.files, a.single_files or -(-500_000 // max(per, 1)))
    single, n_single = files[:k], per * k
    sub = "" if k == a.files else f" on the first {k} of the {a.files} files ({n_single:,} flows)"
    caps = split_capture(Path(info["pcap"]), out / "captures", a.captures)
    load0 = os.getloadavg()[0]
    rows = []

    # single process, the way files are scored today: one `cyber-moe score` per file
    single_out = out / "single"
    shutil.rmtree(single_out, ignore_errors=True)
    single_out.mkdir()
    t_cli, rss_cli = 0.0, 0.0
    for p in single:
        s, rss = run_cli_rss(["score", "--model", str(model), "--input", str(p), "--output", str(single_out / p.name)])
        t_cli += s
        rss_cli = max(rss_cli, rss)
    rows.append(
        (
            f"single process: `cyber-moe score` once per file{sub} (torch, default threads; start-up and model load included)",
            t_cli,
            n_single / t_cli,
            f"{rss_cli:,.0f}",
        )
    )
    t = time.perf_counter()
    for p in single:
        score_file(model, p)
    t_in = time.perf_counter() - t
    rows.append(
        (
            f"single process: `score_file` per file{sub} in one warm process (torch, {torch.get_num_threads()} threads)",
            t_in,
            n_single / t_in,
            "",
        )
    )

    dist = {}
    for n in (1, 2):
        o = out / f"dask-{n}"
        shutil.rmtree(o, ignore_errors=True)
        t = time.perf_counter()
        s = score_many([str(p) for p in files], model, o, workers=n, stream=io.StringIO(), dashboard_address=None)
        sec = time.perf_counter() - t
        assert not s["failures"] and s["rows"] == n_rows, s["failures"]
        rss = {}
        for r in s["results"].values():
            rss[r["worker"]] = max(rss.get(r["worker"], 0), r["peak_rss_mb"])
        busy = sum(r["seconds"] for r in s["results"].values())
        cpu = sum(r["cpu_seconds"] for r in s["results"].values())
        dist[n] = (sec, n_rows / sec, n_rows / busy, n_rows / s["run_seconds"], n_rows / cpu)
        rows.append(
            (
                f"`score_many`, LocalCluster of {n} worker process(es) x 1 thread, ONNX Runtime 1 thread, batches of {BATCH_SIZE:,} (cluster start included)",
                sec,
                n_rows / sec,
                " / ".join(f"{v:,.0f}" for v in sorted(rss.values())),
            )
        )
        rows.append(("  the same, from the first task submitted to the last finished", s["run_seconds"], n_rows / s["run_seconds"], ""))
        rows.append(("  the same, flows per CPU-second of the tasks (all workers' task CPU time)", cpu, n_rows / cpu, ""))
    # the Dask verdicts are the single-process ones
    ref = pd.read_parquet(single_out / files[0].name)
    got = pd.read_parquet(out / "dask-2" / "verdicts" / f"source={files[0].name}")
    assert got["is_attack"].tolist() == ref["is_attack"].tolist()
    diff = float(np.abs(got["p_attack"].to_numpy() - ref["p_attack"].to_numpy()).max())

    # metering
    from distributed import Client, LocalCluster
    import dask

    t = time.perf_counter()
    n_flows_caps = sum(len(pcap_to_flows(c)) for c in caps)
    t_meter1 = time.perf_counter() - t
    rows.append(
        (f"metering: `pcap_to_flows` over {len(caps)} captures one after the other, one process", t_meter1, n_flows_caps / t_meter1, "")
    )
    with dask.config.set({"distributed.worker.daemon": False}):
        with LocalCluster(n_workers=2, threads_per_worker=1, dashboard_address=None) as lc, Client(lc) as c:
            c.submit(meter, str(caps[0])).result()  # workers warm (imports), as a long-running cluster would be
            t = time.perf_counter()
            got_flows = sum(c.gather(c.map(meter, [str(x) for x in caps], pure=False)))
            t_meter2 = time.perf_counter() - t
    assert got_flows == n_flows_caps
    rows.append(
        (
            f"metering: the same {len(caps)} `pcap_to_flows` calls as Dask tasks on 2 worker processes (warm)",
            t_meter2,
            n_flows_caps / t_meter2,
            "",
        )
    )
    o = out / "dask-caps"
    shutil.rmtree(o, ignore_errors=True)
    t = time.perf_counter()
    s = score_many([str(c) for c in caps], model, o, workers=2, stream=io.StringIO(), dashboard_address=None)
    t_caps = time.perf_counter() - t
    assert not s["failures"] and s["rows"] == n_flows_caps
    rows.append(
        (
            f"`score_many` on the {len(caps)} captures, 2 workers: meter + score + alerts (cluster start included)",
            t_caps,
            n_flows_caps / t_caps,
            "",
        )
    )
    load1 = os.getloadavg()[0]

    r1, r2 = dist[1][1], dist[2][1]
    per_worker = dist[1][2]  # flows/s of one worker while busy (task time only, model loading included)
    base = n_single / t_cli
    lines = [
        f"## Scoring at scale (`benchmarks/bench_distributed.py`, cyber_moe.distributed), {date.today()}",
        "",
        f"{n_rows:,} flows (the simulator's {len(flows):,} NFStream flows resampled into {a.files} Parquet files of {per:,}); "
        f"{len(caps)} captures cut from its pcap ({n_flows_caps:,} flows). Model: {Path(a.params).name}'s ({', '.join(model_cfg.experts)}; {n_params:,} parameters, untrained). "
        f"Load average {load0:.1f} before, {load1:.1f} after"
        + (
            ": the machine was otherwise idle."
            if load0 < 1.5
            else ": the 2 cores were shared with other jobs, so absolute rates are low and vary between runs."
        )
        + " The ratios are measured in the same run.",
        "",
        "| run | seconds | flows/s | peak RSS per process (MB) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {name} | {sec:.1f} | {fl:,.0f} | {rss} |" for name, sec, fl, rss in rows]
    lines += [
        f"| ratio 1 worker / single-process CLI | | x{r1 / base:.2f} | |",
        f"| ratio 2 workers / single-process CLI | | x{r2 / base:.2f} | |",
        f"| ratio 2 workers / 1 worker | | x{r2 / r1:.2f} | |",
        f"| ratio 2 workers / 1 worker, from the first task submitted | | x{dist[2][3] / dist[1][3]:.2f} | |",
        f"| ratio metering on 2 workers / one process | | x{t_meter1 / t_meter2:.2f} | |",
        "",
        f"The whole benchmark took {(time.perf_counter() - t_start) / 60:.1f} min (data generation included).",
        "",
        f"Verdicts of the 2-worker run equal the single-process CLI's on the files compared (is_attack identical; "
        f"p_attack within {diff:.1g}: ONNX Runtime against torch).",
        "",
        f"Projection (from one busy worker's {per_worker:,.0f} flows/s here, task time only): a day of "
        f"100 million flows needs {1e8 / 86400:,.0f} flows/s sustained, i.e. {int(np.ceil(1e8 / 86400 / per_worker))} worker process(es) "
        f"keeping pace; scoring a stored day of 100 million flows takes {1e8 / per_worker / 3600:,.1f} h on 1 worker, "
        f"{1e8 / per_worker / 3600 / 8:,.1f} h on 8 and {1e8 / per_worker / 3600 / 32:,.2f} h on 32 (one free core each); at the "
        f"{dist[1][4]:,.0f} flows per CPU-second a worker's tasks used, which is what an unshared core gives, "
        f"{1e8 / dist[1][4] / 3600:,.1f} h on 1 worker. "
        "That assumes throughput grows with the number of workers, which the tasks allow (one file each, no data "
        f"exchanged between workers); here 2 workers gave x{r2 / r1:.2f} of 1"
        + (" on the machine's 2 cores." if r2 / r1 >= 1.8 else ", short of x2: other jobs shared the cores.")
        + " Metering captures adds NFStream's cost per flow on top.",
    ]
    emit_table(lines, None if a.no_append else Path(__file__).resolve().parent / "RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
