"""`cyber-moe retrain --from-feedback` end to end, as a user runs it: a tiny trained and registered model, an SQLite
feedback store with analysts' verdicts, the console script in a subprocess, the MLflow registry's aliases afterwards."""

import json
import os
import subprocess

import numpy as np
import pytest

TINY = [
    "--set",
    "train.max_epochs=1",
    "--set",
    "model.experts={tabm: {k: 2, n_blocks: 1, d_block: 32}}",
    "--set",
    "model.d_head=16",
    "--set",
    "model.d_gate=8",
    "--set",
    "baseline.n_estimators=5",
]


def run(cli, *args, cwd, env):
    return subprocess.run([cli, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def trained(cli, root, tmp_path_factory):
    "A smoke run trained and registered (cyber-moe-synth v1, alias champion) in a temporary outputs folder."
    from mlflow import MlflowClient

    outs = tmp_path_factory.mktemp("retrain") / "outs"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{outs / 'mlflow.db'}"}
    r = run(cli, "train", "--params", "params/smoke.yaml", "--quiet", "--set", f"outputs_dir={outs}", *TINY, cwd=root, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
    client.set_registered_model_alias("cyber-moe-synth", "champion", "1")
    return outs, env, client


def make_store(outs, url, *, verdicts: bool = True):
    "Alerts of the run's test rows (the 120 the model scores most likely attacks) with verdicts from the ground truth."
    from cyber_moe.bundle import load_model_bundle
    from cyber_moe.feedback import FeedbackStore
    from cyber_moe.retrain import run_rows

    bundle = load_model_bundle(outs / "smoke" / "model")
    _, rows = run_rows(outs / "smoke")
    test = rows["test"]
    pred = bundle.predict(test)
    top = np.argsort(-pred["p_attack"].to_numpy())[:120]
    recs = [
        {
            "id": f"a{i}",
            "p_attack": float(pred["p_attack"].iloc[i]),
            "family": str(pred["family"].iloc[i]),
            "features": {
                c: test[c].iloc[i].item() if hasattr(test[c].iloc[i], "item") else test[c].iloc[i] for c in bundle.schema.features
            },
        }
        for i in top
    ]
    store = FeedbackStore(url)
    store.add_bundle_alerts(recs, bundle)
    if verdicts:
        for i in top:
            truth = str(test["family"].iloc[i])
            if truth == bundle.schema.benign:
                store.record_verdict(f"a{i}", "fp", analyst="test")
            else:
                store.record_verdict(f"a{i}", "tp", family=truth, analyst="test")
    store.close()
    return test.iloc[top]


def test_retrain_from_feedback_registers_a_challenger(cli, root, trained, tmp_path, monkeypatch):
    outs, env, client = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])  # models:/ in this process resolve there too
    url = f"sqlite:///{tmp_path / 'feedback.db'}"
    make_store(outs, url)
    r = run(
        cli,
        "retrain",
        "--from-feedback",
        "--store",
        url,
        "--model",
        "models:/cyber-moe-synth@champion",
        "--outputs",
        str(outs),
        "--out",
        str(tmp_path / "report"),
        "--epochs",
        "1",
        cwd=root,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "report" / "report.json").read_text())
    assert (tmp_path / "report" / "report.md").read_text().startswith("# Retrain from feedback: cyber-moe-synth")
    assert "**Decision:" in r.stdout and "held-out feedback: agreement" in r.stdout
    parts = rep["confirmed"]["parts"]
    assert rep["confirmed"]["n"] == 120 and parts["fit"] + parts["val"] + parts["holdout"] == 120
    for who in ("champion", "champion_reoperated", "candidate"):
        assert rep[who]["feedback"]["n"] == parts["holdout"] and 0 <= rep[who]["feedback"]["agreement"] <= 1
        assert rep[who]["test"]["n"] == rep["original_rows"]["test"] and set(rep[who]["test"]["detection"])
    assert rep["fine_tune"]["epochs"] == 1 and rep["fine_tune"]["train_rows"] > rep["original_rows"]["train"]
    reg = rep["registered"]
    assert reg["version"] == "2" and str(client.get_model_version_by_alias("cyber-moe-synth", "challenger").version) == "2"
    champion = str(client.get_model_version_by_alias("cyber-moe-synth", "champion").version)
    assert champion == ("2" if rep["decision"]["promote"] else "1"), rep["decision"]
    # the challenger loads and scores like any registered model
    from cyber_moe.bundle import load_model_bundle

    b = load_model_bundle("models:/cyber-moe-synth@challenger", tracking_uri=env["MLFLOW_TRACKING_URI"])
    assert b.extra["retrained_from"]["version"] and b.extra["feedback"]["confirmed"] == 120


def test_retrain_errors_are_one_line(trained, tmp_path, capsys, monkeypatch):
    "No verdicts, no database, an unreachable server, an unknown model: exit 2 and one line naming it (in-process: no start-up per case)."
    from cyber_moe.bundle import use_mlflow_store
    from cyber_moe.cli import main

    outs, env, _ = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    # in-process: a store an earlier test left in MLflow's module state would win over the variable; pin it as a fresh process has it
    with use_mlflow_store(env["MLFLOW_TRACKING_URI"]):
        empty = f"sqlite:///{tmp_path / 'empty.db'}"
        make_store(outs, empty, verdicts=False)
        cases = [
            (["--store", empty], "no confirmed verdicts"),
            (["--store", f"sqlite:///{tmp_path / 'absent.db'}"], "no database file"),
            (["--store", "postgresql+psycopg://nobody@127.0.0.1:9/feedback"], "cannot be read"),
            (["--store", empty, "--model", "models:/no-such-model@champion"], "no-such-model"),
        ]
        for args, msg in cases:
            capsys.readouterr()
            rc = main(["retrain", "--from-feedback", "--outputs", str(outs), "--model", "models:/cyber-moe-synth@champion", *args])
            err = capsys.readouterr().err
            assert rc == 2 and msg in err and "Traceback" not in err, (args, err[-1500:])
            assert err.strip().splitlines()[-1].startswith("cyber-moe retrain: error:"), err[-800:]
