"""The generated data set (cyber_moe.synth) end to end: real pcaps, real NFStream runs, a real LightGBM baseline."""

from pathlib import Path

import lightgbm as lgb
import nfstream
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score
from sklearn.model_selection import train_test_split

from cyber_moe.nfstream import NFSTREAM, pcap_to_flows
from cyber_moe.schema import FAMILY, IS_ATTACK
from cyber_moe.synth import ATTACK_SHARES, FAMILIES, generate, load_or_generate

SMALL = dict(n_days=2, n_flows_target=4000)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    "Seed 1 generated twice in separate folders, and seed 2 once."
    d = tmp_path_factory.mktemp("synth")
    a = generate(seed=1, out_dir=d / "a", **SMALL)
    b = generate(seed=1, out_dir=d / "b", **SMALL)
    c = generate(seed=2, out_dir=d / "c", **SMALL)
    return a, b, c


def test_same_seed_same_flows_other_seed_differs(small):
    (fa, ia), (fb, ib), (fc, _) = small
    pd.testing.assert_frame_equal(fa, fb)
    assert Path(ia["pcap"]).read_bytes() == Path(ib["pcap"]).read_bytes()
    assert len(fa) != len(fc) or not fa.drop(columns="id").equals(fc.drop(columns="id"))
    assert not np.array_equal(fa["bidirectional_bytes"].to_numpy()[:500], fc["bidirectional_bytes"].to_numpy()[:500])


def test_flows_are_nfstreams(small):
    "The frame is what NFStream makes of the pcap left on disk: its columns, its values, re-read identically."
    flows, info = small[0]
    pcap = Path(info["pcap"])
    assert pcap.is_file() and pcap.stat().st_size > 1_000_000
    assert nfstream.__version__ == "6.6.0"
    first = list(nfstream.NFStreamer(source=str(pcap), statistical_analysis=True, accounting_mode=1, max_nflows=1))
    assert len(first) == 1 and set(first[0].keys()) <= set(flows.columns)
    again = pcap_to_flows(pcap)
    pd.testing.assert_frame_equal(flows.drop(columns=[FAMILY, IS_ATTACK]), again)
    assert int(flows["bidirectional_packets"].sum()) == info["n_packets"]


def test_every_family_present_with_its_share(small):
    flows, info = small[0]
    counts = flows[FAMILY].value_counts()
    assert set(counts.index) == set(FAMILIES)
    for fam, share in ATTACK_SHARES.items():
        assert counts[fam] >= 0.8 * share * SMALL["n_flows_target"], (fam, counts[fam])
    assert 0.55 <= counts["benign"] / len(flows) <= 0.68
    assert info["families"] == counts.to_dict()


def test_labels_consistent(small):
    flows, info = small[0]
    assert flows[IS_ATTACK].dtype == np.int8
    assert (flows[IS_ATTACK] == (flows[FAMILY] != "benign")).all()
    NFSTREAM.check_columns(flows.columns, labels=True, where="generated flows")
    # attackers live outside, bots and benign clients inside: a label never contradicts where a flow came from
    outside_attack = flows[FAMILY].isin(["dos", "portscan", "bruteforce", "slowhttp"])
    assert flows.loc[outside_attack, "src_ip"].str.startswith("192.0.2.").all()
    assert flows.loc[flows[FAMILY] == "ddos", "src_ip"].str.startswith("100.").all()
    assert flows.loc[flows[FAMILY] == "bot", "dst_ip"].str.startswith("203.0.113.2").all()
    benign_src = flows.loc[flows[FAMILY] == "benign", "src_ip"]
    assert not benign_src.str.startswith(("192.0.2.", "100.")).any()
    # every simulated connection was metered into at least one flow
    truth = pd.read_parquet(info["truth"])
    assert len(flows) >= len(truth) and len(flows) - len(truth) < 0.02 * len(truth)


def test_cache_reused(small, tmp_path):
    flows, info = load_or_generate(seed=3, n_days=1, n_flows_target=1500, out_dir=tmp_path)
    assert info["cached"] is False and Path(info["parquet"]).is_file()
    again, info2 = load_or_generate(seed=3, n_days=1, n_flows_target=1500, out_dir=tmp_path)
    assert info2["cached"] is True and info2["timing"] == info["timing"]
    pd.testing.assert_frame_equal(flows, again)


def test_lightgbm_baseline_is_good_but_not_perfect(tmp_path):
    "A quick LightGBM on the raw features: learns the families well, yet stays below macro-F1 0.99 (overlaps)."
    flows, _ = generate(seed=11, n_days=3, n_flows_target=15000, out_dir=tmp_path)
    x = flows[list(NFSTREAM.features)].astype("float64")
    y = flows[FAMILY]
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    model = lgb.LGBMClassifier(n_estimators=200, num_leaves=31, learning_rate=0.1, n_jobs=2, verbose=-1, random_state=0)
    f1 = f1_score(y_te, model.fit(x_tr, y_tr).predict(x_te), average="macro")
    print(f"LightGBM family macro-F1 on held-out 30%: {f1:.4f}")
    assert 0.85 < f1 < 0.99
