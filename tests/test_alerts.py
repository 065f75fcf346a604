"""Capture scoring and alerts (cyber_moe.alerts) end to end: a generated pcap, a saved and reloaded bundle of the
default model size on the nfstream schema, alert files in ECS and Suricata-EVE shape, truncated captures, and
`watch` replaying the pcap."""

import json

import numpy as np
import pandas as pd
import pytest

from cyber_moe.alerts import SID_BASE, community_id, make_alerts, save_verdicts, score_pcap, summary_table, watch, write_alerts
from cyber_moe.bundle import load_model_bundle, save_bundle
from cyber_moe.testing import untrained_bundle
from cyber_moe.nfstream import NFSTREAM, PcapError, pcap_to_flows
from cyber_moe.synth import load_or_generate

# Field -> type for the keys every alert must carry (dotted paths into the nested documents).
ECS_REQUIRED = {
    "@timestamp": str,
    "ecs.version": str,
    "event.kind": str,
    "event.category": list,
    "event.type": list,
    "event.start": str,
    "event.end": str,
    "event.duration": int,
    "event.risk_score": float,
    "event.severity": int,
    "source.ip": str,
    "source.port": int,
    "destination.ip": str,
    "destination.port": int,
    "network.transport": str,
    "network.iana_number": str,
    "network.community_id": str,
    "rule.name": str,
    "rule.id": str,
    "rule.ruleset": str,
    "rule.version": str,
    "observer.product": str,
}
EVE_REQUIRED = {
    "timestamp": str,
    "flow_id": int,
    "event_type": str,
    "src_ip": str,
    "src_port": int,
    "dest_ip": str,
    "dest_port": int,
    "proto": str,
    "community_id": str,
    "alert.action": str,
    "alert.gid": int,
    "alert.signature_id": int,
    "alert.rev": int,
    "alert.signature": str,
    "alert.category": str,
    "alert.severity": int,
}


def get(doc: dict, dotted: str):
    for k in dotted.split("."):
        doc = doc[k]
    return doc


def check_shape(doc: dict, spec: dict) -> None:
    for key, typ in spec.items():
        value = get(doc, key)
        assert type(value) is typ, f"{key}: {value!r} is {type(value).__name__}, expected {typ.__name__}"


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    "A generated capture (about 4,000 flows over one simulated day) and its labelled flows."
    out = tmp_path_factory.mktemp("capture")
    flows, info = load_or_generate(seed=11, n_days=1, n_flows_target=4000, out_dir=out)
    return flows, info["pcap"]


@pytest.fixture(scope="module")
def bundle(capture, tmp_path_factory):
    "A bundle of the default ModelConfig size on the nfstream schema, saved and loaded back as the CLI loads it."
    flows, _ = capture
    b = untrained_bundle(flows, schema=NFSTREAM, seed=1, name="nfs-test", version="7")
    b.threshold = float(np.quantile(b.predict(flows)["p_attack"], 0.7))  # about 30% flagged: both kinds present
    return load_model_bundle(save_bundle(b, tmp_path_factory.mktemp("model") / "model"))


@pytest.fixture(scope="module")
def scored(bundle, capture):
    return score_pcap(bundle, capture[1])


def test_community_id_spec_vectors():
    # Source: github.com/corelight/community-id-spec, baseline/baseline_deflt.json (seed 0) and
    # baseline/baseline_seed1.json (seed 1): (proto, saddr, sport, daddr, dport, seed, communityid).
    vectors = [
        (58, "fe80::200:86ff:fe05:80da", 135, "fe80::260:97ff:fe07:69ea", 136, 0, "1:dGHyGvjMfljg6Bppwm3bg0LO8TY="),
        (58, "3ffe:507:0:1:200:86ff:fe05:80da", 128, "3ffe:501:0:1001::2", 129, 0, "1:+TW+HtLHvV1xnGhV1lv7XoJrqQg="),
        (1, "10.0.0.1", 11, "10.0.0.2", 0, 0, "1:YHxtAirCG//0OzkcVAukqKQN9xM="),
        (6, "2001:470:e5bf:dead:4957:2174:e82c:4887", 63943, "2607:f8b0:400c:c03::1a", 25, 1, "1:eJYTW6AOzFLlSUoESovMjnu7rMw="),
        (132, "192.168.170.56", 7, "192.168.170.8", 7, 1, "1:5w3ZRjeKBzqT3zsaEECDGjUbYeg="),
        (46, "10.1.12.2", None, "10.1.12.1", None, 1, "1:rYir8gphR31noO9iDRQmF/BteEI="),
    ]
    for proto, s, sp, d, dp, seed, want in vectors:
        assert community_id(s, sp, d, dp, proto, seed=seed) == want, (proto, s, d, seed)
    # a one-way ICMPv6 pair (neighbour solicitation/advertisement 135/136) flipped is a different flow in the spec
    assert community_id("fe80::260:97ff:fe07:69ea", 135, "fe80::200:86ff:fe05:80da", 136, 58) == "1:zavyT/cezQr1fmImYCwYnMXbgck="


