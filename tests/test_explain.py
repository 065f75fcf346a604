"""SHAP explanations of models trained on real UNSW-NB15 rows (../shared/data): additivity, agreement with
shap's exact explainer, a planted one-feature rule found first, columns outside the schema never explained,
one row per family and per expert."""

import numpy as np
import pandas as pd
import pytest
import torch

from cyber_moe.bundle import ModelBundle, load_bundle, save_bundle
from cyber_moe.data import load_flows
from cyber_moe.evaluate import choose_operating_point
from cyber_moe.explain import (
    _encode,
    _evaluate,
    attach_background,
    bundle_background,
    explain_flow,
    fig_flow_explanation,
    fig_global_importance,
    global_importance,
    make_background,
    shap_rows,
)
from cyber_moe.features import Preprocessor, split_flows
from cyber_moe.models import MoEClassifier
from cyber_moe.schema import FAMILY, IS_ATTACK, FlowSchema, get_schema

UNSW_FILE = "unsw-nb15/UNSW_NB15_training-set.dev80.csv"
NOT_FEATURES = {"id", "attack_cat", "label", "source_file", FAMILY, IS_ATTACK}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    "Tiny networks on a shared 2-core machine: one torch thread is several times faster than two."
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def unsw(shared_data) -> pd.DataFrame:
    "8,000 random rows of the real UNSW-NB15 training partition, as the loader returns them."
    df, _ = load_flows("unsw-nb15", [shared_data / UNSW_FILE])
    return df.sample(8000, random_state=0).reset_index(drop=True)


def train_bundle(
    frame: pd.DataFrame, schema: FlowSchema, *, steps: int, seed: int = 0, pre_kwargs: dict | None = None, **sizes
) -> tuple[ModelBundle, pd.DataFrame]:
    "Split `frame`, fit the preprocessing (`pre_kwargs`) and a small MoE (plain torch loop) on the training rows; the bundle and the test rows."
    split = split_flows(frame, schema=schema, seed=seed)
    train, val, test = split.frames(frame)
    pre = Preprocessor(schema=schema, **(pre_kwargs or {})).fit(train)
    kw = dict(
        n_num=len(pre.x_num_columns),
        cat_cardinalities=list(pre.cat_cardinalities),
        n_time=len(schema.timing),
        n_classes=len(pre.classes),
        **sizes,
    )
    torch.manual_seed(seed)
    net = MoEClassifier(**kw)
    t = {k: torch.from_numpy(v) for k, v in {**pre.transform(train, out_of_fold=True), **pre.encode_targets(train)}.items()}
    w = torch.from_numpy(1 / np.bincount(t["y_family"].numpy(), minlength=len(pre.classes)).clip(1)).float()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for _ in range(steps):
        i = torch.randint(0, len(t["x_num"]), (256,), generator=g)
        out = net(t["x_num"][i], t["x_cat"][i], t["x_time"][i])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            out["binary"], t["y_binary"][i].float()
        ) + torch.nn.functional.cross_entropy(out["family"], t["y_family"][i], weight=w / w.mean())
        opt.zero_grad()
        loss.backward()
        opt.step()
    b = ModelBundle(schema=schema, preprocessor=pre, net=net.eval(), net_kwargs=kw, name=f"test-{schema.name}")
    # is_attack at the validation operating point, as stage_train sets it (p_attack = 1 - p(benign))
    b.threshold = choose_operating_point(val[IS_ATTACK].to_numpy(), b.predict(val)["p_attack"].to_numpy())["threshold"]
    attach_background(b, make_background(train, schema=schema, n=100, seed=seed))
    return b, test


@pytest.fixture(scope="module")
def trained(unsw):
    "An MoE over the full UNSW-NB15 schema (42 raw features), trained for a few hundred steps."
    return train_bundle(unsw, get_schema("unsw-nb15"), steps=400, d_token=16, n_blocks=1, n_heads=2, d_temporal=16, d_gate=16, d_head=32)


# a reduced schema; `sttl`, the strongest real feature, is left out on purpose
PLANT = FlowSchema(
    name="unsw-planted",
    numeric=("spkts", "sbytes", "dbytes", "stcpb", "dtcpb", "smean"),
    categorical=("proto", "state"),
    timing=("dur", "sinpkt"),
    label="attack_cat",
    benign="Normal",
    classes=("Normal", "Exploits"),
)


def planted_frame(unsw: pd.DataFrame) -> pd.DataFrame:
    "Real UNSW-NB15 feature values with a planted label: attack iff the top bit of the source TCP base sequence number is set."
    df = unsw.copy()
    attack = df["stcpb"].to_numpy() >= 2**31
    df[FAMILY] = np.where(attack, "Exploits", "Normal")
    df[IS_ATTACK] = attack.astype("int8")
    df["attack_cat"], df["label"] = df[FAMILY], df[IS_ATTACK]
    return df


@pytest.fixture(scope="module")
def planted(unsw):
    "A small MoE trained on `planted_frame`."
    return train_bundle(planted_frame(unsw), PLANT, steps=500, d_token=8, n_blocks=1, n_heads=2, d_temporal=8, d_gate=8, d_head=16)


def test_trained_model_is_explained_additively(trained):
    b, test = trained
    p = b.predict(test)
    acc = (p["is_attack"].to_numpy() == test[IS_ATTACK].to_numpy()).mean()
    assert acc > 0.85, f"the test model did not learn (binary accuracy {acc:.3f}); the explanation checks below need a trained one"
    rows = test.iloc[:8]
    res = shap_rows(b, rows, n_background=20)
    assert res.values.shape == (8, 42, 1 + len(b.classes) + 2)
    np.testing.assert_allclose(res.base_values + res.values.sum(1), res.predictions, atol=1e-9)
    np.testing.assert_allclose(res.predictions[:, 0], p["p_attack"].to_numpy()[:8], atol=1e-6)
    assert set(res.features) == set(b.schema.features)


