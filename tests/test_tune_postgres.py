"""Two worker processes on one Optuna study in a real, throw-away PostgreSQL cluster."""
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from cyber_moe.tune import tune
from test_tune import SPACE, check_study, check_trial_runs, tiny_cfg

PG_BIN = Path("/usr/lib/postgresql/15/bin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_postgres(*cmd) -> list[str]:
    "`cmd` run as the `postgres` system user when we are root (initdb and postgres refuse to run as root)."
    cmd = [str(c) for c in cmd]
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


@pytest.fixture
def postgres_url():
    "A PostgreSQL 15 cluster in a temporary folder on 127.0.0.1 with an empty database; stopped and removed afterwards."
    missing = [b for b in ("initdb", "pg_ctl", "postgres") if not (PG_BIN / b).is_file()]
    if missing:
        pytest.fail(f"PostgreSQL server binaries {missing} not found in {PG_BIN}: `apt-get install -y postgresql` (make does this)")
    root = Path(tempfile.mkdtemp(prefix="cyber-moe-pg-"))
    data, port = root / "data", free_port()
    if os.geteuid() == 0: shutil.chown(root, "postgres", "postgres")
    started = False
    try:
        subprocess.run(as_postgres(PG_BIN / "initdb", "-D", data, "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"),
                       check=True, capture_output=True, text=True)
        r = subprocess.run(as_postgres(PG_BIN / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-t", "60",
                                       "-o", f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off", "start"), capture_output=True, text=True)
        started = r.returncode == 0
        if not started:
            log = (root / "server.log").read_text() if (root / "server.log").is_file() else ""
            pytest.fail(f"pg_ctl start failed ({r.returncode}): {r.stderr}\n{log[-2000:]}")
        import psycopg
        with psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE sweeps")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/sweeps"
    finally:
        if started: subprocess.run(as_postgres(PG_BIN / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_two_workers_share_one_postgres_study(tmp_path, postgres_url):
    cfg = tiny_cfg(tmp_path, name="pgsweep")
    n = 6
    res = tune(cfg, n_trials=n, workers=2, storage=postgres_url, space=SPACE, torch_threads=1, show_progress_bar=False)
    assert (res.n_trials, res.n_total) == (n, n)
    assert res.storage == postgres_url                                 # no password to hide here, the URL is kept as is
    assert not (tmp_path / "optuna.db").exists(), "the study went to sqlite instead of PostgreSQL"
    trials = check_study(optuna.load_study(study_name="pgsweep", storage=postgres_url), n)   # none lost, none twice
    pids = {t.user_attrs["pid"] for t in trials}
    assert len(pids) == 2 and os.getpid() not in pids, f"trials came from processes {pids}, expected the two workers"
    assert sorted(sum(t.user_attrs["pid"] == p for t in trials) for p in pids) == [3, 3]
    assert {t.user_attrs["host"] for t in trials} == {socket.gethostname()}
    check_trial_runs(MlflowClient(tracking_uri=cfg.mlflow_uri), res, trials)
    assert res.model_version == "1"