def test_scored_flows_keep_tuple_and_time_order(bundle, capture, scored):
    flows = pcap_to_flows(capture[1])
    assert len(scored) == len(flows) > 3000
    cols = ["src_ip", "src_port", "dst_ip", "dst_port", "protocol", "bidirectional_first_seen_ms", "bidirectional_last_seen_ms"]
    pd.testing.assert_frame_equal(scored[cols], flows[cols], check_dtype=False)
    np.testing.assert_allclose(scored["p_attack"].to_numpy(), bundle.predict(flows)["p_attack"].to_numpy(), rtol=0, atol=1e-5)
    flagged = int(scored["is_attack"].sum())
    assert 0.2 * len(scored) < flagged < 0.4 * len(scored)
    text = summary_table(scored)
    assert text.startswith(f"{len(scored):,} flows, {flagged:,} flagged")
    for fam, n in scored.loc[scored["is_attack"] == 1, "attack_family"].value_counts().items():
        assert any(line.split()[:2] == [fam, str(n)] for line in text.splitlines()), (fam, n, text)


@pytest.mark.parametrize("fmt, spec", [("ecs", ECS_REQUIRED), ("eve", EVE_REQUIRED)])
def test_alert_files_one_line_per_flagged_flow(bundle, scored, tmp_path, fmt, spec):
    path = tmp_path / f"alerts-{fmt}.jsonl"
    n = write_alerts(make_alerts(scored, bundle, alert_format=fmt), path)
    lines = path.read_text().splitlines()
    flagged = scored[scored["is_attack"] == 1]
    assert n == len(lines) == len(flagged)
    docs = [json.loads(line) for line in lines]
    for d in docs:
        check_shape(d, spec)
    src = "source.ip" if fmt == "ecs" else "src_ip"
    dport = "destination.port" if fmt == "ecs" else "dest_port"
    cid = "network.community_id" if fmt == "ecs" else "community_id"
    assert [get(d, src) for d in docs] == flagged["src_ip"].tolist()
    assert [get(d, dport) for d in docs] == flagged["dst_port"].tolist()
    assert [get(d, cid) for d in docs] == flagged["community_id"].tolist()
    benign_keys = set(
        zip(scored.loc[scored["is_attack"] == 0, "community_id"], scored.loc[scored["is_attack"] == 0, "bidirectional_first_seen_ms"])
    )
    if fmt == "ecs":
        assert {d["event"]["kind"] for d in docs} == {"alert"}
        assert all("network" in d["event"]["category"] for d in docs)
        assert {(d["rule"]["ruleset"], d["rule"]["version"]) for d in docs} == {("nfs-test", "7")}
        assert [d["rule"]["name"] for d in docs] == flagged["attack_family"].tolist()
        starts_ms = pd.to_datetime([d["@timestamp"] for d in docs], utc=True).as_unit("ms").asi8
        assert starts_ms.tolist() == flagged["bidirectional_first_seen_ms"].tolist()
        assert not benign_keys & {(d["network"]["community_id"], int(t)) for d, t in zip(docs, starts_ms)}
    else:
        assert {d["event_type"] for d in docs} == {"alert"}
        assert [d["alert"]["signature_id"] - SID_BASE for d in docs] == [bundle.classes.index(f) for f in flagged["attack_family"]]
        assert all(d["timestamp"].endswith("+0000") for d in docs)
        assert len({d["flow_id"] for d in docs}) == len(docs)


