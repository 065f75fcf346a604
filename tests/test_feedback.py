"""Analyst feedback (issue 16) end to end: the REST service under real uvicorn (two workers) on a real, throw-away
PostgreSQL cluster: verdicts by request id and by Community ID, the alert queue, suppression rules applied by every
worker and counted, the bad inputs of the issue, concurrent verdicts, and a database that cannot be reached."""

import json
import re
import threading
import time

import httpx
import pytest

from cyber_moe import testing
from cyber_moe.feedback import FeedbackStore, head_revision
from cyber_moe.serve import HTTP_PROTOCOL
from cyber_moe.testing import DEMO_SCHEMA, demo_flows, make_demo_bundle, postgres_cluster, records

KEY = "feedback-key-77"
AUTH = {"X-API-Key": KEY}
SMALL_NET = dict(d_token=8, n_blocks=1, d_temporal=8, n_temporal_layers=1, d_gate=8, d_head=16)


class Server(testing.Server):
    "The service as `cyber-moe serve` starts it (header-timeout protocol)."

    def __init__(self, model, **kw):
        super().__init__(model, args=("--http", HTTP_PROTOCOL), **kw)


@pytest.fixture(scope="module")
def pg_url():
    try:
        with postgres_cluster("feedback") as url:
            yield url
    except FileNotFoundError as e:
        pytest.fail(str(e))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return make_demo_bundle(tmp_path_factory.mktemp("model") / "demo", name="fb-demo", version="3", **SMALL_NET)


@pytest.fixture(scope="module")
def server(bundle, pg_url, tmp_path_factory):
    d = tmp_path_factory.mktemp("server")
    (d / "metrics").mkdir()
    env = {
        "CYBER_MOE_API_KEY": KEY,
        "CYBER_MOE_FEEDBACK_URL": pg_url,
        "CYBER_MOE_RULES_REFRESH_SECONDS": "0.3",
        "PROMETHEUS_MULTIPROC_DIR": str(d / "metrics"),
    }
    with Server(bundle, log_path=d / "server.log", workers=2, env=env) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        ok, t = 0, time.time()  # both workers: model loaded, store opened (in the background)
        while ok < 10 and time.time() - t < 180:
            r = c.get("/ready")
            ok = ok + 1 if r.status_code == 200 and r.json().get("feedback") == "ok" else 0
            time.sleep(0.05)
        assert ok == 10, r.text
        yield c


FLOWS = records(demo_flows(60, seed=5), DEMO_SCHEMA.features)


def attack_family(pred: dict) -> str:
    "The alert's family: the most probable attack class."
    return max((k for k in pred["class_probs"] if k != "benign"), key=pred["class_probs"].get)


