"""One verdict per flow on every row of a real data set (UNSW-NB15 dev file): `family` is benign exactly when
`is_attack` is 0, `p_attack` = 1 - p(benign), and an attack's family is its most likely attack family, through the
bundle, the MLflow pyfunc, `cyber-moe score` (a real process) and the REST app."""

import subprocess
import time

import mlflow
import numpy as np
import pandas as pd
import pytest

from cyber_moe.bundle import ModelBundle, save_pyfunc
from cyber_moe.testing import untrained_bundle
from cyber_moe.config import ModelConfig
from cyber_moe.data import load_flows
from cyber_moe.schema import FAMILY, IS_ATTACK, get_schema

UNSW_FILE = "unsw-nb15/UNSW_NB15_training-set.dev80.csv"


@pytest.fixture(scope="module")
def unsw(shared_data) -> pd.DataFrame:
    df, _ = load_flows("unsw-nb15", [shared_data / UNSW_FILE])
    return df


@pytest.fixture(scope="module")
def bundle(unsw) -> ModelBundle:
    # a small network with tree-binned piecewise-linear embeddings; untrained weights are enough for the rule, and the
    # threshold at the median p_attack makes both verdicts frequent
    cfg = ModelConfig(
        experts={"tabm": {"k": 2, "d_block": 32, "d_embedding": 4}, "temporal": {"d_temporal": 8}},
        d_gate=8,
        d_head=16,
        numeric={"n_bins": 8},
    )
    b = untrained_bundle(unsw.sample(5000, random_state=0), schema=get_schema("unsw-nb15"), model_cfg=cfg, seed=3)
    b.threshold = float(np.median(b.predict(unsw.head(5000))["p_attack"]))
    return b


def check_rule(out: pd.DataFrame, classes: list[str], benign: str, threshold: float) -> None:
    "The verdict rule on every row of `out` (predict(..., class_probs=True) columns)."
    p = out[[f"p_{c}" for c in classes]].to_numpy()
    assert np.allclose(out["p_attack"], 1 - p[:, classes.index(benign)], atol=1e-6)
    assert ((out["family"] == benign) == (out["is_attack"] == 0)).all()
    assert ((out["p_attack"] >= threshold) == (out["is_attack"] == 1)).all()
    attack = [c for c in classes if c != benign]
    top = np.asarray(attack, dtype=object)[p[:, [classes.index(c) for c in attack]].argmax(1)]
    flagged = out["is_attack"].to_numpy() == 1
    assert (out["family"].to_numpy()[flagged] == top[flagged]).all()
    assert 0.2 < flagged.mean() < 0.8, flagged.mean()


def test_every_row_through_the_bundle_and_the_pyfunc(unsw, bundle, tmp_path):
    out = bundle.predict(unsw, class_probs=True)
    assert len(out) == len(unsw) == 65_866
    check_rule(out, bundle.classes, bundle.schema.benign, bundle.threshold)
    save_pyfunc(bundle, tmp_path / "model", example=unsw.head(5))
    via = mlflow.pyfunc.load_model(str(tmp_path / "model")).predict(
        unsw.drop(columns=[FAMILY, IS_ATTACK]), params={"class_probs": True, "runtime": "torch"}
    )
    check_rule(via, bundle.classes, bundle.schema.benign, bundle.threshold)
    assert (via["family"].to_numpy() == out["family"].to_numpy()).all()


def test_value_encodings_score_every_row_alike_in_the_bundle_and_the_pyfunc(unsw, tmp_path):
    "A model with value encodings: the saved pyfunc looks them up from raw rows exactly as the bundle does, on every row."
    cfg = ModelConfig(
        experts={"tabm": {"k": 2, "d_block": 32, "d_embedding": 4}}, d_head=16, numeric={"n_bins": 8, "target_encoding": True}
    )
    schema = get_schema("unsw-nb15")
    b = untrained_bundle(unsw.sample(5000, random_state=0), schema=schema, model_cfg=cfg, seed=3)
    assert b.preprocessor.encoded_columns == [c + "_attack_rate" for c in schema.numeric] and b.net.n_num == 2 * len(schema.numeric)
    b.threshold = float(np.median(b.predict(unsw.head(5000))["p_attack"]))
    out = b.predict(unsw, class_probs=True)
    check_rule(out, b.classes, schema.benign, b.threshold)
    save_pyfunc(b, tmp_path / "model", example=unsw.head(5))
    via = mlflow.pyfunc.load_model(str(tmp_path / "model")).predict(
        unsw.drop(columns=[FAMILY, IS_ATTACK]), params={"class_probs": True, "runtime": "torch"}
    )
    np.testing.assert_allclose(via["p_attack"].to_numpy(), out["p_attack"].to_numpy(), atol=1e-6)
    assert (via["family"].to_numpy() == out["family"].to_numpy()).all()


def test_every_row_through_the_cli(unsw, bundle, cli, shared_data, tmp_path):
    save_pyfunc(bundle, tmp_path / "model", example=unsw.head(5))
    r = subprocess.run(
        [
            cli,
            "score",
            "--model",
            str(tmp_path / "model"),
            "--input",
            str(shared_data / UNSW_FILE),
            "--output",
            str(tmp_path / "verdicts.csv"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got = pd.read_csv(tmp_path / "verdicts.csv")
    assert len(got) == len(unsw)
    assert ((got["family"] == "Normal") == (got["is_attack"] == 0)).all()
    assert ((got["p_attack"] >= bundle.threshold - 1e-9) == (got["is_attack"] == 1)).all()
    ref = bundle.predict(unsw)
    assert (got["family"].to_numpy() == ref["family"].to_numpy()).all()


def test_rest_follows_the_bundle(unsw, bundle, tmp_path):
    from fastapi.testclient import TestClient
    from cyber_moe.serve import create_app

    save_pyfunc(bundle, tmp_path / "model", example=unsw.head(5))
    rows = unsw.sample(1024, random_state=1)
    feats = list(bundle.schema.features)
    records = rows[feats].astype(object).where(rows[feats].notna(), None).to_dict("records")
    with TestClient(create_app(tmp_path / "model")) as client:
        for _ in range(600):  # the service loads the model in the background
            if client.get("/ready").status_code == 200:
                break
            time.sleep(0.5)
        got = []
        for s in range(0, len(records), 256):
            r = client.post("/predict_batch", json=records[s : s + 256])
            assert r.status_code == 200, r.text[:500]
            got += r.json()["predictions"]
    ref = bundle.predict(rows)
    assert [g["family"] for g in got] == ref["family"].tolist()
    assert [bool(g["is_attack"]) for g in got] == (ref["is_attack"] == 1).tolist()
    assert all((g["family"] == "Normal") == (not g["is_attack"]) for g in got)
