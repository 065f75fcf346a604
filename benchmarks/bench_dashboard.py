"""Seconds an analyst waits in the dashboard, measured in headless Chromium: from opening the page (first paint) and
from choosing another run in the picker, to the headline table visible and to every view filled.

"after" is this checkout; "before" is the dashboard of git ref `--before` (default `main`), exported with
`git archive` to a temp folder that goes first on the kernel's PYTHONPATH, so both serve the same runs with the same
Voila in the same run of this script, one after the other. The runs: an outputs folder holding one trained run
(`--outputs`, e.g. the smoke run of `tests/test_dashboard.py`); it is copied twice (run and run-b) so that the
picker has a second run to switch to. "filled" means a flow verdict is shown and no "computing ..." placeholder is
left.

    python benchmarks/bench_dashboard.py --outputs OUT [--before main] [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from common import emit_table

from cyber_moe.dashboard import dashboard_env, start, stop, wait_until_serving

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"]
HEADLINE = "() => !!Array.from(document.querySelectorAll('.cm-table')).find(t => !t.dataset.old && t.offsetParent !== null)"
FILLED = (
    "() => !!Array.from(document.querySelectorAll('.cm-verdict')).find(v => !v.dataset.old) "
    "&& document.querySelectorAll('.cm-pending').length === 0"
)
MARK_OLD = "() => document.querySelectorAll('.cm-table, .cm-verdict').forEach(e => e.dataset.old = '1')"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(browser, outputs: Path, old: Path | None, log: Path) -> dict[str, float]:
    "Open the dashboard once and switch runs once; seconds to the headline table and to every view, for each."
    port = _free_port()
    with open(log, "w") as f:
        if old is None:
            proc = start(outputs_dir=outputs, port=port, stdout=f, stderr=subprocess.STDOUT)
        else:  # the old package first on the path of Voila and its kernels, served as it was (plain Voila)
            env = {**dashboard_env(outputs_dir=outputs), "PYTHONPATH": str(old)}
            nb = old / "nbs" / "dashboards" / "analysis.ipynb"
            proc = subprocess.Popen(
                [sys.executable, "-m", "voila", str(nb), f"--port={port}", "--Voila.ip=127.0.0.1", "--no-browser"],
                env=env,
                cwd=str(nb.parent),
                stdout=f,
                stderr=subprocess.STDOUT,
            )
    out = {}
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/", timeout=120, proc=proc)
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        t0 = time.monotonic()
        page.goto(f"http://127.0.0.1:{port}/", wait_until="commit", timeout=600_000)
        page.wait_for_function(HEADLINE, timeout=600_000, polling=100)
        out["open: headline"] = time.monotonic() - t0
        page.wait_for_function(FILLED, timeout=600_000, polling=100)
        out["open: all views"] = time.monotonic() - t0
        page.evaluate(MARK_OLD)
        t0 = time.monotonic()
        page.select_option(".cm-run select", index=1)
        page.wait_for_function(HEADLINE, timeout=600_000, polling=100)
        out["switch run: headline"] = time.monotonic() - t0
        page.wait_for_function(FILLED, timeout=600_000, polling=100)
        out["switch run: all views"] = time.monotonic() - t0
        page.close(run_before_unload=True)
    finally:
        stop(proc)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--outputs", required=True, help="an outputs folder with one trained run (metrics.json, model/, config.yaml, prepared/)"
    )
    ap.add_argument("--before", default="main", help="git ref of the dashboard to compare against (default main)")
    ap.add_argument("--append", type=Path, help="append the table to this file (e.g. benchmarks/RESULTS.md)")
    a = ap.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        runs = [d for d in Path(a.outputs).iterdir() if (d / "metrics.json").is_file()]
        if not runs:
            sys.exit(f"error: {a.outputs}: no run folder (a folder with metrics.json) inside")
        outputs = tmp / "outputs"
        shutil.copytree(a.outputs, outputs)
        shutil.copytree(outputs / runs[0].name, outputs / f"{runs[0].name}-b")
        old = tmp / "before"
        old.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", a.before, "cyber_moe", "nbs/dashboards"], capture_output=True, check=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
        load = os.getloadavg()[0]
        results = {}
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            results["before"] = measure(browser, outputs, old, tmp / "before.log")
            results["after"] = measure(browser, outputs, None, tmp / "after.log")
            browser.close()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"## Dashboard waiting time in Chromium (`benchmarks/bench_dashboard.py`), {when}",
        "",
        f"Run `{runs[0].name}` (and a copy, to switch to); before = `{a.before}`, after = this branch; load average "
        f"{load:.1f} at the start (2 cores, shared).",
        "",
        "| seconds | before | after | after / before |",
        "|---|---|---|---|",
    ]
    for k in results["before"]:
        b, f = results["before"][k], results["after"][k]
        lines.append(f"| {k} | {b:.1f} | {f:.1f} | {f / b:.2f} |")
    emit_table(lines, a.append)


if __name__ == "__main__":
    main()