def test_verdict_file_round_trip(scored, tmp_path):
    cols = ["src_ip", "src_port", "dst_ip", "dst_port", "bidirectional_first_seen_ms", "community_id", "is_attack"]
    back = pd.read_csv(save_verdicts(scored, tmp_path / "v" / "verdicts.csv"))
    assert back[cols].values.tolist() == scored[cols].values.tolist()
    assert pd.read_parquet(save_verdicts(scored, tmp_path / "v" / "verdicts.parquet"))[cols].values.tolist() == scored[cols].values.tolist()


def test_truncated_capture_names_flows_read(bundle, capture, tmp_path):
    raw = open(capture[1], "rb").read()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(raw[: int(len(raw) * 0.4)])
    with pytest.raises(PcapError) as err:
        score_pcap(bundle, cut)
    part = score_pcap(bundle, cut, allow_truncated=True)
    msg = str(err.value)
    assert str(cut) in msg and f"give {len(part)} flow(s)" in msg and "--allow-truncated" in msg, msg
    assert 0 < len(part) and part.attrs["capture"]["truncated"]
    assert "capture truncated" in summary_table(part)


def test_watch_replay_matches_score_pcap(bundle, capture, scored, tmp_path):
    expected = make_alerts(scored, bundle, alert_format="ecs")
    path = tmp_path / "live.jsonl"
    path.write_text("")
    stats = watch(capture[1], bundle, on_alert=lambda a: write_alerts([a], path, append=True), batch_size=64)
    got = [json.loads(line) for line in path.read_text().splitlines()]
    # whole documents as the key: two flows may share timestamp and 5-tuple, and ties must not depend on batch order
    key = lambda a: json.dumps(a, sort_keys=True)
    assert stats["n_flows"] == len(scored) and stats["n_alerts"] == len(expected) and stats["n_batches"] >= len(scored) // 64
    assert sorted(got, key=key) == sorted(expected, key=key)


def test_watch_flushes_a_waiting_batch_after_max_delay(bundle, capture):
    # a batch far larger than the capture: only the max_delay_s timer can cut it into several batches
    sizes = []
    stats = watch(capture[1], bundle, on_alert=lambda a: None, batch_size=10**6, max_delay_s=0.05, on_batch=lambda b: sizes.append(len(b)))
    assert stats["n_batches"] == len(sizes) >= 2 and sum(sizes) == stats["n_flows"]


def score_capture(cli, bundle, capture, tmp_path, feedback: str, *more: str):
    "`cyber-moe score` of the capture with the bundle saved under tmp_path, alerts to a.jsonl, `more` options and store `feedback`."
    import subprocess

    model = save_bundle(bundle, tmp_path / "model")
    cmd = [cli, "score", "--model", str(model), "--input", str(capture[1]), "--alerts", str(tmp_path / "a.jsonl"), *more]
    return subprocess.run([*cmd, "--feedback", feedback], capture_output=True, text=True)


def test_cli_score_pcap_writes_alerts(cli, bundle, capture, scored, tmp_path):
    r = score_capture(cli, bundle, capture, tmp_path, f"sqlite:///{tmp_path / 'feedback.db'}", "--alert-format", "eve")
    assert r.returncode == 0, r.stderr
    n = int(scored["is_attack"].sum())
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == n
    assert f"{n:,} new alert(s) stored" in r.stdout and "no alert suppressed" in r.stdout, r.stdout