def test_explain_flow_on_real_rows(trained):
    b, test = trained
    for i in (0, 1, 2):
        row = test.iloc[i]  # carries id, attack_cat, label, family, is_attack, source_file: none is a feature
        e = explain_flow(b, row, top_k=None)
        feats = [c["feature"] for c in e["contributions"]]
        assert sorted(feats) == sorted(b.schema.features) and not NOT_FEATURES & set(feats)
        total = e["base_value"] + sum(c["contribution"] for c in e["contributions"]) + e["rest"]
        assert abs(total - e["value"]) < 1e-6
        assert abs(e["value"] - b.predict(test.iloc[[i]])["p_attack"].iloc[0]) < 1e-6
        assert e["seconds"] < 10, e["seconds"]
        top = explain_flow(b, row, top_k=5)
        assert [c["feature"] for c in top["contributions"]] == feats[:5]
        fig = fig_flow_explanation(top)
        assert fig.data[0].type == "waterfall" and len(fig.data[0].y) == 1 + 1 + 5 + 1
    # as the REST app sends it: a one-row frame of the raw columns, category values as text
    e = explain_flow(b, test.iloc[[0]].astype({"proto": str, "service": str, "state": str}), top_k=5)
    assert e["family"] in b.classes and set(e["gate"]) == {"tabular", "temporal"}


def test_global_importance_per_family_and_expert(trained):
    b, test = trained
    res = shap_rows(b, test.iloc[:40], n_background=15)
    fam, exp, overall = res.importance("family"), res.importance("expert"), res.importance()
    assert list(fam.index) == b.classes and fam.shape == (len(b.classes), 42)
    assert list(exp.index) == ["tabular", "temporal"]
    np.testing.assert_allclose(exp.loc["tabular"], exp.loc["temporal"], atol=1e-6)  # two gate weights sum to 1
    assert overall.shape == (1, 42) and (overall.to_numpy() >= 0).all() and overall.to_numpy().sum() > 0
    assert not NOT_FEATURES & set(overall.columns)
    fig = fig_global_importance(fam, top_k=10)
    assert fig.data[0].type == "heatmap" and len(fig.data[0].x) == 10 and list(fig.data[0].y) == b.classes


def test_planted_feature_ranks_first_and_hidden_columns_never_appear(planted):
    b, test = planted
    acc = (b.predict(test)["is_attack"].to_numpy() == test[IS_ATTACK].to_numpy()).mean()
    assert acc > 0.9, f"the planted rule was not learned (accuracy {acc:.3f})"
    imp = global_importance(b, test, n=80, n_background=20)
    assert imp.columns[0] == "stcpb", imp.round(4).to_string()
    by_family = global_importance(b, test, n=40, n_background=10, by="family")
    assert list(by_family.index) == ["Normal", "Exploits"] and (by_family.idxmax(axis=1) == "stcpb").all()
    tcp = test[test["stcpb"] > 0]
    firsts = [explain_flow(b, tcp.iloc[i], top_k=3)["contributions"][0]["feature"] for i in range(10)]
    assert firsts.count("stcpb") >= 8, firsts
    # `sttl` and the labels are in every row but not in this schema: they never appear
    e = explain_flow(b, tcp.iloc[0], top_k=None)
    assert {c["feature"] for c in e["contributions"]} == set(PLANT.features)


def test_value_encodings_go_with_their_columns(unsw):
    "With value encodings, x_num has a second column per numeric feature; each raw feature is still one player, additive."
    b, test = train_bundle(
        planted_frame(unsw),
        PLANT,
        steps=500,
        pre_kwargs={"target_encoding": {}},
        d_token=8,
        n_blocks=1,
        n_heads=2,
        d_temporal=8,
        d_gate=8,
        d_head=16,
    )
    assert b.preprocessor.encoded_columns == [c + "_attack_rate" for c in PLANT.numeric] and b.net.n_num == 12
    assert (b.predict(test)["is_attack"].to_numpy() == test[IS_ATTACK].to_numpy()).mean() > 0.9
    res = shap_rows(b, test.iloc[:6], n_background=20)
    assert res.features == list(PLANT.features) and res.values.shape[1] == 10
    np.testing.assert_allclose(res.base_values + res.values.sum(1), res.predictions, atol=1e-9)
    assert global_importance(b, test, n=60, n_background=15).columns[0] == "stcpb"


def test_matches_shap_exact_explainer(planted):
    "On 10 features shap's Exact explainer enumerates all 1,024 coalitions: many antithetic passes converge to it."
    shap = pytest.importorskip("shap")
    b, test = planted
    bg = bundle_background(b).iloc[:8]
    zb = _encode(b, bg, "background")
    exact = shap.explainers.Exact(lambda z: _evaluate(b, z)[:, 0], shap.maskers.Independent(zb, max_samples=len(zb)))
    rows = test.iloc[:3]
    want = exact(_encode(b, rows, "rows"), silent=True).values
    got = shap_rows(b, rows, background=bg, n_permutations=40).values[:, :, 0]
    np.testing.assert_allclose(got, want, atol=0.01)


def test_background_survives_save_and_load(trained, tmp_path):
    b, _ = trained
    bg = bundle_background(b)
    assert len(bg) == 100 and list(bg.columns) == list(b.schema.features)
    again = load_bundle(save_bundle(b, tmp_path / "bundle"))
    pd.testing.assert_frame_equal(bundle_background(again), bg)
    row = bg.iloc[[5]]
    assert explain_flow(again, row)["value"] == pytest.approx(explain_flow(b, row)["value"], abs=1e-9)
