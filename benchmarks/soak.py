"""Bounded soak of the REST service: mixed valid traffic, bad inputs and reloads against one worker.

Targets (issue 18): over the whole run 0 server errors (5xx), 0 lost requests (no answer, connection error or
timeout), server memory (RSS) growth < 10 % from the first minute to the end; p99 of single-flow /predict recorded.
The service runs as `cyber-moe serve` (one uvicorn worker, an API key) on two demo bundles that reloads swap.

    .venv/bin/python benchmarks/soak.py                    # 10 minutes
    .venv/bin/python benchmarks/soak.py --duration 60      # a short look
    .venv/bin/python benchmarks/soak.py --record           # append the results to benchmarks/RESULTS.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
KEY = "soak-key-7d2e"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bad_bodies(flow: dict, max_batch: int) -> list[tuple[str, bytes]]:
    "(route, body) pairs a client gets wrong: each must be answered 4xx, never 5xx."
    no_field = {k: v for k, v in list(flow.items())[1:]}
    wrong_type = {**flow, next(iter(flow)): "many"}
    return [
        ("/predict", b"{not json"),
        ("/predict", json.dumps(no_field).encode()),
        ("/predict", json.dumps(wrong_type).encode()),
        ("/predict", json.dumps(flow).replace(str(next(iter(flow.values()))), "NaN", 1).encode()),
        ("/predict", b"[" * 5000 + b"]" * 5000),
        ("/predict_batch", json.dumps([{}] * 64).encode()),
        ("/predict_batch", json.dumps([flow] * (max_batch + 1)).encode()),
        ("/predict", b""),
    ]


async def soak(
    url: str, flows: list[dict], *, duration: float, rate: float, reload_every: float, bundles: list[str], max_batch: int, on_minute
) -> dict:
    headers = {"X-API-Key": KEY, "Content-Type": "application/json"}
    stats = {"sent": 0, "answered": 0, "lost": 0, "server_errors": 0, "by_kind": {}, "reloads_ok": 0, "reloads_failed": 0}
    lat_single: list[float] = []
    bad = bad_bodies(flows[0], max_batch)
    rng = random.Random(0)
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as c:

        async def one(kind: str, route: str, body: bytes | None):
            t = time.perf_counter()
            try:
                r = await (c.post(route, content=body) if body is not None else c.get(route))
            except httpx.HTTPError as e:
                stats["lost"] += 1
                stats["by_kind"].setdefault(kind, {}).setdefault(f"lost {type(e).__name__}", 0)
                stats["by_kind"][kind][f"lost {type(e).__name__}"] += 1
                return
            stats["answered"] += 1
            k = stats["by_kind"].setdefault(kind, {})
            k[r.status_code] = k.get(r.status_code, 0) + 1
            if r.status_code >= 500:
                stats["server_errors"] += 1
            if kind == "single" and r.status_code == 200:
                lat_single.append(time.perf_counter() - t)

        async def reloader():
            i = 0
            while True:
                await asyncio.sleep(reload_every)
                i += 1
                try:
                    r = await c.post("/admin/reload", content=json.dumps({"model_uri": bundles[i % len(bundles)]}).encode())
                except httpx.HTTPError:
                    stats["reloads_failed"] += 1
                    stats["lost"] += 1
                    continue
                stats["answered"] += 1
                if r.status_code >= 500:
                    stats["server_errors"] += 1
                stats["reloads_ok" if r.status_code == 200 else "reloads_failed"] += 1

        rl = asyncio.create_task(reloader())
        t0, tasks, i, minute = time.perf_counter(), [], 0, 0
        while (now := time.perf_counter() - t0) < duration:
            due = i / rate
            if due > now:
                await asyncio.sleep(due - now)
            u = rng.random()
            if u < 0.70:
                kind, route, body = "single", "/predict", json.dumps(flows[i % len(flows)]).encode()
            elif u < 0.82:
                kind, route, body = "batch", "/predict_batch", json.dumps(flows[:64]).encode()
            elif u < 0.95:
                kind, (route, body) = "bad", bad[i % len(bad)]
            else:
                kind, route, body = "health", ("/ready" if i % 2 else "/health"), None
            stats["sent"] += 1
            tasks.append(asyncio.create_task(one(kind, route, body)))
            i += 1
            if int(now // 60) > minute:
                minute = int(now // 60)
                on_minute(minute)
            if len(tasks) > 2000:
                tasks = [t for t in tasks if not t.done()]
        rl.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    a = np.asarray(lat_single) * 1e3
    stats.update(
        seconds=time.perf_counter() - t0,
        single_p50_ms=float(np.percentile(a, 50)),
        single_p99_ms=float(np.percentile(a, 99)),
        single_max_ms=float(a.max()),
    )
    return stats


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=600, help="seconds of traffic (default 600)")
    ap.add_argument("--rate", type=float, default=20, help="requests per second, all kinds together")
    ap.add_argument("--reload-every", type=float, default=20, help="seconds between reloads")
    ap.add_argument("--record", action="store_true", help="append the results to benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    from cyber_moe.testing import DEMO_SCHEMA, demo_flows, make_demo_bundle

    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    bundles = [str(make_demo_bundle(tmp / f"b{k}", seed=k, version=str(k + 1))) for k in range(2)]
    flows = json.loads(demo_flows(500, seed=3).loc[:, list(DEMO_SCHEMA.features)].to_json(orient="records"))
    port, max_batch = free_port(), 4096
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CYBER_MOE_")},
        "CYBER_MOE_API_KEY": KEY,
        "CYBER_MOE_TORCH_THREADS": "1",
        "CYBER_MOE_ACCESS_LOG": "false",
    }
    log = open(tmp / "server.log", "wb")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "cyber-moe"), "serve", "--model", bundles[0], "--port", str(port), "--workers", "1"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        t = time.time()
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited: {(tmp / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t > 180:
                raise TimeoutError("server not ready in 180 s")
            time.sleep(0.3)
        proc = psutil.Process(server.pid)
        rss = lambda: sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
        samples = [(0, rss())]

        def on_minute(m):
            samples.append((m, rss()))
            print(f"minute {m}: server RSS {samples[-1][1]:.0f} MB", file=sys.stderr, flush=True)

        load0 = os.getloadavg()[0]
        res = asyncio.run(
            soak(
                url,
                flows,
                duration=args.duration,
                rate=args.rate,
                reload_every=args.reload_every,
                bundles=bundles,
                max_batch=max_batch,
                on_minute=on_minute,
            )
        )
        samples.append((args.duration / 60, rss()))
        base = samples[1][1] if len(samples) > 2 else samples[0][1]  # after the first minute: libraries and arenas settled
        res.update(
            rss_start_mb=samples[0][1],
            rss_base_mb=base,
            rss_end_mb=samples[-1][1],
            rss_growth=(samples[-1][1] - base) / base,
            load_before=load0,
            load_after=os.getloadavg()[0],
            alive=server.poll() is None,
            tracebacks=(tmp / "server.log").read_text(errors="replace").count("Traceback"),
        )
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    out = render(res, args)
    print(out)
    if args.record:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + out + "\n")
    return res


def render(r: dict, args) -> str:
    ok = lambda c: "met" if c else "MISSED"
    kinds = "; ".join(f"{k}: " + ", ".join(f"{s}×{n}" for s, n in sorted(v.items(), key=str)) for k, v in r["by_kind"].items())
    return "\n".join(
        [
            f"## Soak of the REST service (`benchmarks/soak.py`), {datetime.now(timezone.utc):%Y-%m-%d}",
            "",
            f"One uvicorn worker (`cyber-moe serve`, API key, demo bundles), {r['seconds']:.0f} s at {args.rate:g} requests/s: "
            f"70% single flows, 12% batches of 64, 13% bad inputs (malformed, missing or mistyped fields, NaN, 5,000-deep "
            f"nesting, empty rows, over max_batch, empty body), 5% /health and /ready; a reload every {args.reload_every:g} s "
            f"alternating two bundles. {platform.python_version()}, load average {r['load_before']:.1f} before, {r['load_after']:.1f} after "
            "(2 cores shared with other jobs).",
            "",
            "| measure | value | target |",
            "|---|---|---|",
            f"| requests sent / answered | {r['sent']:,} / {r['answered'] - r['reloads_ok'] - r['reloads_failed']:,} | all answered |",
            f"| lost (no answer, connection error, timeout) | {r['lost']} | 0 ({ok(r['lost'] == 0)}) |",
            f"| server errors (5xx) | {r['server_errors']} | 0 ({ok(r['server_errors'] == 0)}) |",
            f"| reloads ok / failed | {r['reloads_ok']} / {r['reloads_failed']} | all ok |",
            f"| single-flow /predict p50 / p99 / max | {r['single_p50_ms']:.1f} / {r['single_p99_ms']:.1f} / {r['single_max_ms']:.0f} ms | recorded |",
            f"| server RSS after 1 min → end | {r['rss_base_mb']:.0f} → {r['rss_end_mb']:.0f} MB ({r['rss_growth']:+.1%}) | < 10% ({ok(r['rss_growth'] < 0.10)}) |",
            f"| tracebacks in the server log | {r['tracebacks']} | 0 |",
            "",
            f"Answers by kind: {kinds}.",
        ]
    )


if __name__ == "__main__":
    main()
