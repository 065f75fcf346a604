"""Traffic lab targets, read from a finished run that trained on lab sessions (the `make run` default).

Targets (issue 12): on the held-out lab session every attack family has at least 90% of its flows flagged and the
benign false-positive rate is at most 1%, MoE next to LightGBM in the same run; the default scenario gives at least
30,000 flows from at most 3 minutes of capture; `make run` (timed by the caller) at most 10 minutes on 2 cores.
Prints a Markdown table and appends it to benchmarks/RESULTS.md unless --no-append.

    .venv/bin/python benchmarks/bench_lab.py [--run outputs/default] [--no-append]
"""

from __future__ import annotations

import argparse
import json
from datetime import date
from pathlib import Path

from common import emit_table


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="outputs/default")
    ap.add_argument("--no-append", action="store_true")
    a = ap.parse_args(argv)
    run = Path(a.run)
    m = json.loads((run / "metrics.json").read_text())
    origin = m["run"].get("data_origin") or {}
    if "detection" not in m:
        raise SystemExit(f"{run}: no lab detection metrics (data used: {origin.get('used')}; {origin.get('fallback')})")
    sessions = [
        json.loads((Path(p) / "session.json").read_text())
        for p in sorted((run.parent / "lab").glob("*/"))
        if (Path(p) / "session.json").is_file()
        and json.loads((Path(p) / "session.json").read_text()).get("session") in origin.get("sessions", [])
    ]
    d = m["detection"]
    t = d["model"]["targets"]
    lines = [
        f"## Traffic lab: detection on a held-out session (`benchmarks/bench_lab.py`, {date.today()})",
        "",
        f"Run `{run.name}`; train session(s) {', '.join(s for s in origin['sessions'] if s not in origin['test_sessions'])}, "
        f"test session {', '.join(origin['test_sessions'])}.",
        "",
    ]
    lines += ["| session | flows | capture s | packets captured | dropped | unattributed | failed steps |", "|---|---|---|---|---|---|---|"]
    for s in sessions:
        lines.append(
            f"| {s['session']} | {s['n_flows']:,} | {s['capture_s']:.1f} | {s['tcpdump'].get('captured', 0):,} | "
            f"{s['tcpdump'].get('dropped_by_kernel', 0)} | {s['n_unattributed']} | {', '.join(s['failed_steps']) or '—'} |"
        )
    lines += [
        "",
        f"| family / tool (target ≥ {t['family_detection_min']:.0%} flagged; benign: FPR ≤ {t['benign_fpr_max']:.0%}) | flows | MoE | LightGBM |",
        "|---|---|---|---|",
    ]
    for key in ("families", "tools"):
        for k, v in d["model"][key].items():
            b = d["baseline"][key].get(k, {}).get("rate")
            lines.append(f"| {k} | {v['n']:,} | {v['rate']:.4f} | {b:.4f} |")
    for who in ("model", "baseline"):
        below = d[who]["families_below_target"]
        lines.append("")
        lines.append(
            f"{'MoE' if who == 'model' else 'LightGBM'}: families below target: {', '.join(below) or 'none'}; "
            f"benign FPR {d[who]['benign_fpr']:.4f} ({'met' if d[who]['fpr_met'] else 'missed'})."
        )
    emit_table(lines, None if a.no_append else Path(__file__).parent / "RESULTS.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
