"""The REST service under a real uvicorn process on 127.0.0.1 (started through the package's app factory, as `cyber-moe serve` does): the old service's payloads, OIP v2, bad inputs,
the API key, hot reload under load, Prometheus metrics (one and two workers) and the JSON access log."""

import json
import re
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from cyber_moe.bundle import load_model_bundle
from cyber_moe.schema import CIC_IDS2017, FAMILY, IS_ATTACK, UNSW_NB15
from cyber_moe import testing
from cyber_moe.serve import HTTP_PROTOCOL, METRIC_NAMES, OIP_OUTPUTS
from cyber_moe.testing import make_demo_bundle, records, unsw_frame

ROOT = Path(__file__).resolve().parent.parent
CIC_CSV = "cicids2017/Friday-WorkingHours-Afternoon-DDos.pcap_ISCX.head299.csv"
SMALL_NET = dict(d_token=16, n_blocks=1, d_temporal=16, n_temporal_layers=1, d_gate=16, d_head=32)
KEY = "test-key-5c1f"
AUTH = {"X-API-Key": KEY}


class Server(testing.Server):
    "The service under uvicorn with the header timeout protocol, as `cyber-moe serve` and the container start it."

    def __init__(self, model, **kw):
        super().__init__(model, args=("--http", HTTP_PROTOCOL), **kw)


@pytest.fixture(scope="session")
def unsw(shared_data) -> pd.DataFrame:
    return unsw_frame(shared_data)


@pytest.fixture(scope="session")
def unsw_bundles(tmp_path_factory, unsw) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("bundles")
    return (
        make_demo_bundle(d / "v1", df=unsw, schema=UNSW_NB15, name="cyber-moe-unsw", version="1", seed=0, **SMALL_NET),
        make_demo_bundle(d / "v2", df=unsw, schema=UNSW_NB15, name="cyber-moe-unsw", version="2", seed=1, **SMALL_NET),
    )


@pytest.fixture(scope="module")
def server(unsw_bundles, tmp_path_factory):
    env = {"CYBER_MOE_API_KEY": KEY, "CYBER_MOE_MAX_BATCH": "256", "CYBER_MOE_DRIFT_MIN_ROWS": "50", "CYBER_MOE_DRIFT_WINDOW": "500"}
    with Server(unsw_bundles[0], log_path=tmp_path_factory.mktemp("log") / "server.log", env=env) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
        yield c


def test_the_old_services_payload_shape(client, unsw, unsw_bundles):
    "One flow as a JSON object feature -> value with UNSW-NB15's own column names; verdicts equal the bundle's own."
    flows = records(unsw.iloc[:8], UNSW_NB15.features)
    bundle = load_model_bundle(unsw_bundles[0])
    ref = bundle.predict(pd.DataFrame(flows), class_probs=True)
    for i, flow in enumerate(flows):
        r = client.post("/predict", json=flow, headers={"X-Request-ID": f"seed-{i}"})
        assert r.status_code == 200, r.text
        p = r.json()
        assert r.headers["x-request-id"] == p["request_id"] == f"seed-{i}"
        assert (p["model_name"], p["model_version"]) == ("cyber-moe-unsw", "1")
        assert p["family"] == ref["family"][i] and p["is_attack"] == bool(ref["is_attack"][i])
        assert abs(p["p_attack"] - ref["p_attack"][i]) < 1e-6 and abs(p["p_family"] - ref["p_family"][i]) < 1e-6
        assert list(p["class_probs"]) == bundle.classes and abs(sum(p["class_probs"].values()) - 1) < 1e-5
        assert list(p["gate"]) == list(bundle.experts) and abs(sum(p["gate"].values()) - 1) < 1e-5
    r = client.post("/predict", json=flows[0])
    assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]) and r.json()["request_id"] == r.headers["x-request-id"]


