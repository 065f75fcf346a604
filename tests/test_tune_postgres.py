"""Two worker processes on one Optuna study in a real, throw-away PostgreSQL cluster."""

import os
import socket

import optuna
import pytest
from mlflow import MlflowClient

from cyber_moe.testing import free_port, postgres_cluster  # noqa: F401  (free_port: test_tune_mlflow_server imports it from here)
from cyber_moe.tune import tune
from test_tune import SPACE, check_study, check_trial_runs, tiny_cfg


@pytest.fixture
def postgres_url():
    "A PostgreSQL 15 cluster in a temporary folder on 127.0.0.1 with an empty database; stopped and removed afterwards."
    try:
        with postgres_cluster("sweeps") as url:
            yield url
    except FileNotFoundError as e:
        pytest.fail(str(e))


def test_two_workers_share_one_postgres_study(tmp_path, postgres_url):
    cfg = tiny_cfg(tmp_path, name="pgsweep")
    n = 6
    res = tune(cfg, n_trials=n, workers=2, storage=postgres_url, space=SPACE, torch_threads=1, show_progress_bar=False)
    assert (res.n_trials, res.n_total) == (n, n)
    assert res.storage == postgres_url  # no password to hide here, the URL is kept as is
    assert not (tmp_path / "optuna.db").exists(), "the study went to sqlite instead of PostgreSQL"
    trials = check_study(optuna.load_study(study_name="pgsweep", storage=postgres_url), n)  # none lost, none twice
    pids = {t.user_attrs["pid"] for t in trials}
    assert len(pids) == 2 and os.getpid() not in pids, f"trials came from processes {pids}, expected the two workers"
    assert sorted(sum(t.user_attrs["pid"] == p for t in trials) for p in pids) == [3, 3]
    assert {t.user_attrs["host"] for t in trials} == {socket.gethostname()}
    check_trial_runs(MlflowClient(tracking_uri=cfg.mlflow_uri), res, trials)
    assert res.model_version == "1"