def predict(client, rid: str) -> list[dict]:
    r = client.post("/predict_batch", json=FLOWS, headers={"X-Request-ID": rid})
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_alerts_and_verdicts_on_postgres(client, pg_url, bundle):
    preds = predict(client, "batch-1")
    flagged = [i for i, p in enumerate(preds) if p["is_attack"]]
    assert len(flagged) >= 3
    assert [p["alert_id"] for p in preds] == [f"batch-1:{i}" if i in flagged else None for i in range(len(preds))]
    one = client.post("/predict", json=FLOWS[flagged[0]], headers={"X-Request-ID": "single-1"}).json()
    assert one["alert_id"] == "single-1" and one["suppressed_by"] is None
    # by request id (and row) and by the single request's id: verdicts land at once (the writer is flushed first)
    v = client.post("/feedback", json={"request_id": "batch-1", "row": flagged[1], "verdict": "fp", "note": "backup job", "analyst": "ana"})
    assert v.status_code == 200, v.text
    assert (v.json()["alert_id"], v.json()["label"], v.json()["model_version"]) == (f"batch-1:{flagged[1]}", "benign", "3")
    fam = attack_family(preds[flagged[2]])
    v = client.post("/feedback", json={"request_id": "batch-1", "row": flagged[2], "verdict": "tp", "analyst": "bo"})
    assert v.status_code == 200 and v.json()["label"] == fam, v.text
    assert client.post("/feedback", json={"request_id": "single-1", "verdict": "tp"}).status_code == 200
    # by Community ID: an alert a capture made (stored by `score --alerts` in another process)
    with FeedbackStore(pg_url) as store:
        assert store.revision == head_revision()
        store.add_alerts(
            [
                {
                    "id": "cap-1",
                    "community_id": "1:Q1Zk3Zs9tBfN7wO6mHd3Yq2rZ5M=",
                    "src_ip": "198.18.0.7",
                    "src_port": 5353,
                    "dst_ip": "198.18.0.1",
                    "dst_port": 161,
                    "protocol": 17,
                    "first_seen_ms": 1,
                    "last_seen_ms": 2,
                    "p_attack": 0.71,
                    "family": "scan",
                    "features": {"bytes": 80.0},
                }
            ],
            model_name="fb-demo",
            model_version="3",
            source="score",
        )
    v = client.post("/feedback", json={"community_id": "1:Q1Zk3Zs9tBfN7wO6mHd3Yq2rZ5M=", "verdict": "fp", "family": "benign"})
    assert v.status_code == 200 and v.json()["alert_id"] == "cap-1", v.text
    # the queue: newest first and most uncertain first, with the latest verdicts
    q = client.get("/alerts", params={"limit": 500}).json()["alerts"]
    ids = {a["id"]: a for a in q}
    assert {f"batch-1:{i}" for i in flagged} | {"single-1", "cap-1"} <= set(ids)
    assert (ids[f"batch-1:{flagged[1]}"]["verdict"], ids[f"batch-1:{flagged[1]}"]["note"]) == ("fp", "backup job")
    assert ids["cap-1"]["src_ip"] == "198.18.0.7" and ids[f"batch-1:{flagged[0]}"]["verdict"] is None
    unc = client.get("/alerts", params={"order": "uncertain", "limit": 500}).json()["alerts"]
    margins = [a["margin"] for a in unc if a["margin"] is not None]
    assert margins == sorted(margins) and len(margins) == len(unc) - 1  # cap-1 has no margin: last
    assert [a["id"] for a in client.get("/alerts", params={"verdict": "fp", "limit": 500}).json()["alerts"]] == [
        "cap-1",
        f"batch-1:{flagged[1]}",
    ]
    # what retraining reads: every alert with a verdict, its label and its features
    with FeedbackStore(pg_url) as store:
        cl = store.confirmed_labels(model_name="fb-demo").set_index("id")
        assert cl.loc[f"batch-1:{flagged[1]}", "label"] == "benign" and cl.loc[f"batch-1:{flagged[2]}", "label"] == fam
        assert cl.loc[f"batch-1:{flagged[1]}", "bytes"] == FLOWS[flagged[1]]["bytes"]
        p = store.precision_over_time("fb-demo")
        assert (int(p["n_tp"].sum()), int(p["n_fp"].sum())) == (2, 2)


def test_bad_input_is_named(client):
    preds = predict(client, "batch-2")
    row = next(i for i, p in enumerate(preds) if p["is_attack"])
    r = client.post("/feedback", json={"alert_id": "no-such-alert-42", "verdict": "tp"})
    assert r.status_code == 404 and "no-such-alert-42" in r.json()["detail"]
    r = client.post("/feedback", json={"request_id": "batch-2", "row": len(FLOWS) + 5, "verdict": "tp"})
    assert r.status_code == 404 and "batch-2" in r.json()["detail"]
    r = client.post("/feedback", json={"request_id": "batch-2", "row": row, "verdict": "tp", "family": "wormhole"})
    assert r.status_code == 422 and "valid: benign, scan, dos, exfil" in r.json()["detail"], r.text
    assert r.json()["errors"][0]["loc"] == ["family"]
    r = client.post("/feedback", json={"request_id": "batch-2", "row": row, "verdict": "maybe"})
    assert r.status_code == 422 and "verdict" in r.json()["detail"]
    r = client.post("/rules", json={"reason": "quiet please", "creator": "ana"})
    assert r.status_code == 422 and "at least one of src, dst_port, family" in r.json()["detail"]
    r = client.post("/rules", json={"family": "wormhole", "reason": "x", "creator": "ana"})
    assert r.status_code == 422 and "valid: scan, dos, exfil" in r.json()["detail"]
    r = client.post("/rules", json={"src": "not-an-address", "reason": "x", "creator": "ana"})
    assert r.status_code == 422 and "src: 'not-an-address'" in r.json()["detail"]
    assert client.delete("/rules/999999").status_code == 404
    r = client.get("/alerts", params=[("family", "dos"), ("family", "scan")])
    assert r.status_code == 422 and "given more than once: family" in r.json()["detail"], r.text
    for method, path in (("get", "/alerts"), ("get", "/rules"), ("post", "/feedback"), ("post", "/rules")):
        assert getattr(httpx, method)(client.base_url.join(path), timeout=30).status_code == 401, path  # behind the key


