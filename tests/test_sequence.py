"""A model with the packet-sequence expert on every scoring path (issue 14): a pcap metered with the bundle's splt and
scored (`score_pcap`, `watch`, `cyber-moe score`), and the REST app taking each flow's first packets as JSON arrays,
refusing bad sequences with 422s that name the field, and flows without sequences with a message saying what is missing."""

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient

from cyber_moe.alerts import score_pcap, watch
from cyber_moe.bundle import load_model_bundle, save_bundle
from cyber_moe.config import ModelConfig
from cyber_moe.nfstream import NFSTREAM, pcap_to_flows
from cyber_moe.schema import FAMILY, IS_ATTACK, SchemaError
from cyber_moe.serve.app import create_app
from cyber_moe.serve.settings import ServeSettings
from cyber_moe.synth import load_or_generate
from cyber_moe.testing import untrained_bundle

N = 8
SEQ_MODEL = ModelConfig(
    experts={"tabm": {"k": 2, "d_block": 32, "embedding": "none"}, "sequence": {"d_seq": 16, "n_seq_layers": 2, "n_packets": N}},
    d_gate=16,
    d_head=32,
)


@pytest.fixture(scope="module")
def capture(tmp_path_factory):
    "A small generated capture and its flows metered with N packets each (families drawn at random: the model is untrained)."
    d = tmp_path_factory.mktemp("seqcap") / "data"  # outputs_dir/data: the cache load_source reads too
    _, info = load_or_generate(seed=3, n_days=1, n_flows_target=1500, out_dir=d)
    flows = pcap_to_flows(info["pcap"], splt=N)
    rng = np.random.default_rng(0)
    flows[FAMILY] = rng.choice(NFSTREAM.classes, len(flows))
    flows[IS_ATTACK] = (flows[FAMILY] != "benign").astype("int8")
    return info["pcap"], flows


@pytest.fixture(scope="module")
def bundle_dir(capture, tmp_path_factory):
    _, flows = capture
    b = untrained_bundle(flows, schema=dataclasses.replace(NFSTREAM, sequence=N), model_cfg=SEQ_MODEL, name="seq", version="1")
    b.threshold = float(np.median(b.predict(flows)["p_attack"]))  # about half the flows flagged: alerts to compare
    return save_bundle(b, tmp_path_factory.mktemp("seqbundle") / "model")


def test_score_pcap_and_watch_meter_the_sequence(capture, bundle_dir):
    "score_pcap meters the capture with the bundle's splt: every flow scored, verdicts equal the bundle on pcap_to_flows(splt=N)."
    pcap, flows = capture
    bundle = load_model_bundle(bundle_dir)
    test = score_pcap(bundle, pcap)
    assert len(test) == len(flows) and "gate_sequence" in test.columns
    ref = bundle.predict(flows)
    np.testing.assert_allclose(test["p_attack"].to_numpy(), ref["p_attack"].to_numpy(), atol=1e-5)
    got = []
    stats = watch(pcap, bundle, on_alert=got.append, alert_format="eve", batch_size=300)
    assert stats["n_flows"] == len(flows) and len(got) == int(test["is_attack"].sum()) > 0


def test_cli_score_on_a_pcap(capture, bundle_dir, tmp_path):
    "`cyber-moe score --input capture.pcap` with a sequence model writes one verdict per flow."
    from cyber_moe.cli import main

    pcap, flows = capture
    out = tmp_path / "verdicts.csv"
    main(["score", "--model", str(bundle_dir), "--input", str(pcap), "--output", str(out)])
    assert len(pd.read_csv(out)) == len(flows)


def test_flows_without_sequences_say_what_is_missing(capture, bundle_dir):
    _, flows = capture
    bundle = load_model_bundle(bundle_dir)
    with pytest.raises(SchemaError, match=f"first {N} packets"):
        bundle.predict(flows.drop(columns=[c for c in flows.columns if c.startswith("splt_")]))


def _flow_json(flows: pd.DataFrame, i: int) -> dict:
    "Row i as a client sends it: the features, and the first packets as three lists (padding dropped)."
    row = flows.iloc[i]
    out = {f: (row[f].item() if hasattr(row[f], "item") else row[f]) for f in NFSTREAM.features}
    k = int((row[[f"splt_dir_{j}" for j in range(N)]] != -1).sum())
    out["splt_direction"] = [int(row[f"splt_dir_{j}"]) for j in range(k)]
    out["splt_ps"] = [float(row[f"splt_ps_{j}"]) for j in range(k)]
    out["splt_piat_ms"] = [float(row[f"splt_piat_{j}"]) for j in range(k)]
    return out


