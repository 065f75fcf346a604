"""A sweep logging to a real `mlflow server` (tracking, registry and proxied artifacts over HTTP)."""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from cyber_moe.train import EXPERIMENT, registered_name
from cyber_moe.tune import default_storage, tune
from test_tune import SPACE, check_study, check_trial_runs, tiny_cfg
from test_tune_postgres import free_port


@pytest.fixture
def mlflow_server(tmp_path):
    "An `mlflow server` on 127.0.0.1 (sqlite backend, artifacts served from a temporary folder); stopped afterwards."
    port, log = free_port(), tmp_path / "server.log"
    store, artifacts = tmp_path / "server" / "mlflow.db", tmp_path / "server" / "artifacts"
    artifacts.mkdir(parents=True)
    cmd = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{store}",
        "--serve-artifacts",
        "--artifacts-destination",
        str(artifacts),
        "--workers",
        "1",
    ]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not come up on {url} (exit code {proc.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url, artifacts
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group: it and its workers
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def test_sweep_logs_to_mlflow_server(tmp_path, mlflow_server):
    url, artifacts = mlflow_server
    cfg = tiny_cfg(tmp_path / "outputs", name="srvsweep", tracking_uri=url)
    res = tune(cfg, n_trials=2, space=SPACE, torch_threads=1, show_progress_bar=False)
    trials = check_study(optuna.load_study(study_name="srvsweep", storage=default_storage(cfg)), 2)
    client = MlflowClient(tracking_uri=url)  # everything read back through the server
    check_trial_runs(client, res, trials)
    assert client.get_experiment_by_name(EXPERIMENT).artifact_location.startswith("mlflow-artifacts:")
    versions = client.search_model_versions(f"name = '{registered_name(cfg)}'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", res.best_run_id)]
    import mlflow

    got = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{registered_name(cfg)}/1", dst_path=str(tmp_path / "dl"), tracking_uri=url
        )
    )
    assert (got / "MLmodel").is_file() and list(got.rglob("bundle.json")), sorted(p.name for p in got.rglob("*"))
    assert list(artifacts.rglob("MLmodel")), "the model's files did not reach the server's artifact store"
    assert not (tmp_path / "outputs" / "mlflow.db").exists(), "runs went to a local sqlite store instead of the server"