def test_two_concurrent_verdicts_keep_the_last_and_record_both(client, pg_url):
    preds = predict(client, "batch-3")
    rows = [i for i, p in enumerate(preds) if p["is_attack"]][:4]
    results: dict = {}

    def post(row: int, verdict: str):
        results[(row, verdict)] = client.post(
            "/feedback", json={"request_id": "batch-3", "row": row, "verdict": verdict, "analyst": verdict}
        )

    threads = [threading.Thread(target=post, args=(row, v)) for row in rows for v in ("tp", "fp")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.status_code == 200 for r in results.values()), [r.text for r in results.values()]
    with FeedbackStore(pg_url) as store:
        latest = store.alerts(limit=500, suppressed=None).set_index("id")
        for row in rows:
            vs = store.verdicts(f"batch-3:{row}")
            assert sorted(v["verdict"] for v in vs) == ["fp", "tp"]  # both recorded
            last = max(vs, key=lambda v: v["id"])
            assert latest.loc[f"batch-3:{row}", "verdict"] == last["verdict"]  # the last one kept


def test_rules_suppress_in_every_worker_and_are_counted(client, server):
    preds = predict(client, "batch-4")
    fam = attack_family(next(p for p in preds if p["is_attack"]))
    r = client.post(
        "/rules",
        json={"family": fam, "reason": "the nightly backup looks like this", "creator": "ana", "expires_at": "2099-01-01T00:00:00Z"},
    )
    assert r.status_code == 201, r.text
    rule = r.json()
    assert rule["active"] and rule["n_suppressed"] == 0
    time.sleep(1.0)  # the other worker re-reads its rules
    want, got = 0, 0
    for k in range(6):  # requests spread over both workers
        out = predict(client, f"batch-5-{k}")
        expect = [p["is_attack"] and attack_family(p) == fam for p in out]
        assert [p["suppressed_by"] == rule["id"] for p in out] == expect
        assert [p["is_attack"] for p in out] == [p["is_attack"] for p in preds]  # still scored the same
        want += sum(expect)
    assert want > 0
    text = client.get("/metrics").text
    got = float(re.search(rf'^cyber_moe_alerts_suppressed_total\{{rule="{rule["id"]}"\}} (\S+)$', text, re.M).group(1))
    assert got == want
    for _ in range(50):  # the writers add to the rule's count
        n = next(x["n_suppressed"] for x in client.get("/rules").json()["rules"] if x["id"] == rule["id"])
        if n == want:
            break
        time.sleep(0.1)
    assert n == want
    sup = client.get("/alerts", params={"suppressed": "only", "limit": 1000}).json()["alerts"]
    assert len([a for a in sup if a["suppressed_by"] == rule["id"]]) == want  # stored, not lost
    assert client.get("/rules", params={"active": "true"}).json()["rules"][0]["id"] == rule["id"]
    assert client.delete(f"/rules/{rule['id']}").json()["id"] == rule["id"]
    time.sleep(1.0)
    assert not any(p["suppressed_by"] for p in predict(client, "batch-6"))


def test_an_unreachable_database_leaves_scoring_alone(bundle, tmp_path):
    port = testing.free_port()
    env = {"CYBER_MOE_API_KEY": KEY, "CYBER_MOE_FEEDBACK_URL": f"postgresql+psycopg://fb:s3cr3t-pw@127.0.0.1:{port}/feedback"}
    with Server(bundle, log_path=tmp_path / "server.log", env=env) as s, httpx.Client(base_url=s.url, headers=AUTH, timeout=30) as c:
        for _ in range(100):
            ready = c.get("/ready")
            if ready.json().get("feedback", "").startswith("unavailable"):
                break
            time.sleep(0.1)
        assert ready.status_code == 200, ready.text
        assert ready.json()["feedback"].startswith(f"unavailable: feedback store postgresql+psycopg://fb:***@127.0.0.1:{port}/feedback")
        r = c.post("/predict_batch", json=FLOWS)
        assert r.status_code == 200 and len(r.json()["predictions"]) == len(FLOWS)
        assert all(p["alert_id"] is None for p in r.json()["predictions"])  # nothing promised
        for method, path, body in (
            ("post", "/feedback", {"alert_id": "x", "verdict": "tp"}),
            ("get", "/alerts", None),
            ("get", "/rules", None),
            ("post", "/rules", {"dst_port": 22, "reason": "x", "creator": "y"}),
        ):
            r = c.request(method.upper(), path, json=body)
            assert r.status_code == 503 and "feedback store unavailable" in r.json()["detail"], (path, r.text)
        log = s.log()
    events = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    down = [e for e in events if e.get("event") == "feedback_unavailable"]
    assert down and "s3cr3t-pw" not in log, log[-2000:]
