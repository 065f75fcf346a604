"""The traffic lab for real: namespaces, services, clients and attack tools, recorded through the CLI.

Three smoke sessions are recorded at once (different seeds, so concurrent runs are exercised too), one is
interrupted with SIGTERM and one has a step crash on purpose. After each, nothing of the lab may be left:
no namespace, no process, no work folder.
"""

import json
import signal
import subprocess
import time
from pathlib import Path

import lightgbm as lgb
import pandas as pd
import pytest

from dataclasses import replace

from cyber_moe.schema import sequence_array
from cyber_moe.lab import LAB, LAB_SEQUENCE, LabUnavailable, check_available, lab_namespaces, load_scenario, meter_capture, plan_session

ROOT = Path(__file__).resolve().parent.parent
SMOKE = ROOT / "params" / "lab" / "smoke.yaml"


@pytest.fixture(scope="module", autouse=True)
def lab_available():
    try:
        check_available(plan_session(load_scenario(SMOKE), 0, Path("/x")).binaries())
    except LabUnavailable as e:
        pytest.skip(f"traffic lab unavailable here: {e}")


def _leftovers(info: dict) -> dict:
    "What a finished run left behind: its namespaces, processes mentioning its work folder, the folder itself."
    ps = subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return {
        "namespaces": lab_namespaces(info["run_id"]),
        "processes": [l for l in ps.splitlines() if info["work"] in l],
        "work": Path(info["work"]).exists(),
    }


def _clean(info: dict) -> bool:
    return _leftovers(info) == {"namespaces": [], "processes": [], "work": False}


