"""Loopback load on the REST service, against a bare FastAPI route measured in the same run.

Targets: single-flow POST /predict p99 < 10 ms at 200 requests/s (open loop); POST /predict_batch >= 10,000
flows/s end to end; server memory (RSS) grows < 10 % over the run. The model is an untrained MoE of the default
size (cyber_moe.config.ModelConfig) over UNSW-NB15's 42 features, its preprocessor fitted on real rows
(../shared/data); speed does not depend on the weights.

    .venv/bin/python benchmarks/serve.py                 # 60 s at 200 req/s, then batches
    .venv/bin/python benchmarks/serve.py --duration 15   # shorter
    .venv/bin/python benchmarks/serve.py --record        # also append the results to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import psutil

from cyber_moe.config import ModelConfig
from cyber_moe.schema import UNSW_NB15
from cyber_moe.serve import HTTP_PROTOCOL
from cyber_moe.testing import Server, free_port, make_demo_bundle, records, unsw_frame

ROOT = Path(__file__).resolve().parent.parent

BARE_APP = """
import json
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
app = FastAPI()
@app.post("/predict")
async def predict(request: Request):
    body = json.loads(await request.body())
    return JSONResponse({"is_attack": False, "p_attack": 0.1, "family": "Normal", "n": len(body)})
@app.post("/predict_batch")
async def predict_batch(request: Request):
    body = json.loads(await request.body())
    return JSONResponse({"predictions": [{"is_attack": False, "p_attack": 0.1} for _ in body]})
@app.get("/ready")
async def ready():
    return {"ready": True}