def test_cli_score_and_watch_apply_suppression_rules(cli, bundle, capture, scored, tmp_path):
    "A rule made from one alert's source silences that source in `score --alerts` and `watch`; the flows are still scored and stored."
    import subprocess
    from cyber_moe.feedback import FeedbackStore

    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    flagged = scored[scored["is_attack"] == 1]
    src = flagged["src_ip"].value_counts().index[0]
    n_sup = int((flagged["src_ip"] == src).sum())
    assert 0 < n_sup < len(flagged)
    with FeedbackStore(url) as fb:
        rule = fb.add_rule(src=src, reason="the backup server", creator="pytest")
    r = score_capture(cli, bundle, capture, tmp_path, url, "--output", str(tmp_path / "v.parquet"))
    model = tmp_path / "model"
    assert r.returncode == 0, r.stderr
    alerts = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(alerts) == len(flagged) - n_sup and all(a["source"]["ip"] != src for a in alerts)
    assert f"suppressed {n_sup:,} (rule {rule.id} {n_sup:,})" in r.stdout, r.stdout
    assert f"{n_sup:,} flagged flow(s) suppressed by rules" in r.stdout
    v = pd.read_parquet(tmp_path / "v.parquet")
    assert len(v) == len(scored) and int(v["is_attack"].sum()) == len(flagged)  # still scored
    assert int(v["suppressed_by"].notna().sum()) == n_sup and "bidirectional_packets" not in v.columns
    w = subprocess.run(
        [cli, "watch", "--model", str(model), "--pcap", str(capture[1]), "--alerts", str(tmp_path / "w.jsonl"), "--feedback", url],
        capture_output=True,
        text=True,
    )
    assert w.returncode == 0, w.stderr
    assert len((tmp_path / "w.jsonl").read_text().splitlines()) == len(flagged) - n_sup
    assert f"{n_sup:,} suppressed" in w.stderr and "0 new alert(s) stored" in w.stderr, w.stderr
    with FeedbackStore(url) as fb:
        assert fb.count_alerts(suppressed=None) == len(flagged) and fb.count_alerts(suppressed=True) == n_sup
        assert fb.get_rule(rule.id).n_suppressed == n_sup  # stored once, counted once


def test_cli_score_goes_on_when_the_store_is_unreachable(cli, bundle, capture, scored, tmp_path):
    from cyber_moe.testing import free_port

    r = score_capture(cli, bundle, capture, tmp_path, f"postgresql+psycopg://u:secret@127.0.0.1:{free_port()}/fb")
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "a.jsonl").read_text().splitlines()) == int(scored["is_attack"].sum())
    assert "going on without feedback" in r.stderr and "secret" not in r.stderr, r.stderr


def test_ctrl_c_stops_watch_and_leaves_no_process(cli, bundle, tmp_path):
    "Ctrl-C (SIGINT to the process group, as a terminal sends it) stops `watch` on a live interface: exit 0, its summary, no reader or meter left."
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    model = save_bundle(bundle, tmp_path / "model")
    # as from a terminal: SIGINT at its default, whatever this process inherited (a shell without job control starts
    # background commands with SIGINT ignored, and Python then leaves Ctrl-C ignored too)
    dfl = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])"
    cmd = [sys.executable, "-c", dfl, cli, "watch", "--model", str(model), "--interface", "lo", "--alerts", str(tmp_path / "w.jsonl")]
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}  # SIGABRT dumps every thread's stack: what a hang was waiting for
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, env=env)
    try:
        deadline, kids = time.monotonic() + 90, []
        while time.monotonic() < deadline and len(kids) < 2 and p.poll() is None:  # the reader and its meter
            time.sleep(0.2)
            kids = psutil.Process(p.pid).children(recursive=True)
        assert len(kids) >= 2, (kids, p.poll())
        time.sleep(1.0)  # the scorer waits for flows by now
        os.killpg(p.pid, signal.SIGINT)
        try:
            out, err = p.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            states = [(k.pid, k.name(), k.status()) for k in kids if k.is_running()]
            for k in [psutil.Process(p.pid), *kids]:
                with contextlib.suppress(psutil.Error):
                    k.send_signal(signal.SIGABRT)
            out, err = p.communicate(timeout=30)
            raise AssertionError(f"watch did not end 60 s after Ctrl-C; children {states}; stderr:\n{err}") from None
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, err
    assert "watched lo:" in err and "(stopped by Ctrl-C)" in err and "Traceback" not in err, err
    assert "did not stop" not in err, err  # stopped by SIGTERM, meters included, not killed after the time-out
    _, alive = psutil.wait_procs(kids, timeout=10)
    assert not alive, alive