@pytest.fixture(scope="module")
def client(bundle_dir):
    with TestClient(create_app(str(bundle_dir), ServeSettings(runtime="torch"))) as c:
        t = time.time()
        while c.get("/ready").status_code != 200:
            assert time.time() - t < 60, c.get("/ready").json()
            time.sleep(0.1)
        yield c


def test_rest_takes_sequences_as_arrays(client, capture, bundle_dir):
    _, flows = capture
    bundle = load_model_bundle(bundle_dir)
    rows = [0, 1, 2, int(np.argmax((flows["splt_dir_1"] == -1).to_numpy()))]  # one of them a single-packet flow
    ref = bundle.predict(flows.iloc[rows])
    for j, i in enumerate(rows):
        r = client.post("/predict", json=_flow_json(flows, i))
        assert r.status_code == 200, r.text
        assert set(r.json()["gate"]) == {"tabm", "sequence"}
        assert math.isclose(r.json()["p_attack"], ref["p_attack"].iloc[j], abs_tol=1e-5)
    r = client.post("/predict_batch", json=[_flow_json(flows, i) for i in rows])
    assert r.status_code == 200, r.text
    np.testing.assert_allclose([p["p_attack"] for p in r.json()["predictions"]], ref["p_attack"].to_numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "field,value,says",
    [
        ("splt_ps", [60.0] * (N + 1), f"1 to {N} packet sizes"),  # longer than the model's N packets
        ("splt_ps", [-1.0], "finite number >= 0"),
        ("splt_piat_ms", [float("nan")], "finite number >= 0"),
        ("splt_piat_ms", [float("inf")], "finite number >= 0"),
        ("splt_direction", [2], "each 0"),
        ("splt_direction", [], "1 to"),
        ("splt_ps", "60", "packet sizes"),
    ],
)
def test_rest_refuses_bad_sequences_naming_the_field(client, capture, field, value, says):
    _, flows = capture
    flow = {**_flow_json(flows, 0), "splt_direction": [0], "splt_ps": [60.0], "splt_piat_ms": [0.0]}
    flow[field] = value
    if field == "splt_ps" and isinstance(value, list) and len(value) > 1:
        flow["splt_direction"] = [0] * len(value)
        flow["splt_piat_ms"] = [0.0] * len(value)
    import json

    r = client.post("/predict", content=json.dumps(flow, allow_nan=True), headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    body = r.json()
    assert field in body["detail"] and says in body["detail"], body["detail"]
    assert any(e["loc"][-1] == field for e in body["errors"]), body["errors"]


def test_rest_refuses_unequal_lists_and_missing_sequences(client, capture):
    _, flows = capture
    flow = {**_flow_json(flows, 0), "splt_direction": [0, 1], "splt_ps": [60.0], "splt_piat_ms": [0.0, 1.0]}
    r = client.post("/predict", json=flow)
    assert r.status_code == 422 and "splt_ps" in r.json()["detail"] and "as many packets" in r.json()["detail"], r.text
    bare = {k: v for k, v in _flow_json(flows, 0).items() if not k.startswith("splt_")}
    r = client.post("/predict", json=bare)
    assert r.status_code == 422, r.text
    d = r.json()["detail"]
    assert "missing feature(s): splt_direction, splt_ps, splt_piat_ms" in d and f"first 1..{N} packets" in d, d
    r = client.post("/predict_batch", json=[_flow_json(flows, 0), {**_flow_json(flows, 1), "splt_direction": [3]}])
    assert r.status_code == 422 and "splt_direction" in r.json()["detail"] and "row(s) 1" in r.json()["detail"], r.text


def test_pyfunc_and_onnx_score_sequences(capture, bundle_dir, tmp_path):
    "The MLflow pyfunc of a sequence model takes raw flows with their splt_* columns (the signature lists them); ONNX gives the same numbers."
    import mlflow
    from cyber_moe.bundle import save_pyfunc

    _, flows = capture
    bundle = load_model_bundle(bundle_dir)
    save_pyfunc(bundle, tmp_path / "pyfunc", example=flows.head(5))
    model = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc"))
    got = model.predict(flows.head(300))  # ONNX Runtime by default: the bundle carries its checked graph
    ref = bundle.predict(flows.head(300))
    np.testing.assert_allclose(
        model.predict(flows.head(300), params={"runtime": "torch"})["p_attack"].to_numpy(), ref["p_attack"].to_numpy(), atol=1e-6
    )
    bundle.use_onnx(threads=1)
    onnx = bundle.predict(flows.head(300))
    np.testing.assert_allclose(onnx["p_attack"].to_numpy(), ref["p_attack"].to_numpy(), atol=1e-4)
    np.testing.assert_allclose(got["p_attack"].to_numpy(), onnx["p_attack"].to_numpy(), atol=1e-6)
    bad = flows.head(300).assign(splt_ps_3=-5.0)  # the pyfunc refuses a bad sequence, naming the column
    with pytest.raises(SchemaError, match="splt_ps_3"):
        model.predict(bad)


def test_simulator_gives_sequences_to_a_sequence_model(capture):
    "The simulator (the lab's fallback without root) meters its capture again with 32 packets when the model reads sequences."
    from cyber_moe.config import RunConfig
    from cyber_moe.train import load_source

    pcap, flows = capture
    cfg = RunConfig(
        run_name="s",
        outputs_dir=str(Path(pcap).parent.parent),
        model=SEQ_MODEL.model_dump(),
        data={"source": "synth", "synth_seed": 3, "synth_days": 1, "synth_n_flows": 1500},
    )
    df, schema, _ = load_source(cfg)
    assert schema.sequence == 32 and "splt_piat_31" in df.columns and len(df) == len(flows)
    plain, s0, _ = load_source(cfg.model_copy(update={"model": ModelConfig()}))
    assert s0.sequence == 0 and "splt_dir_0" not in plain.columns
    assert (df["family"].to_numpy() == plain["family"].to_numpy()).all()


def test_dashboard_shows_the_sequence_strip(tmp_path):
    "The dashboard names a sequence model's temporal expert where it shows the model, and draws the packet strip under a flow's waterfall."
    import torch
    from cyber_moe.baseline import Baseline
    from cyber_moe.bundle import ModelBundle
    from cyber_moe.config import RunConfig, save_config
    from cyber_moe.dashboard import Dashboard
    from cyber_moe.evaluate import write_metrics
    from cyber_moe.explain import attach_background, make_background
    from cyber_moe.models import MoEClassifier
    from cyber_moe.train import evaluate_run, fit_run_baseline, network_kwargs, prepare, save_prepared

    outputs = tmp_path / "outputs"
    cfg = RunConfig.model_validate(
        {
            "run_name": "seqdash",
            "outputs_dir": str(outputs),
            "seed": 0,
            "data": {"source": "synth", "synth_seed": 3, "synth_days": 1, "synth_n_flows": 1000},
            "model": SEQ_MODEL.model_copy(
                update={"experts": {**SEQ_MODEL.experts, "sequence": {**SEQ_MODEL.experts["sequence"], "n_packets": 32}}}
            ).model_dump(),
            "baseline": {"n_estimators": 5, "num_leaves": 7},
        }
    )
    prep = prepare(cfg)
    assert prep.schema.sequence == 32
    save_prepared(prep, cfg.run_dir)
    save_config(cfg, cfg.run_dir / "config.yaml")
    torch.manual_seed(0)
    kw = network_kwargs(cfg, prep.preprocessor)
    b = ModelBundle(schema=prep.schema, preprocessor=prep.preprocessor, net=MoEClassifier(**kw), net_kwargs=kw, name="seqdash", version="1")
    save_bundle(attach_background(b, make_background(prep.rows("train"), schema=prep.schema, n=10, seed=0)), cfg.run_dir / "model")
    fit_run_baseline(cfg, prep).save(cfg.run_dir / "baseline")
    metrics, _ = evaluate_run(prep, b, Baseline.load(cfg.run_dir / "baseline"))
    metrics["run"] = {"run_name": "seqdash", "source": "synth", "test_rows": len(prep.split.test), "classes": prep.classes}
    write_metrics(cfg.run_dir / "metrics.json", metrics)
    dash = Dashboard(outputs_dir=outputs, run="seqdash", n_shap=4, background=False)
    assert "cm-error" not in dash.status.value, dash.status.value
    assert "Temporal expert: <b>sequence" in dash.status.value, dash.status.value
    figs = [o["data"]["application/vnd.plotly.v1+json"]["data"][0] for o in dash.shap_out.outputs]
    assert [f["type"] for f in figs] == ["waterfall", "heatmap"], [f["type"] for f in figs]
    strip = figs[1]
    assert strip["y"] == ["inter-arrival time", "size", "direction"] and len(strip["x"]) == 32
    z = strip["z"]
    if isinstance(z, dict):  # plotly's JSON carries numpy arrays as base64 ("bdata")
        import base64

        z = np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"])
    assert np.asarray(z, dtype=float).size == 3 * 32 and np.abs(np.asarray(z, dtype=float)).sum() > 0