def _record(cli, out, seed, *extra):
    return subprocess.Popen(
        [cli, "lab", "record", "--scenario", str(SMOKE), "--out", str(out), "--seed", str(seed), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture(scope="module")
def sessions(cli, tmp_path_factory):
    "Seeds 1, 2 and 45 of the smoke scenario, recorded at the same time."
    d = tmp_path_factory.mktemp("lab")
    start = time.time()
    procs = {seed: _record(cli, d / f"s{seed}", seed) for seed in (1, 2, 45)}
    outs = {seed: p.communicate(timeout=180) for seed, p in procs.items()}
    for seed, p in procs.items():
        assert p.returncode == 0, (seed, outs[seed])
    assert time.time() - start < 90
    return {seed: d / f"s{seed}" for seed in procs}


def test_outputs_and_cleanup(sessions):
    for out in sessions.values():
        info = json.loads((out / "session.json").read_text())
        assert info["status"] == "ok" and info["failed_steps"] == []
        for f in ("capture.pcap", "labels.parquet", "flows.parquet", "unattributed.parquet"):
            assert (out / f).is_file(), f
        assert info["capture_s"] < 30 and info["tcpdump"]["dropped_by_kernel"] == 0
        assert _clean(info), _leftovers(info)
    run_ids = [json.loads((o / "session.json").read_text())["run_id"] for o in sessions.values()]
    assert len(set(run_ids)) == len(run_ids), run_ids


def test_every_family_present_and_every_flow_accounted(sessions):
    sc = load_scenario(SMOKE)
    for out in sessions.values():
        flows, un = pd.read_parquet(out / "flows.parquet"), pd.read_parquet(out / "unattributed.parquet")
        labels = pd.read_parquet(out / "labels.parquet")
        assert set(flows["family"]) == set(sc.families), flows["family"].value_counts()
        assert set(labels["family"]) == set(sc.families)
        assert (flows.groupby("family").size() >= 5).all(), flows["family"].value_counts()
        LAB.check_columns(flows.columns, labels=True, where=str(out))
        # every flow carries its first LAB_SEQUENCE packets: real packets first, then -1 padding
        x, mask = sequence_array(flows, replace(LAB, sequence=LAB_SEQUENCE), where=str(out))
        assert (mask.sum(axis=1) == flows["bidirectional_packets"].clip(upper=LAB_SEQUENCE)).all()
        assert (flows["is_attack"] == (flows["family"] != "benign")).all()
        # every metered flow is either labelled or reported with a reason
        metered = meter_capture(out / "capture.pcap")
        assert len(metered) == len(flows) + len(un)
        assert (un["reason"] != "").all()
        # labels agree with the record: each attack flow has an end among its step's addresses, inside its window
        steps = labels[labels.family != "benign"].groupby("step")
        for step, g in steps:
            rows = flows[flows.step == step]
            addrs = set(g.address)
            assert (rows.src_ip.isin(addrs) | rows.dst_ip.isin(addrs)).all(), step
            t = rows.bidirectional_first_seen_ms / 1000
            assert (t >= g.t_start.min() - 0.5).all() and (t <= g.t_end.max() + 2).all(), step
        benign = flows[flows.family == "benign"]
        assert not (benign.src_ip.isin(labels[labels.role.isin(["attacker", "c2"])].address)).any()


def test_sigterm_mid_run_removes_everything(cli, tmp_path):
    p = _record(cli, tmp_path / "t", 3)
    js = tmp_path / "t" / "session.json"
    pcap = tmp_path / "t" / "capture.pcap"
    end = time.time() + 30
    while time.time() < end and not (pcap.is_file() and pcap.stat().st_size > 24):  # the capture has packets
        time.sleep(0.1)
    time.sleep(3)  # services, clients and attack tools are running
    info = json.loads(js.read_text())
    assert len(lab_namespaces(info["run_id"])) >= 10
    assert len(_leftovers(info)["processes"]) >= 5
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "interrupted" in err
    assert _clean(info), _leftovers(info)
    assert json.loads(js.read_text())["status"] == "interrupted"


def test_crashing_step_is_recorded_and_labels_stay_correct(cli, tmp_path):
    out = tmp_path / "c"
    p = _record(cli, out, 4, "--inject-crash", "slowloris")
    _, err = p.communicate(timeout=180)
    assert p.returncode == 1, err
    assert "slowloris" in err and "failed" in err
    info = json.loads((out / "session.json").read_text())
    assert info["failed_steps"] == ["slowloris"] and _clean(info), _leftovers(info)
    step = next(s for s in info["steps"] if s["name"] == "slowloris")
    assert step["status"] == "failed" and "SIGKILL" in step["error"]
    assert step["t_end"] - step["t_start"] < 8  # killed part-way through its 10 s (about 2 s in; 8 leaves room for a loaded machine)
    flows = pd.read_parquet(out / "flows.parquet")
    mine = flows[flows.step == "slowloris"]
    assert len(mine) > 0 and (mine.family == "slowhttp").all()
    assert (mine.bidirectional_first_seen_ms / 1000 <= step["t_end"] + 2).all()
    assert set(flows.family) == set(load_scenario(SMOKE).families)  # the other steps ran on


def test_model_from_two_sessions_flags_the_families_of_a_third(sessions):
    """LightGBM on seeds 1 and 45's flows, scored on seed 2's: every attack family mostly flagged, benign mostly not.

    Each seed draws its own tool settings, so one session shows one shape per family. Trained on seed 1 alone, seed 2's
    slow-body flows were flagged at 89-97% in 17 of 19 recordings and at 8% in two (and in one CI run): seed 1 aims slow
    body at the server's "/", seed 2 at "/login.html", and the trees may key on the size of the server's answer (seeds 1
    and 3, both at "/": 11% once). So, as `params/default.yaml` does, the model trains on two sessions that between them
    aim at what the held-out one does: seed 45 sends slow bodies to "/login.html" too, every 2 s (seed 1 every 6 s, seed
    2 every 4 s). Seeds 1 and 45 gave 100% on every family in 6 of 6 recordings.
    """
    plans = {s: plan_session(load_scenario(SMOKE), s, Path("/x")) for s in (1, 2, 45)}
    slow = {s: [c.argv for st in p.steps if st.family == "slowhttp" for c in st.commands] for s, p in plans.items()}
    shape = {s: [(a[a.index("-u") + 1].rsplit("/", 1)[1], a[a.index("-i") + 1]) for a in argvs] for s, argvs in slow.items()}
    assert shape == {1: [("", "6")], 2: [("login.html", "4")], 45: [("login.html", "2")]}, shape
    train = pd.concat([pd.read_parquet(sessions[s] / "flows.parquet") for s in (1, 45)], ignore_index=True)
    test = pd.read_parquet(sessions[2] / "flows.parquet")
    feats = list(LAB.numeric + LAB.categorical + LAB.timing)
    model = lgb.LGBMClassifier(n_estimators=150, num_leaves=15, learning_rate=0.1, min_child_samples=5, verbose=-1, random_state=0)
    model.fit(train[feats].astype("float64"), train["is_attack"])
    flagged = model.predict(test[feats].astype("float64")) == 1
    rates = pd.Series(flagged).groupby(test["family"].to_numpy()).mean()
    print(rates.round(3).to_dict())
    for fam, rate in rates.drop("benign").items():
        assert rate >= 0.7, (fam, rate, rates.to_dict())
    assert rates["benign"] <= 0.1, rates.to_dict()
