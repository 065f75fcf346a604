"""deploy/: Prometheus config and alert rules pass promtool (and its rule unit tests), the Grafana dashboard
and the alerts use only metrics the app exports, and the compose file, Dockerfile and provisioning agree."""

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient

from cyber_moe.serve import METRIC_NAMES, ServeSettings, create_app
from cyber_moe.testing import DEMO_SCHEMA, demo_flows, make_demo_bundle

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def promtool(*args, cwd=None) -> subprocess.CompletedProcess:
    if not Path(PROMTOOL).exists():
        pytest.fail("promtool not found: `make sysdeps-test` installs Debian's prometheus package")
    return subprocess.run([PROMTOOL, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_promtool_checks_the_alert_rules():
    r = promtool("check", "rules", "alerts.yml", cwd=DEPLOY / "prometheus")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 8 rules found" in r.stdout
    names = {rule.get("alert") for g in yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())["groups"] for rule in g["rules"]}
    assert {"CyberMoeAttackRateSpike", "CyberMoeFeatureDrift", "CyberMoeHighLatencyP99", "CyberMoeModelNotLoaded"} <= names


def test_alert_rules_fire_when_they_should():
    "promtool's unit tests: each alert fires on its series (attack spike, drift, latency, no model, down) and not before."
    r = promtool("test", "rules", "alerts.test.yml", cwd=DEPLOY / "prometheus")
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_promtool_checks_the_scrape_config(tmp_path):
    "The config as shipped, with the API-key file (a Docker secret at run time) pointed at a temporary one."
    cfg = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    job = cfg["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"] == ["api:8000"]
    assert job["authorization"] == {"type": "Bearer", "credentials_file": "/run/secrets/api_key"}
    (tmp_path / "api_key").write_text("k")
    job["authorization"]["credentials_file"] = str(tmp_path / "api_key")
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    shutil.copy(DEPLOY / "prometheus/alerts.yml", tmp_path / "alerts.yml")
    r = promtool("check", "config", "prometheus.yml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    r = promtool("check", "config", "prometheus.yml", cwd=DEPLOY / "prometheus")  # as shipped: only the secret file is missing
    assert "/run/secrets/api_key" in r.stdout + r.stderr and "rule" not in (r.stdout + r.stderr).lower().replace("rule_files", "")


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> set[str]:
    "Every series name the app's /metrics shows after some traffic (histogram _bucket/_sum/_count included)."
    d = make_demo_bundle(
        tmp_path_factory.mktemp("deploy") / "b", d_token=8, n_blocks=1, d_temporal=8, n_temporal_layers=1, d_gate=8, d_head=16
    )
    with TestClient(create_app(d, ServeSettings(warmup_rows=2, drift_min_rows=10, access_log=False))) as c:
        for _ in range(200):
            if c.get("/ready").status_code == 200:
                break
            time.sleep(0.05)
        flows = json.loads(demo_flows(30).loc[:, list(DEMO_SCHEMA.features)].to_json(orient="records"))
        assert c.post("/predict_batch", json=flows).status_code == 200
        text = c.get("/metrics").text
    return set(re.findall(r"^(cyber_moe_\w+?)(?:\{| )", text, re.M)) | set(re.findall(r"^# TYPE (cyber_moe_\w+) ", text, re.M))


def _exprs(obj) -> list[str]:
    if isinstance(obj, dict):
        return [v for k, v in obj.items() if k == "expr" and isinstance(v, str)] + [e for v in obj.values() for e in _exprs(v)]
    if isinstance(obj, list):
        return [e for v in obj for e in _exprs(v)]
    return []


def test_dashboard_and_alerts_use_only_exported_metrics(exported):
    assert set(METRIC_NAMES) <= exported
    dash = json.loads((DEPLOY / "grafana/dashboards/cyber-moe.json").read_text())
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    for where, exprs in (("dashboard", _exprs(dash)), ("alerts.yml", _exprs(rules))):
        assert exprs, where
        used = {m for e in exprs for m in re.findall(r"\bcyber_moe_\w+", e)}
        assert used and used <= exported, f"{where} uses metrics the app does not export: {sorted(used - exported)}"
        assert {m for e in exprs for m in re.findall(r"\bcyber_moe:[\w:]+", e)} <= recorded
    # the dashboard shows every metric family the app exports (the histograms through their series)
    shown = {m for e in _exprs(dash) for m in re.findall(r"\bcyber_moe_\w+", e)} | {"cyber_moe_flows_total"}
    families = {re.sub(r"_(bucket|sum|count)$", "", m) for m in shown}
    assert set(METRIC_NAMES) <= families, sorted(set(METRIC_NAMES) - families)
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert {p["datasource"]["uid"] for p in dash["panels"]} == {ds["uid"]}


def test_compose_dockerfile_and_provisioning_agree():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"api", "prometheus", "grafana"}
    for name, svc in compose["services"].items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0]
            if src.startswith("."):
                assert (DEPLOY / src).exists() or src == "../outputs/default/model", f"{name}: {src} missing"
    api = compose["services"]["api"]
    assert api["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert api["environment"]["CYBER_MOE_MODEL"] == "/models/model" and "${CYBER_MOE_BIND:-127.0.0.1}:8000:8000" in api["ports"]
    assert compose["secrets"]["api_key"]["file"] == "./secrets/api_key"
    docker = (DEPLOY / "Dockerfile").read_text()
    for src in re.findall(r"^COPY\s+(.+)\s+\S+$", docker, re.M):
        for s in src.split():
            assert (ROOT / s).exists(), f"Dockerfile copies {s}, which is not in the project"
            assert not any(x in s for x in (".venv", "outputs", "..")), s
    assert (
        "uvicorn --factory cyber_moe.serve.app:app_from_env" in docker
        and "USER 10001" in docker
        and "HEALTHCHECK" in docker
        and "/ready" in docker
    )
    assert "EXPOSE 8000" in docker
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") if "*" in ignore else 0] == "*" and "!cyber_moe/" in ignore and "!app/" in ignore
    entry = DEPLOY / "docker-entrypoint.sh"
    assert entry.stat().st_mode & 0o111 and "PROMETHEUS_MULTIPROC_DIR" in entry.read_text() and "CYBER_MOE_RELOAD_DIR" in entry.read_text()
    assert "CYBER_MOE_RELOAD_DIR=" in docker  # two workers: a reload sent to one reaches both
    r = subprocess.run(["sh", "-n", str(entry)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/cyber-moe.yml").read_text())["providers"][0]
    grafana_mounts = dict(v.split(":")[:2] for v in compose["services"]["grafana"]["volumes"] if v.startswith("."))
    assert grafana_mounts["./grafana/dashboards"] == prov["options"]["path"]