def test_the_network_runs_on_onnx_runtime(client, unsw, unsw_bundles):
    "The served bundle's checked ONNX graph scores by default; its numbers are torch's, and /ready and the OIP metadata say so."
    assert client.get("/ready").json()["runtime"] == "onnx"
    assert client.get("/v2/models/cyber-moe-unsw").json()["platform"] == "onnxruntime_onnx"
    flows = records(unsw.iloc[100:300], UNSW_NB15.features)
    torch_ref = load_model_bundle(unsw_bundles[0]).predict(pd.DataFrame(flows), class_probs=True)  # torch, frame path
    got = client.post("/predict_batch", json=flows).json()["predictions"]
    assert [p["family"] for p in got] == list(torch_ref["family"])
    np.testing.assert_allclose([p["p_attack"] for p in got], torch_ref["p_attack"], rtol=0, atol=1e-5)


def test_batch_equals_single_flows(client, unsw):
    flows = records(unsw.iloc[10:60], UNSW_NB15.features)
    b = client.post("/predict_batch", json=flows).json()
    assert b["n_flows"] == 50 and len(b["predictions"]) == 50
    for i in (0, 17, 49):
        one = client.post("/predict", json=flows[i]).json()
        assert one["family"] == b["predictions"][i]["family"] and abs(one["p_attack"] - b["predictions"][i]["p_attack"]) < 1e-6


def test_open_inference_protocol_v2(client, unsw):
    "Standard v2 bodies: one tensor per feature, and one 2-D FP64 tensor with its column names plus BYTES categories."
    df = unsw.iloc[100:130]
    n, num = len(df), [f for f in UNSW_NB15.features if f not in UNSW_NB15.categorical]
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    meta = client.get("/v2/models/cyber-moe-unsw").json()
    assert meta["versions"] == ["1"] and [i["name"] for i in meta["inputs"]] == list(UNSW_NB15.features)
    assert [o["name"] for o in meta["outputs"]] == list(OIP_OUTPUTS)
    assert client.get("/v2/models/cyber-moe-unsw/ready").json() == {"name": "cyber-moe-unsw", "ready": True}
    per_feature = {
        "id": "oip-1",
        "inputs": [
            {
                "name": f,
                "shape": [n],
                "datatype": "BYTES" if f in UNSW_NB15.categorical else ("INT64" if df[f].dtype.kind == "i" else "FP64"),
                "data": df[f].tolist(),
            }
            for f in UNSW_NB15.features
        ],
    }
    r = client.post("/v2/models/cyber-moe-unsw/infer", json=per_feature)
    assert r.status_code == 200, r.text
    out = {o["name"]: o for o in r.json()["outputs"]}
    assert r.json()["id"] == "oip-1" and r.json()["model_version"] == "1"
    assert out["class_probs"]["shape"] == [n, 10] and len(out["class_probs"]["data"]) == n * 10
    assert out["gate"]["parameters"]["columns"] == ["tabular", "temporal"] and out["is_attack"]["datatype"] == "BOOL"
    batch = client.post("/predict_batch", json=records(df, UNSW_NB15.features)).json()["predictions"]
    assert out["family"]["data"] == [p["family"] for p in batch]
    two_d = {
        "inputs": [
            {
                "name": "numeric",
                "shape": [n, len(num)],
                "datatype": "FP64",
                "parameters": {"columns": num},
                "data": df[num].astype(float).to_numpy().tolist(),
            }
        ]
        + [{"name": c, "shape": [n], "datatype": "BYTES", "data": df[c].tolist()} for c in UNSW_NB15.categorical],
        "outputs": [{"name": "p_attack"}, {"name": "family"}],
    }
    r2 = client.post("/v2/models/cyber-moe-unsw/infer", json=two_d).json()
    assert [o["name"] for o in r2["outputs"]] == ["p_attack", "family"]
    assert np.allclose(r2["outputs"][0]["data"], out["p_attack"]["data"], atol=1e-6)
    assert client.post("/v2/models/nope/infer", json=two_d).status_code == 404


