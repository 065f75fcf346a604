"""End to end as a user runs it: `cyber-moe pipeline` on params/smoke.yaml (papermill), then the model it
registered, `cyber-moe score`, and a failing stage. One pipeline run is shared by the tests of this module."""

import json
import subprocess

import mlflow
import pandas as pd
import pytest

from cyber_moe.schema import get_schema


def run(cli, *args, cwd, timeout=1200):
    return subprocess.run([cli, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def smoke_flows(outputs):
    "The generated flows the smoke run trained on (the generator's cache), with their labels."
    (path,) = [p for p in (outputs / "data").glob("synth-*seed1-*.parquet") if ".truth." not in p.name]
    return pd.read_parquet(path)


@pytest.fixture(scope="module")
def smoke_run(cli, root, tmp_path_factory):
    out = tmp_path_factory.mktemp("outputs")
    r = run(cli, "pipeline", "--params", "params/smoke.yaml", "--quiet", "--set", f"outputs_dir={out}", cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def test_pipeline_leaves_notebooks_metrics_model_and_record(smoke_run):
    run_dir = smoke_run / "smoke"
    nbs = sorted(p.name for p in (run_dir / "notebooks").glob("*.ipynb"))
    assert nbs == ["00_setup.ipynb", "10_data.ipynb", "20_train.ipynb", "30_evaluate.ipynb", "40_explain.ipynb", "50_report.ipynb"]
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["status"] == "ok" and [s["status"] for s in rec["stages"]] == ["ok"] * 6
    report = (run_dir / "report.html").read_text()
    assert "Model vs baseline" in report and 'src="figures/shap_global.html"' in report
    runs = (smoke_run / "runs.csv").read_text().splitlines()
    assert runs[0].startswith("run_name,") and runs[1].startswith("smoke,")
    imp = json.loads((run_dir / "explain" / "importance.json").read_text())
    assert set(imp["p_attack"]["p_attack"]) == set(get_schema("nfstream").features)
    assert set(json.loads((run_dir / "explain" / "drift.json").read_text())["psi"]) == set(get_schema("nfstream").features)
    m = json.loads((run_dir / "metrics.json").read_text())
    for who in ("model", "baseline"):
        assert {"binary", "family", "calibration"} <= set(m[who])
        assert 0 <= m[who]["binary"]["f1"] <= 1 and 0 <= m[who]["family"]["macro_f1"] <= 1
        assert set(m[who]["family"]["per_class"]) == set(m["run"]["classes"])
    assert set(m["model"]["gate"]["overall"]) == {"tabular", "temporal"}
    # the test split is disjoint from train/val and its size is what was scored
    split = json.loads((run_dir / "prepared" / "split.json").read_text())
    assert m["model"]["binary"]["n"] == m["run"]["test_rows"] == split["rows"]["test"]
    assert split["n_cross_split_duplicate_rows"] == 0
    assert (run_dir / "figures" / "pr_roc.html").is_file() and (run_dir / "figures" / "confusion_model.html").is_file()


def test_model_folder_scores_raw_rows_through_mlflow_and_registry(smoke_run):
    run_dir = smoke_run / "smoke"
    flows = smoke_flows(smoke_run)
    raw = flows.drop(columns=["family", "is_attack"], errors="ignore").head(300)
    model = mlflow.pyfunc.load_model(str(run_dir / "model"))
    pred = model.predict(raw)
    assert len(pred) == 300 and list(pred.columns[:4]) == ["is_attack", "p_attack", "family", "p_family"]
    assert pred["p_attack"].between(0, 1).all() and set(pred["family"]) <= set(get_schema("nfstream").classes)
    from cyber_moe.bundle import use_mlflow_store

    with use_mlflow_store(f"sqlite:///{smoke_run / 'mlflow.db'}"):  # not left behind for the tests after this one
        reg = mlflow.pyfunc.load_model("models:/cyber-moe-synth/1").predict(raw)
    pd.testing.assert_series_equal(reg["p_attack"], pred["p_attack"])


def test_score_command_writes_one_row_per_input_in_order(cli, root, smoke_run, tmp_path):
    flows = smoke_flows(smoke_run).head(500)
    flows.to_csv(tmp_path / "flows.csv", index=False)

    def score(name: str, out: str):
        return run(
            cli,
            "score",
            "--model",
            str(smoke_run / "smoke" / "model"),
            "--input",
            str(tmp_path / name),
            "--output",
            str(tmp_path / out),
            cwd=root,
        )

    r = score("flows.csv", "preds.csv")
    assert r.returncode == 0, r.stderr
    preds = pd.read_csv(tmp_path / "preds.csv")
    assert len(preds) == 500
    assert list(preds.columns) == ["is_attack", "p_attack", "family", "p_family", "gate_tabular", "gate_temporal"]
    direct = mlflow.pyfunc.load_model(str(smoke_run / "smoke" / "model")).predict(flows.drop(columns=["family"]))
    assert (preds["family"].to_numpy() == direct["family"].to_numpy()).all()
    # a file of another schema is rejected with its missing columns named, and nothing is written
    flows.drop(columns=["bidirectional_packets", "protocol"]).to_csv(tmp_path / "wrong.csv", index=False)
    r = score("wrong.csv", "never.csv")
    assert r.returncode == 2 and "bidirectional_packets" in r.stderr and "protocol" in r.stderr
    assert not (tmp_path / "never.csv").exists()


def test_failing_stage_names_notebook_and_cell(cli, root, tmp_path):
    # a data source that cannot load: the data stage fails, later stages never run
    r = run(
        cli,
        "pipeline",
        "--params",
        "params/smoke.yaml",
        "--quiet",
        "--set",
        f"outputs_dir={tmp_path}",
        "--set",
        "data.source=unsw-nb15",
        "--set",
        "data.paths=[does/not/exist.csv]",
        cwd=root,
    )
    assert r.returncode == 1
    assert "10_data.ipynb" in r.stderr and "cell" in r.stderr
    assert not (tmp_path / "smoke" / "notebooks" / "20_train.ipynb").exists()
