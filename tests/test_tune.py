"""Sweeps on the default sqlite storage: nested MLflow runs per trial, the best registered, and a resumed study."""

import json
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from cyber_moe.config import RunConfig
from cyber_moe.train import EXPERIMENT, registered_name
from cyber_moe.tune import MONITOR, default_storage, tune

SPACE = {
    "model.d_token": {"choices": [8, 16]},
    "train.lr": {"low": 1e-3, "high": 1e-2, "log": True},
    "model.gate_top_k": {"choices": [None, 1]},
}


def tiny_cfg(outputs: Path, name: str = "sweep", **extra) -> RunConfig:
    "A sweep config over 2000 generated flows (one day), one epoch per trial, tiny experts."
    return RunConfig(
        run_name=name,
        seed=0,
        outputs_dir=str(outputs),
        log_level="WARNING",
        data={"source": "synth", "synth_seed": 1, "synth_days": 1, "synth_n_flows": 2000},
        model={"d_token": 16, "n_blocks": 1, "d_temporal": 16, "n_temporal_layers": 1, "d_gate": 16, "d_head": 32},
        train={"max_epochs": 1, "batch_size": 256},
        baseline={"n_estimators": 10},
        **extra,
    )


def sweep_runs(client: MlflowClient, parent_run_id: str) -> dict[str, list]:
    "The nested runs of a sweep's parent, by role ('trial', 'best')."
    exp = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=1000)
    out: dict[str, list] = {}
    for r in runs:
        out.setdefault(r.data.tags.get("cyber_moe.role"), []).append(r)
    return out


def check_study(study, n: int) -> list:
    "Trial numbers 0..n-1 exactly once, each COMPLETE or PRUNED; returns the trials."
    trials = study.get_trials(deepcopy=False)
    assert sorted(t.number for t in trials) == list(range(n)), [t.number for t in trials]
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials), [(t.number, t.state.name) for t in trials]
    return trials


def check_trial_runs(client: MlflowClient, res, trials, space=SPACE) -> None:
    "Every trial is a nested run of the sweep's parent with its parameters, its validation metric and its state."
    runs = sweep_runs(client, res.parent_run_id)
    by_trial = {int(r.data.tags["optuna.trial"]): r for r in runs["trial"]}
    assert sorted(by_trial) == sorted(t.number for t in trials)
    for t in trials:
        r = by_trial[t.number]
        assert r.info.run_id == t.user_attrs["mlflow_run_id"]
        assert {k: r.data.params[k] for k in space} == {k: str(t.params[k]) for k in space}
        assert MONITOR in r.data.metrics, r.data.metrics
        assert r.data.tags["optuna.state"] == t.state.name
        if t.state.name == "COMPLETE":
            assert r.data.metrics[f"{MONITOR}_best"] == pytest.approx(t.value)
        assert not [k for k in r.data.metrics if k.startswith("test")], "a trial run holds test metrics"
    assert [r.info.run_id for r in runs["best"] if r.info.run_id == res.best_run_id]
    assert client.get_run(res.parent_run_id).data.metrics["sweep/n_complete"] == sum(t.state.name == "COMPLETE" for t in trials)


def test_sqlite_sweep_registers_best_and_resumes(tmp_path):
    cfg = tiny_cfg(tmp_path)
    client = MlflowClient(tracking_uri=cfg.mlflow_uri)
    first = tune(cfg, n_trials=3, space=SPACE, torch_threads=1, show_progress_bar=False)
    assert (first.n_trials, first.n_total) == (3, 3)
    assert Path(default_storage(cfg)[len("sqlite:///") :]) == tmp_path / "optuna.db"
    study = optuna.load_study(study_name="sweep", storage=default_storage(cfg))
    trials = check_study(study, 3)
    check_trial_runs(client, first, trials)
    assert first.best_value == max(t.value for t in trials if t.value is not None)
    best = client.get_run(first.best_run_id)
    assert best.data.tags["optuna.trial"] == str(first.best_number)
    # same seed, same threads: the retrained model is the best trial's model again
    assert best.data.metrics["best_val_score"] == pytest.approx(first.best_value, abs=1e-6), (best.data.metrics, first.best_value)
    assert best.data.metrics["test.model.family.macro_f1"] >= 0  # test scored for the best run only
    assert json.loads((tmp_path / "sweep" / "metrics.json").read_text())["run"]["test_rows"] > 0
    v1 = client.search_model_versions(f"name = '{registered_name(cfg)}'")
    assert [(str(v.version), v.run_id) for v in v1] == [("1", first.best_run_id)]
    assert first.model_version == "1"

    # the same study name continues the study, under the same parent run (many processes: test_tune_postgres.py)
    again = tune(cfg, n_trials=2, space=SPACE, torch_threads=1, show_progress_bar=False)
    assert (again.n_trials, again.n_total, again.parent_run_id) == (2, 5, first.parent_run_id)
    trials = check_study(optuna.load_study(study_name="sweep", storage=default_storage(cfg)), 5)
    check_trial_runs(client, again, trials)
    assert again.best_value == max(t.value for t in trials if t.value is not None)
    assert sorted(str(v.version) for v in client.search_model_versions(f"name = '{registered_name(cfg)}'")) == ["1", "2"]
    assert json.loads((tmp_path / "sweep" / "tune.json").read_text())["n_total"] == 5
    assert client.get_run(first.parent_run_id).info.status == "FINISHED"
    assert client.get_experiment_by_name(EXPERIMENT).artifact_location.startswith("file://")
