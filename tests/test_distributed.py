"""Scoring at scale (cyber_moe.distributed, `cyber-moe score --input DIR --scheduler ...`) on a real Dask cluster: a
`dask scheduler` and two `dask worker` processes on 127.0.0.1, generated captures (one simulated day cut into
hourly files, as `tcpdump -G 3600` writes them) and Parquet flow files; verdicts compared row for row with
single-process scoring; one worker killed mid-run; a rerun; bad inputs."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cyber_moe.alerts import score_pcap
from cyber_moe.config import ModelConfig
from cyber_moe.bundle import load_model_bundle, save_bundle, score_file
from cyber_moe.testing import free_port, split_capture, untrained_bundle
from cyber_moe.nfstream import NFSTREAM
from cyber_moe.synth import load_or_generate

BIN = Path(sys.executable).parent
N_CAPTURES, N_PARQUET, PARQUET_ROWS = 6, 12, 4000
KEYS = ("src_ip", "src_port", "dst_ip", "dst_port", "protocol", "bidirectional_first_seen_ms", "community_id")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    "Captures, Parquet flow files, a saved bundle of the default model size (threshold in a gap between flows) and single-process verdicts."
    root = tmp_path_factory.mktemp("dist")
    flows, info = load_or_generate(seed=21, n_days=1, n_flows_target=2000, out_dir=root / "synth")
    inputs = root / "inputs"
    inputs.mkdir()
    caps = split_capture(Path(info["pcap"]), inputs, N_CAPTURES)
    rng = np.random.default_rng(0)
    pq_files = []
    for i in range(N_PARQUET):  # synth flows replicated (resampled) into Parquet files, as a flow log would be
        p = inputs / f"flows-{i:02d}.parquet"
        flows.iloc[rng.integers(0, len(flows), PARQUET_ROWS)].reset_index(drop=True).to_parquet(p, index=False)
        pq_files.append(p)
    # a small untrained network: the plumbing does not depend on the model's size or quality, and the test stays short
    b = untrained_bundle(
        flows,
        schema=NFSTREAM,
        seed=3,
        name="dist-test",
        version="4",
        model_cfg=ModelConfig(d_token=16, n_blocks=1, n_heads=2, d_temporal=16, n_temporal_layers=1, d_gate=16, d_head=32),
    )
    p = np.sort(b.predict(flows)["p_attack"].to_numpy())
    i = len(p) * 2 // 3 + int(np.argmax(np.diff(p[len(p) * 2 // 3 :]) > 1e-4))
    b.threshold = float(p[i : i + 2].mean())  # a threshold no flow is within 1e-4 of: torch and ONNX Runtime agree on every verdict
    model = save_bundle(b, root / "model")
    bundle = load_model_bundle(model)
    ref = {c.name: score_pcap(bundle, c) for c in caps}
    ref.update({f.name: score_file(bundle, f) for f in pq_files})
    return {"root": root, "inputs": inputs, "model": model, "ref": ref, "caps": caps, "parquet": pq_files, "threshold": bundle.threshold}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    "A `dask scheduler` and two `dask worker` processes (one thread each) on 127.0.0.1, each in its own process group."
    port, dash = free_port(), free_port()
    env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False"}  # NFStream meters in child processes
    logs = tmp_path_factory.mktemp("dask-logs")
    procs = []

    def start(name, args):
        log = open(logs / f"{name}.log", "w")
        procs.append(subprocess.Popen([str(BIN / "dask"), *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        return procs[-1]

    try:
        start("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", str(port), "--dashboard-address", f"127.0.0.1:{dash}"])
        address = f"tcp://127.0.0.1:{port}"
        workers = [
            start(
                f"worker{i}",
                ["worker", address, "--nworkers", "1", "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard", "--name", f"w{i}"],
            )
            for i in range(2)
        ]
        from distributed import Client

        with Client(address, timeout=60) as c:
            c.wait_for_workers(2, timeout=120)
        yield {"address": address, "workers": workers, "dashboard": dash, "logs": logs}
    finally:
        for p in procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait(timeout=30)


def score_cmd(data, out, cluster, *inputs, feedback: str | None = None) -> list[str]:
    "The command that scores `inputs` on the cluster; alerts stored in `feedback` (default: a SQLite store of the test's own)."
    feedback = feedback or f"sqlite:///{data['root'] / ('feedback-' + Path(out).name + '.db')}"
    return [
        str(BIN / "cyber-moe"),
        "score",
        "--model",
        str(data["model"]),
        "--input",
        *map(str, inputs),
        "--output",
        str(out),
        "--scheduler",
        cluster["address"],
        "--feedback",
        feedback,
    ]


def check_parts(data, out: Path, names: list[str]) -> None:
    "One part per input, equal row for row to single-process scoring; manifest complete; nothing else in the folder."
    thr = data["threshold"]
    man = json.loads((out / "manifest.json").read_text())
    assert sorted(man["units"]) == sorted(names)
    for name in names:
        parts = sorted((out / "verdicts" / f"source={name}").iterdir())
        assert [p.name for p in parts] == ["part-00000.parquet"], parts
        got, ref = pd.read_parquet(parts[0]), data["ref"][name]
        assert got.pop("suppressed_by").isna().all(), name  # a store without rules suppresses nothing
        assert list(got.columns) == list(ref.columns)
        assert len(got) == len(ref) == man["units"][name]["rows"]
        for c in KEYS if name.endswith(".pcap") else ():
            assert got[c].tolist() == ref[c].tolist(), (name, c)
        # verdicts equal, except where torch (single process) and ONNX Runtime (workers) could round across the boundary:
        # a flow within 1e-5 of the threshold, or whose two top families are within 1e-5 (none expected; bounded below)
        near = np.abs(ref["p_attack"].to_numpy() - thr) < 1e-5
        fams = [c for c in ref.columns if c == "attack_family"]
        assert (got["is_attack"] == ref["is_attack"])[~near].all(), name
        same_fam = (got["family"] == ref["family"]).to_numpy()
        assert (~same_fam).sum() <= max(1, len(ref) // 10_000) and all((got[c] == ref[c]).mean() > 0.999 for c in fams), name
        assert near.sum() <= max(1, len(ref) // 10_000), name
        num = [c for c in ref.columns if c.startswith(("p_", "gate_"))]
        np.testing.assert_allclose(got[num].to_numpy(), ref[num].to_numpy(), atol=1e-5)
        alerts = (out / "alerts" / f"{name}.part-00000.jsonl").read_text().splitlines()
        assert len(alerts) == int(ref["is_attack"].sum())
    assert not [p for p in out.rglob(".*") if p.is_file()]  # no temporary file left
    everything = pd.read_parquet(out / "verdicts")
    assert len(everything) == sum(len(data["ref"][n]) for n in names)


def test_cluster_scores_every_input_once_despite_a_killed_worker(data, cluster):
    out = data["root"] / "out"
    names = sorted(p.name for p in data["inputs"].iterdir())
    proc = subprocess.Popen(score_cmd(data, out, cluster, data["inputs"]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, killed_at = [], None
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        m = re.match(r"\[(\d+)/(\d+)\] ", line)
        if m and killed_at is None and int(m.group(1)) >= 3:
            victim = cluster["workers"][0]
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(timeout=30)
            killed_at = int(m.group(1))
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0, (lines, err)
    total = len(names)
    assert killed_at is not None and killed_at < total, lines  # the worker died with most inputs still to do
    done = [l for l in lines if re.match(r"\[\d+/\d+\] ", l)]
    assert len(done) == total and not any("FAILED" in l for l in done), lines
    assert re.search(rf"{total} unit\(s\) scored this run, 0 done before, 0 failed", "\n".join(lines[-3:])), lines
    assert "no alert suppressed" in lines[-2], lines
    assert "flows/s" in done[-1] and "dashboard: http://" in lines[0], lines
    check_parts(data, out, names)
    from distributed import Client

    with Client(cluster["address"], timeout=30) as c:
        assert len(c.scheduler_info()["workers"]) == 1  # the kill took effect

    # a rerun does nothing new: no task, no part rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "verdicts").rglob("*.parquet")}
    r = subprocess.run(score_cmd(data, out, cluster, data["inputs"]), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"0 unit(s) scored this run, {total} done before, 0 failed" in r.stdout, r.stdout
    assert {p: p.stat().st_mtime_ns for p in (out / "verdicts").rglob("*.parquet")} == mtimes


def test_bad_inputs_are_named_counted_and_fail_the_run(data, cluster):
    bad = data["root"] / "bad"
    bad.mkdir()
    whole = data["caps"][1].read_bytes()
    (bad / "cut.pcap").write_bytes(whole[: len(whole) // 2 + 5])  # truncated mid-packet
    pd.read_parquet(data["parquet"][0]).drop(columns=["protocol", "dst2src_bytes"]).to_parquet(bad / "other.parquet")
    (bad / "good.parquet").write_bytes(data["parquet"][1].read_bytes())
    out = data["root"] / "out-bad"
    r = subprocess.run(score_cmd(data, out, cluster, bad, data["root"] / "nowhere" / "*.pcap"), capture_output=True, text=True, timeout=180)
    assert r.returncode == 1, (r.stdout, r.stderr)
    text = r.stdout
    assert re.search(r"FAILED cut.pcap: PcapError: .*cut.pcap: capture truncated at byte", text), text
    assert re.search(r"FAILED other.parquet: SchemaError: .*missing column\(s\): .*protocol", text) and "dst2src_bytes" in text, text
    assert re.search(r"SKIPPED .*nowhere/\*\.pcap: the pattern matches no file", text), text
    assert "1 unit(s) scored this run, 0 done before, 2 failed, 1 input(s) skipped" in text, text
    man = json.loads((out / "manifest.json").read_text())
    assert sorted(man["units"]) == ["good.parquet"] and sorted(man["runs"][-1]["failed"]) == ["cut.pcap", "other.parquet"]
    assert [p.name for p in (out / "verdicts").iterdir()] == ["source=good.parquet"]


def test_single_file_keeps_the_single_process_path(data, tmp_path):
    "One file and an output file: the command scores in-process, as before, and agrees with the cluster's part."
    cap = data["caps"][2]
    out = tmp_path / "one.parquet"
    r = subprocess.run(
        [str(BIN / "cyber-moe"), "score", "--model", str(data["model"]), "--input", str(cap), "--output", str(out)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr
    assert "dashboard" not in r.stdout and "flows, " in r.stdout
    got = pd.read_parquet(out)
    assert got["is_attack"].tolist() == data["ref"][cap.name]["is_attack"].tolist()
    r = subprocess.run(
        [
            str(BIN / "cyber-moe"),
            "score",
            "--model",
            str(data["model"]),
            "--input",
            str(tmp_path / "none" / "*.csv"),
            "--output",
            str(tmp_path / "o"),
            "--workers",
            "1",
            "--no-feedback",
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 1 and "SKIPPED" in r.stdout and "the pattern matches no file" in r.stdout, (r.stdout, r.stderr)


def test_cluster_applies_rules_and_stores_alerts(data, cluster, tmp_path):
    "A SQLite feedback store: its active rules (read once) suppress alerts per part on the workers; every flagged flow is stored, suppressed ones marked; the summary counts per rule."
    from datetime import datetime, timedelta, timezone
    from cyber_moe.feedback import FeedbackStore, flow_alert_id

    inputs = tmp_path / "in"
    inputs.mkdir()
    for p in [*data["caps"][:3], *data["parquet"][:2]]:
        (inputs / p.name).write_bytes(p.read_bytes())
    ports = []
    for p in inputs.iterdir():
        ref = data["ref"][p.name]
        ports.append((ref if p.suffix == ".pcap" else pd.read_parquet(p)).loc[ref["is_attack"].to_numpy() == 1, "dst_port"])
    port = int(pd.concat(ports).value_counts().index[0])  # the most alerted destination port
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    with FeedbackStore(url) as s:
        s.add_rule(
            src="0.0.0.0/0", reason="expired: silences nothing", creator="test", expires_at=datetime.now(timezone.utc) - timedelta(days=1)
        )
        rule = s.add_rule(dst_port=port, reason="known poller", creator="test")
    out = tmp_path / "out"
    r = subprocess.run(score_cmd(data, out, cluster, inputs, feedback=url), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (r.stdout, r.stderr)
    key = ["protocol", "src_ip", "src_port", "dst_ip", "dst_port", "bidirectional_first_seen_ms"]
    all_ids, hit_ids, n_hit, n_flagged = set(), set(), 0, 0
    for p in sorted(inputs.iterdir()):
        got = pd.read_parquet(out / "verdicts" / f"source={p.name}" / "part-00000.parquet")
        ids = got if p.suffix == ".pcap" else pd.read_parquet(p)
        flag = got["is_attack"].to_numpy() == 1
        hit = flag & (ids["dst_port"].to_numpy() == port)
        assert (got["suppressed_by"].notna().to_numpy() == hit).all() and set(got["suppressed_by"].dropna()) <= {rule.id}, p.name
        alerts = (out / "alerts" / f"{p.name}.part-00000.jsonl").read_text().splitlines()
        assert len(alerts) == flag.sum() - hit.sum(), p.name  # suppressed: scored and stored, not alerted
        assert all(json.loads(a)["destination"]["port"] != port for a in alerts), p.name
        n_hit, n_flagged = n_hit + int(hit.sum()), n_flagged + int(flag.sum())
        aid = lambda rows: {flow_alert_id("dist-test", "4", *t) for t in rows[key].itertuples(index=False)}
        all_ids |= aid(ids[flag])
        hit_ids |= aid(ids[hit])
    assert 0 < n_hit < n_flagged
    assert f"suppressed {n_hit:,} (rule {rule.id} {n_hit:,}); {len(all_ids):,} new alert(s) stored" in r.stdout, r.stdout
    with FeedbackStore(url) as s:
        assert s.count_alerts() == len(all_ids) and s.count_alerts(suppressed=True) == len(hit_ids)
        assert s.get_rule(rule.id).n_suppressed == len(hit_ids)
        a = s.get_alert(sorted(hit_ids)[0])
        assert a["suppressed_by"] == rule.id and a["dst_port"] == port and len(a["features"]) == len(NFSTREAM.features)
    man = json.loads((out / "manifest.json").read_text())
    assert sum(u["suppressed"].get(str(rule.id), 0) for u in man["units"].values()) == n_hit
    assert not any("alert_records" in u for u in man["units"].values())  # the records went to the store, not the manifest