@pytest.fixture(scope="module")
def cic_server(shared_data, tmp_path_factory):
    "A bundle over CIC-IDS2017's own (space-prefixed) columns; labels are made up: the model is untrained anyway."
    df = pd.read_csv(shared_data / CIC_CSV)
    df[FAMILY] = np.where(np.arange(len(df)) % 3 == 0, "DDoS", "BENIGN")
    df[IS_ATTACK] = (df[FAMILY] != "BENIGN").astype("int8")
    d = tmp_path_factory.mktemp("cic")
    make_demo_bundle(d / "model", df=df, schema=CIC_IDS2017, name="cyber-moe-cic", **SMALL_NET)
    with Server(d / "model", log_path=d / "server.log") as s:
        yield s, df


def test_cic_ids2017_spaced_names_and_infinity(cic_server):
    s, df = cic_server
    cols = [c for c in df.columns if c.strip() in CIC_IDS2017.features]  # the file's own names, leading spaces included
    assert " Flow Duration" in cols and len(cols) == len(CIC_IDS2017.features)
    fin = df[cols].apply(lambda col: np.isfinite(col.astype(float))).all(axis=1)
    r = httpx.post(s.url + "/predict", json=records(df[fin].iloc[:1], cols)[0])
    assert r.status_code == 200, r.text
    assert r.json()["model_name"] == "cyber-moe-cic"
    row = df[~fin].iloc[0]
    body = json.dumps({c: (row[c].item() if hasattr(row[c], "item") else row[c]) for c in cols})  # 'Infinity' / 'NaN' literals
    r = httpx.post(s.url + "/predict", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 422 and "Flow Bytes/s (must be a finite number)" in r.json()["detail"], r.text


def _bad_cases(flow: dict) -> list:
    first = next(iter(flow))
    missing = {k: v for k, v in flow.items() if k not in ("sbytes", "proto")}
    return [
        ("NaN literal", "/predict", dict(content=json.dumps({**flow, "sbytes": float("nan")})), 422, "sbytes (must be a finite number)"),
        ("Infinity literal", "/predict", dict(content=json.dumps({**flow, "dur": float("inf")})), 422, "dur (must be a finite number)"),
        ("'Infinity' string", "/predict", dict(json={**flow, "dur": "Infinity"}), 422, "invalid value(s): dur"),
        ("number as string", "/predict", dict(json={**flow, "sbytes": "12"}), 422, "invalid value(s): sbytes"),
        ("bool", "/predict", dict(json={**flow, "spkts": True}), 422, "invalid value(s): spkts"),
        ("null", "/predict", dict(json={**flow, "spkts": None}), 422, "invalid value(s): spkts"),
        (
            "1e400",
            "/predict",
            dict(content=json.dumps(flow).replace(f'"{first}": {json.dumps(flow[first])}', f'"{first}": 1e400')),
            422,
            f"invalid value(s): {first}",
        ),
        ("long category", "/predict", dict(json={**flow, "proto": "x" * 1000}), 422, "proto (must be a string of at most 256 characters"),
        ("missing features", "/predict", dict(json=missing), 422, "missing feature(s): sbytes, proto"),
        ("extra feature", "/predict", dict(json={**flow, "id": 7, "attack_cat": "Normal"}), 422, "unknown feature(s): id, attack_cat"),
        ("empty body", "/predict", dict(content=b""), 422, "request body is empty"),
        ("empty object", "/predict", dict(json={}), 422, "missing feature(s)"),
        ("array to /predict", "/predict", dict(json=[flow]), 422, "expected a JSON object"),
        ("malformed JSON", "/predict", dict(content=b'{"sbytes": 1,,}'), 422, "malformed JSON"),
        ("10 MB body", "/predict", dict(content=b'{"proto": "' + b"x" * (10 * 2**20) + b'"}'), 413, "over the limit"),
        ("10 MB chunked", "/predict_batch", dict(content=(b"[" + b" " * 2**20 for _ in range(10))), 413, "over the limit"),
        ("oversized batch", "/predict_batch", dict(json=[flow] * 257), 413, "batch of 257 flows is over the limit of 256"),
        ("empty batch", "/predict_batch", dict(json=[]), 422, "no flows"),
        ("object to batch", "/predict_batch", dict(json=flow), 422, "expected a JSON array"),
        (
            "bad row in batch",
            "/predict_batch",
            dict(json=[flow, {**flow, "sbytes": "x"}]),
            422,
            "invalid value(s): sbytes (must be a finite number) in row(s) 1",
        ),
        ("OIP malformed JSON", "/v2/models/cyber-moe-unsw/infer", dict(content=b"{"), 422, "json"),
        ("OIP no inputs", "/v2/models/cyber-moe-unsw/infer", dict(json={"inputs": []}), 422, "inputs"),
        (
            "OIP NaN in tensor",
            "/v2/models/cyber-moe-unsw/infer",
            dict(
                content=json.dumps(
                    {
                        "inputs": [
                            {
                                "name": k,
                                "shape": [1],
                                "datatype": "BYTES" if k in UNSW_NB15.categorical else "FP64",
                                "data": [float("nan") if k == "sbytes" else v],
                            }
                            for k, v in flow.items()
                        ]
                    }
                )
            ),
            422,
            "sbytes must be a finite number",
        ),
        (
            "OIP missing feature",
            "/v2/models/cyber-moe-unsw/infer",
            dict(json={"inputs": [{"name": "sbytes", "shape": [1], "datatype": "FP64", "data": [1.0]}]}),
            422,
            "missing feature(s): spkts",
        ),
        (
            "OIP shape mismatch",
            "/v2/models/cyber-moe-unsw/infer",
            dict(json={"inputs": [{"name": "sbytes", "shape": [2], "datatype": "FP64", "data": [1.0]}]}),
            422,
            "shape [2] holds 2 value(s) but data has 1",
        ),
        (
            "OIP oversized batch",
            "/v2/models/cyber-moe-unsw/infer",
            dict(json={"inputs": [{"name": "sbytes", "shape": [300], "datatype": "FP64", "data": [1.0] * 300}]}),
            413,
            "over the limit of 256",
        ),
        ("reload: unknown key", "/admin/reload", dict(json={"uri": "x"}), 422, "uri"),
        ("explain: top_k 0", "/explain?top_k=0", dict(json=flow), 422, "top_k"),
    ]


def test_bad_inputs_are_4xx_with_a_message(client, unsw):
    "Every bad input gets its 4xx and a message that says what is wrong; never a 5xx."
    flow = records(unsw.iloc[:1], UNSW_NB15.features)[0]
    failures = []
    for name, path, kw, status, contains in _bad_cases(flow):
        r = client.post(path, headers={"Content-Type": "application/json"}, **kw)
        body = r.json()
        msg = body.get("detail") or body.get("error") or ""
        if r.status_code != status or contains.lower() not in msg.lower():
            failures.append((name, r.status_code, msg[:300]))
    assert not failures, failures


def test_api_key(server, unsw):
    flow = records(unsw.iloc[:1], UNSW_NB15.features)[0]
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for path in ("/health", "/ready", "/v2/health/live", "/v2/health/ready", "/v2/models/cyber-moe-unsw/ready"):
            assert c.get(path).status_code == 200, path
        for method, path, kw in [
            ("POST", "/predict", dict(json=flow)),
            ("POST", "/predict_batch", dict(json=[flow])),
            ("GET", "/metrics", {}),
            ("GET", "/openapi.json", {}),
            ("GET", "/v2/models/cyber-moe-unsw", {}),
            ("POST", "/v2/models/cyber-moe-unsw/infer", dict(json={"inputs": []})),
            ("POST", "/admin/reload", {}),
            ("POST", "/explain", dict(json=flow)),
        ]:
            r = c.request(method, path, **kw)
            assert r.status_code == 401 and "missing API key" in r.json()["detail"], (path, r.text)
            r = c.request(method, path, headers={"X-API-Key": KEY + "x"}, **kw)
            assert r.status_code == 403 and r.json()["detail"] == "wrong API key", (path, r.text)
        assert c.post("/predict", json=flow, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert c.post("/predict", json=flow, headers={"X-API-Key": ""}).status_code == 401


def test_openapi_describes_the_served_model(client):
    spec = client.get("/openapi.json").json()
    flow = spec["components"]["schemas"]["Flow"]
    assert flow["required"] == list(UNSW_NB15.features) and flow["additionalProperties"] is False
    assert flow["properties"]["proto"]["anyOf"][0]["type"] == "string" and flow["properties"]["sbytes"]["type"] == "number"
    assert spec["components"]["schemas"]["FlowBatch"]["maxItems"] == 256
    assert spec["components"]["securitySchemes"]["APIKeyHeader"]["name"] == "X-API-Key"
    assert {
        "/predict",
        "/predict_batch",
        "/explain",
        "/health",
        "/ready",
        "/metrics",
        "/admin/reload",
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{model_name}",
        "/v2/models/{model_name}/ready",
        "/v2/models/{model_name}/infer",
    } <= set(spec["paths"])


def test_metrics_after_traffic(client, unsw, unsw_bundles):
    flows = records(unsw.iloc[200:460], UNSW_NB15.features)
    assert client.post("/predict_batch", json=flows[:200]).status_code == 200
    for f in flows[200:210]:
        assert client.post("/predict", json=f).status_code == 200
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in text, name
    fams = dict(re.findall(r'^cyber_moe_predictions_total\{family="([^"]+)"\} (\S+)$', text, re.M))
    assert fams and set(fams) <= set(load_model_bundle(unsw_bundles[0]).classes)
    assert sum(float(v) for v in fams.values()) >= 210
    assert float(re.search(r"^cyber_moe_prediction_confidence_count (\S+)$", text, re.M).group(1)) >= 210
    assert re.search(r'^cyber_moe_expert_gate_weight_count\{expert="temporal"\} \d', text, re.M)
    assert re.search(r'^cyber_moe_http_requests_total\{method="POST",route="/predict",status="200"\} \d', text, re.M)
    assert re.search(r'^cyber_moe_model_info\{name="cyber-moe-unsw",version="1"\} 1\.0$', text, re.M)
    assert re.search(r"^cyber_moe_model_loaded 1\.0$", text, re.M)
    psi = dict(re.findall(r'^cyber_moe_feature_drift_psi\{feature="([^"]+)"\} (\S+)$', text, re.M))
    assert len(psi) == 20 and all(np.isfinite(float(v)) for v in psi.values()), psi


def test_access_log_is_json_without_payloads(server, client, unsw):
    flow = records(unsw.iloc[:1], UNSW_NB15.features)[0]
    marker = "payload-marker-93f1"
    client.post("/predict", json={**flow, "proto": marker}, headers={"X-Request-ID": "log-check-1"})
    client.post("/predict", json={**flow, "sbytes": "secret-value-77"}, headers={"X-Request-ID": "log-check-2"})
    time.sleep(0.3)
    lines = [json.loads(ln) for ln in server.log().splitlines() if ln.startswith("{")]
    access = {ln["request_id"]: ln for ln in lines if ln.get("event") == "http_request"}
    assert access["log-check-1"]["status"] == 200 and access["log-check-2"]["status"] == 422
    assert access["log-check-1"]["route"] == "/predict" and access["log-check-1"]["bytes_in"] > 100
    assert {"ts", "method", "path", "duration_ms", "client", "pid"} <= set(access["log-check-1"])
    assert marker not in server.log() and "secret-value-77" not in server.log()


def test_hot_reload_under_concurrent_requests(server, unsw, unsw_bundles, tmp_path):
    "Clients keep sending while the model is swapped back and forth (and one reload fails): not one request fails."
    flows = records(unsw.iloc[:64], UNSW_NB15.features)
    stop, results, errors = threading.Event(), [], []

    def hammer(i):
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=60) as c:
            while not stop.is_set():
                try:
                    r = c.post("/predict", json=flows[i % 64]) if i % 2 else c.post("/predict_batch", json=flows[:32])
                    results.append((r.status_code, r.json().get("model_version")))
                except Exception as e:
                    errors.append(repr(e))
                i += 1

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    reloads = []
    with httpx.Client(base_url=server.url, headers=AUTH, timeout=120) as c:
        for uri in [unsw_bundles[1], unsw_bundles[0], tmp_path / "no-such-bundle", unsw_bundles[1], unsw_bundles[0]]:
            time.sleep(0.5)
            reloads.append(c.post("/admin/reload", json={"model_uri": str(uri)}))
        time.sleep(0.5)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    statuses = [s for s, _ in results]
    assert len(results) > 40 and set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
    assert {v for _, v in results} == {"1", "2"}
    assert [r.status_code for r in reloads] == [200, 200, 422, 200, 200]
    assert "still serving cyber-moe-unsw 1" in reloads[2].json()["detail"]
    assert [r.json()["model_version"] for r in reloads] == ["2", "1", "1", "2", "1"]
    text = httpx.get(server.url + "/metrics", headers=AUTH).text
    assert re.search(r'^cyber_moe_model_reloads_total\{result="failed"\} 1\.0$', text, re.M)
    assert re.search(r'^cyber_moe_model_info\{name="cyber-moe-unsw",version="2"\} 0\.0$', text, re.M)


def _ready_pids(server) -> set:
    "The worker processes that have answered /ready with 200, from the server's JSON log."
    lines = [json.loads(ln) for ln in server.log().splitlines() if ln.startswith("{")]
    return {r["pid"] for r in lines if r.get("route") == "/ready" and r.get("status") == 200}


def _wait_both_workers_ready(server, timeout: float = 180) -> None:
    "Ask /ready on fresh connections (each may reach either worker) until both workers have answered 200."
    t = time.time()
    while len(_ready_pids(server)) < 2:
        assert time.time() - t < timeout, f"only {len(_ready_pids(server))} worker(s) ready after {timeout} s:\n{server.log()[-3000:]}"
        httpx.get(server.url + "/ready", timeout=10)
        time.sleep(0.05)


def test_two_workers_share_metrics(unsw_bundles, unsw, tmp_path):
    "With PROMETHEUS_MULTIPROC_DIR, /metrics of either worker counts the predictions of both."
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(prom_dir), "CYBER_MOE_TORCH_THREADS": "1"}
    flows = records(unsw.iloc[:4], UNSW_NB15.features)
    with Server(unsw_bundles[0], log_path=tmp_path / "server.log", workers=2, env=env, wait=False) as s:
        s.wait_ready()
        _wait_both_workers_ready(s)

        def send(k):
            for j in range(15):
                with httpx.Client(base_url=s.url, timeout=60) as c:
                    assert c.post("/predict", json=flows[(k + j) % 4]).status_code == 200

        threads = [threading.Thread(target=send, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        text = httpx.get(s.url + "/metrics").text
        total = sum(float(v) for v in re.findall(r'^cyber_moe_predictions_total\{family="[^"]+"\} (\S+)$', text, re.M))
        assert total == 120, text[:2000]
        assert re.search(r"^cyber_moe_model_loaded 1\.0$", text, re.M)
        pids = {json.loads(ln)["pid"] for ln in s.log().splitlines() if ln.startswith("{") and '"route": "/predict"' in ln}
    assert len(pids) == 2, f"requests were served by {len(pids)} worker(s); expected both"


def test_reload_reaches_every_worker(unsw_bundles, unsw, tmp_path):
    "Two workers sharing CYBER_MOE_RELOAD_DIR: a reload sent to one is served by both within a poll interval."
    env = {
        "CYBER_MOE_API_KEY": KEY,
        "CYBER_MOE_TORCH_THREADS": "1",
        "CYBER_MOE_RELOAD_DIR": str(tmp_path / "reload"),
        "CYBER_MOE_RELOAD_POLL_SECONDS": "0.5",
        "CYBER_MOE_WARMUP_ROWS": "8",
    }
    flow = records(unsw.iloc[:1], UNSW_NB15.features)[0]

    def versions(n=40):  # a new connection per request: the kernel spreads them over both workers
        out = []
        for _ in range(n):
            with httpx.Client(base_url=s.url, headers=AUTH, timeout=60) as c:
                out.append(c.post("/predict", json=flow).json().get("model_version"))
        return out

    with Server(unsw_bundles[0], log_path=tmp_path / "server.log", workers=2, env=env, wait=False) as s:
        s.wait_ready()
        _wait_both_workers_ready(s)
        assert set(versions()) == {"1"}
        r = httpx.post(s.url + "/admin/reload", json={"model_uri": str(unsw_bundles[1])}, headers=AUTH, timeout=120)
        assert r.status_code == 200 and r.json()["model_version"] == "2", r.text
        deadline = time.time() + 60  # the other worker polls every 0.5 s and loads v2
        while set(seen := versions()) != {"2"} and time.time() < deadline:
            time.sleep(0.5)
        assert set(seen) == {"2"}, seen
        events = [json.loads(ln) for ln in s.log().splitlines() if ln.startswith("{")]
    reloaded = {(e["pid"], e["via"]) for e in events if e.get("event") == "model_reloaded"}
    assert {via for _, via in reloaded} == {"admin", "reload_dir"} and len({pid for pid, _ in reloaded}) == 2, reloaded
    served_by = {e["pid"] for e in events if e.get("route") == "/predict"}
    assert len(served_by) == 2, f"requests reached {len(served_by)} worker(s); the test needs both"


def test_registry_alias_moves_the_model(unsw_bundles, unsw, tmp_path):
    "Serving models:/NAME@champion: moving the alias in the registry swaps the served model, no call to the service."
    import mlflow
    from mlflow import MlflowClient
    from cyber_moe.bundle import log_pyfunc, use_mlflow_store

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with use_mlflow_store(db):  # MLflow's global store for this test only
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("serve", artifact_location=(tmp_path / "artifacts").as_uri()))
        for b in unsw_bundles:
            with mlflow.start_run():
                log_pyfunc(load_model_bundle(b), example=unsw.iloc[:5], registered_name="cyber-moe-unsw")
        client = MlflowClient()
        client.set_registered_model_alias("cyber-moe-unsw", "champion", "1")
        env = {
            "CYBER_MOE_API_KEY": KEY,
            "MLFLOW_TRACKING_URI": db,
            "CYBER_MOE_ALIAS_POLL_SECONDS": "1",
            "CYBER_MOE_RELOAD_POLL_SECONDS": "0.5",
            "CYBER_MOE_WARMUP_ROWS": "8",
        }
        flow = records(unsw.iloc[:1], UNSW_NB15.features)[0]
        with Server("models:/cyber-moe-unsw@champion", log_path=tmp_path / "server.log", env=env) as s:
            with httpx.Client(base_url=s.url, headers=AUTH, timeout=60) as c:
                assert c.post("/predict", json=flow).json()["model_version"] == "1"
                client.set_registered_model_alias("cyber-moe-unsw", "champion", "2")
                deadline, seen = time.time() + 30, "1"
                while seen == "1" and time.time() < deadline:
                    time.sleep(0.5)
                    seen = c.post("/predict", json=flow).json()["model_version"]
                assert seen == "2", s.log()[-2000:]
            assert any('"via": "alias"' in ln for ln in s.log().splitlines())