"""


@contextlib.contextmanager
def client_without_gc():
    "The load generator's own garbage collector off while it measures: a full collection of its heap (every task and response\n"
    "kept so far) stalls its event loop for tens of ms and shows up as server latency. Applies to the bare route alike."
    gc.collect()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
        gc.unfreeze()


async def open_loop(url: str, bodies: list[bytes], *, rate: float, duration: float, headers: dict, on_tick=None) -> dict:
    "Send one request every 1/rate s for `duration` s (not waiting for answers); latency per request and lateness."
    lat, late, errors = [], [], 0
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, headers={**headers, "Content-Type": "application/json"}, limits=limits, timeout=30) as c:

        async def one(i: int, due: float):
            nonlocal errors
            t = time.perf_counter()
            late.append(t - due)
            try:
                r = await c.post("/predict", content=bodies[i % len(bodies)])
            except httpx.HTTPError:
                errors += 1
                return  # counted, not timed
            lat.append(time.perf_counter() - t)
            if r.status_code != 200:
                errors += 1

        t0, tasks, i, last_tick = time.perf_counter(), [], 0, 0.0
        while (now := time.perf_counter() - t0) < duration:
            due = i / rate
            if due > now:
                await asyncio.sleep(due - now)
            tasks.append(asyncio.create_task(one(i, t0 + due)))
            i += 1
            if on_tick and now - last_tick >= 1:
                on_tick(now)
                last_tick = now
        sent = i
        _, pending = await asyncio.wait(tasks, timeout=10)  # a backlog left after 10 s is not waited for
        for t in pending:
            t.cancel()
        elapsed = time.perf_counter() - t0
    a = np.asarray(lat) * 1e3 if lat else np.asarray([math.nan])
    return {
        "n": len(lat),
        "sent": sent,
        "errors": errors,
        "unanswered": len(pending),
        "achieved_rps": len(lat) / elapsed,
        "p50_ms": float(np.percentile(a, 50)),
        "p99_ms": float(np.percentile(a, 99)),
        "max_ms": float(a.max()),
        "late_p99_ms": float(np.percentile(np.asarray(late) * 1e3, 99)) if late else math.nan,
    }


async def sequential(url: str, bodies: list[bytes], *, duration: float, headers: dict) -> dict:
    "One client, one request at a time: the service time of a single flow without queueing."
    lat = []
    async with httpx.AsyncClient(base_url=url, headers={**headers, "Content-Type": "application/json"}, timeout=30) as c:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < duration:
            t = time.perf_counter()
            r = await c.post("/predict", content=bodies[len(lat) % len(bodies)])
            assert r.status_code == 200, r.text
            lat.append(time.perf_counter() - t)
    a = np.asarray(lat) * 1e3
    return {"n": len(a), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99))}


async def batches(url: str, body: bytes, n_flows: int, *, duration: float, concurrency: int, headers: dict) -> dict:
    "Closed loop: `concurrency` clients send the same batch back to back for `duration` s; flows per second."
    done, errors = 0, 0
    async with httpx.AsyncClient(base_url=url, headers={**headers, "Content-Type": "application/json"}, timeout=120) as c:
        t0 = time.perf_counter()

        async def worker():
            nonlocal done, errors
            while time.perf_counter() - t0 < duration:
                try:
                    r = await c.post("/predict_batch", content=body)
                except httpx.HTTPError:
                    errors += 1
                    continue
                if r.status_code == 200:
                    done += n_flows
                else:
                    errors += 1

        await asyncio.gather(*[worker() for _ in range(concurrency)])
        dt = time.perf_counter() - t0
    return {"flows_per_s": done / dt, "requests": done // n_flows, "errors": errors}


def measured(coro):
    "Run one measurement coroutine with the client's collector off (see client_without_gc)."
    with client_without_gc():
        return asyncio.run(coro)


def rss_mb(proc: psutil.Process) -> float:
    "Resident memory of the server process and its children (uvicorn workers), MB."
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60, help="seconds of single-flow load (the memory run); batches get a third of it")
    ap.add_argument("--rate", type=float, default=200, help="single-flow requests per second")
    ap.add_argument("--batch-size", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=2, help="batch clients in parallel")
    ap.add_argument("--torch-threads", type=int, default=1, help="CYBER_MOE_TORCH_THREADS of the server")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="folder with unsw-nb15/ (the shared data)")
    ap.add_argument("--access-log", action="store_true", help="keep the service's JSON access log on (its default; off by default here)")
    ap.add_argument(
        "--no-feedback",
        action="store_true",
        help="CYBER_MOE_FEEDBACK=false: no alert stored, no rule applied "
        "(the untrained model flags most flows, so the default run writes an alert for most of them)",
    )
    ap.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="cyber-moe-bench-"))
    df = unsw_frame(Path(args.data), n=6000)
    net = ModelConfig().model_dump(exclude={"load_balance_weight"})
    bundle = make_demo_bundle(tmp / "model", df=df, schema=UNSW_NB15, name="bench", **net)
    flows = records(df, UNSW_NB15.features)
    singles = [json.dumps(f).encode() for f in flows[:500]]
    batch = json.dumps(flows[: args.batch_size]).encode()
    (tmp / "bare.py").write_text(BARE_APP)
    key = {"X-API-Key": "bench-key"}
    env = {
        "CYBER_MOE_API_KEY": "bench-key",
        "CYBER_MOE_MAX_BATCH": str(max(4096, args.batch_size)),
        "CYBER_MOE_TORCH_THREADS": str(args.torch_threads),
        "CYBER_MOE_ACCESS_LOG": "true" if args.access_log else "false",
        "CYBER_MOE_FEEDBACK": "false" if args.no_feedback else "true",
    }
    out: dict = {"args": vars(args), "net": net}

    with _bare_server(tmp) as url:
        out["bare_seq"] = measured(sequential(url, singles, duration=5, headers={}))
        out["bare_single"] = measured(open_loop(url, singles, rate=args.rate, duration=args.duration, headers={}))
        out["bare_batch"] = measured(
            batches(url, batch, args.batch_size, duration=min(args.duration / 3, 20), concurrency=args.concurrency, headers={})
        )
    with Server(bundle, log_path=tmp / "server.log", env=env, args=("--http", HTTP_PROTOCOL)) as s:
        proc = psutil.Process(s.proc.pid)
        # warm-up with both request shapes, so the memory baseline holds what steady traffic needs (allocator arenas,
        # the runtime's buffers for a full chunk); growth after it is what the run leaks
        asyncio.run(open_loop(s.url, singles, rate=args.rate, duration=3, headers=key))
        asyncio.run(batches(s.url, batch, args.batch_size, duration=5, concurrency=args.concurrency, headers=key))
        out["seq"] = measured(sequential(s.url, singles, duration=5, headers=key))
        mem = [(0.0, rss_mb(proc))]
        out["single"] = measured(
            open_loop(s.url, singles, rate=args.rate, duration=args.duration, headers=key, on_tick=lambda t: mem.append((t, rss_mb(proc))))
        )
        after_single = rss_mb(proc)
        out["batch"] = measured(
            batches(s.url, batch, args.batch_size, duration=min(args.duration / 3, 20), concurrency=args.concurrency, headers=key)
        )
        mem.append((args.duration + 1, rss_mb(proc)))
        start = mem[0][1]
        out["memory"] = {
            "start_mb": start,
            "after_single_mb": after_single,
            "end_mb": mem[-1][1],
            "max_mb": max(m for _, m in mem),
            "growth_pct": 100 * (mem[-1][1] - start) / start,
        }
    out["ratios"] = {
        "single_p99_vs_bare": out["single"]["p99_ms"] / out["bare_single"]["p99_ms"],
        "batch_flows_vs_bare": out["batch"]["flows_per_s"] / out["bare_batch"]["flows_per_s"],
    }
    out["targets"] = {
        "single_p99_under_10ms": out["single"]["p99_ms"] < 10,
        "batch_over_10k_flows_per_s": out["batch"]["flows_per_s"] >= 10_000,
        "memory_growth_under_10pct": out["memory"]["growth_pct"] < 10,
    }
    report = render(out)
    print(report)
    if args.record:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + report)
    return out


class _bare_server:
    "The bare FastAPI app of this file under uvicorn, like the real one (one worker, loopback, free port)."

    def __init__(self, tmp: Path):
        self.tmp = tmp

    def __enter__(self) -> str:
        import subprocess

        port = free_port()
        self.log = open(self.tmp / "bare.log", "wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "bare:app",
                "--app-dir",
                str(self.tmp),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    return url
            except httpx.HTTPError:
                time.sleep(0.1)
        raise TimeoutError("bare server did not start")

    def __exit__(self, *exc):
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


def render(o: dict) -> str:
    "A RESULTS.md section for one run."
    a, s, b, bs, bb, m = o["args"], o["single"], o["bare_single"], o["batch"], o["bare_batch"], o["memory"]
    ok = lambda x: "met" if x else "**missed**"
    load = os.getloadavg()
    return "\n".join(
        [
            f"## REST service (`benchmarks/serve.py`), {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
            "",
            f"Loopback, one uvicorn worker, torch threads {a['torch_threads']}, access log {'on' if a.get('access_log') else 'off'}, feedback store {'off' if a.get('no_feedback') else 'on (SQLite; every flagged flow an alert)'}, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
            f"load average at the end {load[0]:.1f} (other jobs share the machine). Model: untrained MoE of the default size "
            f"(d_token {o['net']['d_token']}, {o['net']['n_blocks']} blocks, temporal {o['net']['d_temporal']}x{o['net']['n_temporal_layers']}) over "
            f"UNSW-NB15's 42 features. Bare = a FastAPI route that parses the same JSON and returns a constant, same server settings.",
            "",
            "| measure | service | bare route | ratio | target |",
            "|---|---|---|---|---|",
            f"| /predict at {a['rate']:.0f} req/s for {a['duration']:.0f} s: p50 | {s['p50_ms']:.2f} ms | {b['p50_ms']:.2f} ms | {s['p50_ms'] / b['p50_ms']:.1f}x | |",
            f"| /predict p99 | {s['p99_ms']:.2f} ms | {b['p99_ms']:.2f} ms | {o['ratios']['single_p99_vs_bare']:.1f}x | < 10 ms: {ok(o['targets']['single_p99_under_10ms'])} |",
            f"| /predict requests answered / sent (errors, unanswered 10 s after the end) | {s['n']} / {s['sent']} ({s['errors']}, {s['unanswered']}) | "
            f"{b['n']} / {b['sent']} ({b['errors']}, {b['unanswered']}) | | |",
            f"| /predict throughput achieved | {s['achieved_rps']:.0f} req/s | {b['achieved_rps']:.0f} req/s | | {a['rate']:.0f} offered |",
            f"| /predict one request at a time (no queueing): p50 / p99 | {o['seq']['p50_ms']:.2f} / {o['seq']['p99_ms']:.2f} ms | "
            f"{o['bare_seq']['p50_ms']:.2f} / {o['bare_seq']['p99_ms']:.2f} ms | {o['seq']['p99_ms'] / o['bare_seq']['p99_ms']:.1f}x | |",
            f"| /predict_batch, {a['batch_size']} flows, {a['concurrency']} clients | {bs['flows_per_s']:,.0f} flows/s | {bb['flows_per_s']:,.0f} flows/s | "
            f"{o['ratios']['batch_flows_vs_bare']:.2f} | >= 10,000: {ok(o['targets']['batch_over_10k_flows_per_s'])} |",
            f"| server RSS start -> after the single-flow run -> after batches (max) | {m['start_mb']:.0f} -> {m['after_single_mb']:.0f} -> "
            f"{m['end_mb']:.0f} MB ({m['max_mb']:.0f}) | | {m['growth_pct']:+.1f} % | < 10 %: {ok(o['targets']['memory_growth_under_10pct'])} |",
            "",
        ]
    )


if __name__ == "__main__":
    main()
