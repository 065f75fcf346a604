"""Issue 18 regressions that attack the loaders through the real CLI (`cyber-moe` as a subprocess) with real bundles,
captures and archives: each test reproduces one attack and asserts that it is refused with a clear message and no traceback."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import dpkt
import numpy as np
import pandas as pd
import pytest

from cyber_moe.bundle import ONNX_FILE, load_model_bundle, save_bundle
from cyber_moe.testing import untrained_bundle
from cyber_moe.config import ModelConfig
from cyber_moe.schema import FAMILY, IS_ATTACK, FlowSchema

TOY = FlowSchema(
    name="toy",
    numeric=("bytes", "pkts"),
    categorical=("proto",),
    timing=("iat", "dur"),
    label="label",
    benign="benign",
    classes=("benign", "scan"),
    identifiers=("id",),
)
SMALL = ModelConfig(d_token=8, n_blocks=1, n_heads=2, d_temporal=8, n_temporal_layers=1, d_gate=8, d_head=16)


def toy_flows(n: int = 300, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "id": np.arange(n),
            "bytes": rng.lognormal(6, 1, n),
            "pkts": rng.poisson(5, n),
            "proto": rng.choice(["tcp", "udp"], n),
            "iat": rng.exponential(0.1, n),
            "dur": rng.exponential(1, n),
            "label": rng.choice(["benign", "scan"], n),
        }
    )
    df[FAMILY] = df["label"]
    df[IS_ATTACK] = (df["label"] != "benign").astype("int8")
    return df


def run_cli(cli: str, *args, cwd=None, env=None, timeout=180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [cli, *map(str, args)], capture_output=True, text=True, timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})}
    )


def assert_refused(r: subprocess.CompletedProcess, *needles: str) -> None:
    "Exit 2, the message on stderr, no Python traceback."
    assert r.returncode == 2, f"exit {r.returncode}\nstdout: {r.stdout[-2000:]}\nstderr: {r.stderr[-3000:]}"
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    for n in needles:
        assert n in r.stderr, r.stderr[-3000:]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    "Two real bundles of the same schema with different weights (each with its checked ONNX graph), and a CSV of flows."
    d = tmp_path_factory.mktemp("harden")
    flows = toy_flows()
    a = save_bundle(untrained_bundle(flows, schema=TOY, model_cfg=SMALL, seed=0, name="toy", version="1"), d / "a")
    b = save_bundle(untrained_bundle(flows, schema=TOY, model_cfg=SMALL, seed=1, name="other", version="9"), d / "b")
    flows.drop(columns=[FAMILY, IS_ATTACK]).to_csv(d / "flows.csv", index=False)
    return {"dir": d, "a": a, "b": b, "csv": d / "flows.csv", "flows": flows}


# ---- item 3: the ONNX graph is tied to the weights ----------------------------------------------------------------
def test_swapped_onnx_graph_refuses_the_bundle(toy, cli):
    "The attack: copy another model's graph over network.onnx; the service would then score with it under the old identity."
    evil = toy["dir"] / "evil"
    shutil.copytree(toy["a"], evil)
    shutil.copy(toy["b"] / ONNX_FILE, evil / ONNX_FILE)
    assert_refused(run_cli(cli, "score", "--model", evil, "--input", toy["csv"]), f"{ONNX_FILE} changed", "manifest")
    with pytest.raises(ValueError, match="manifest"):
        load_model_bundle(evil)
    assert load_model_bundle(toy["a"]).name == "toy"  # the untouched bundle still loads


def test_every_loaded_file_is_in_the_manifest(toy, cli):
    "Preprocessing and weights are covered too: a changed statistic or an added file refuses the bundle."
    evil = toy["dir"] / "evil-pre"
    shutil.copytree(toy["a"], evil)
    pre = json.loads((evil / "preprocessor/preprocessor.json").read_text())
    (evil / "preprocessor/preprocessor.json").write_text(json.dumps(pre) + " ")  # one byte more: same statistics, other file
    assert_refused(run_cli(cli, "score", "--model", evil, "--input", toy["csv"]), "preprocessor/preprocessor.json changed")
    meta = json.loads((toy["a"] / "bundle.json").read_text())
    assert set(meta["manifest"]) == {"weights.pt", ONNX_FILE, "preprocessor/preprocessor.json"}


# ---- item 15: sizes in net_kwargs are bounded before anything is allocated -------------------------------------------
def _crafted(src: Path, dst: Path, **change) -> Path:
    "A bundle whose net_kwargs lie, with a manifest recomputed so that only the sizes are wrong."
    import hashlib

    shutil.copytree(src, dst)
    meta = json.loads((dst / "bundle.json").read_text())
    meta["net_kwargs"].update(change)
    meta["manifest"] = {
        f.relative_to(dst).as_posix(): hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(dst.rglob("*"))
        if f.is_file() and f.name != "bundle.json"
    }
    (dst / "bundle.json").write_text(json.dumps(meta))
    return dst


def _peak_rss_mb(cli_args: list, cwd) -> tuple[subprocess.CompletedProcess, float]:
    "Run the CLI's main in a child Python and return its result and peak RSS (MB)."
    code = (
        "import resource, sys\nfrom cyber_moe.cli import main\n"
        "try: rc = main(sys.argv[1:])\nfinally: print(f'PEAK_RSS_KB={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}', file=sys.stderr)\n"
        "sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code, *map(str, cli_args)], capture_output=True, text=True, timeout=180, cwd=cwd)
    kb = [int(l.split("=")[1]) for l in r.stderr.splitlines() if l.startswith("PEAK_RSS_KB=")]
    r.stderr = "\n".join(l for l in r.stderr.splitlines() if not l.startswith("PEAK_RSS_KB="))
    return r, kb[0] / 1024


def test_crafted_net_kwargs_refused_before_allocation(toy):
    """d_head=13000 makes a 13000x13000 head layer: about 680 MB that the old loader allocated before it found that
    weights.pt does not fit. Sizes within ModelConfig's bounds must still describe exactly the tensors of weights.pt."""
    fit, base_mb = _peak_rss_mb(
        ["score", "--model", _crafted(toy["a"], toy["dir"] / "fit", d_head=4096), "--input", toy["csv"]], toy["dir"]
    )
    assert_refused(fit, "weights.pt does not fit net_kwargs")
    r, mb = _peak_rss_mb(["score", "--model", _crafted(toy["a"], toy["dir"] / "wide", d_head=13_000), "--input", toy["csv"]], toy["dir"])
    assert_refused(r, "net_kwargs.d_head")
    assert mb < base_mb + 100, f"refusing the crafted bundle peaked at {mb:.0f} MB, a bundle refused by its shapes at {base_mb:.0f} MB"


# ---- item 5: a truncated pcapng is refused like a truncated pcap -------------------------------------------------------
def _write_capture(path: Path, n_flows: int = 25, t0: float = 1_700_000_000.0) -> Path:
    "n_flows short TCP connections (handshake, request, answer, close), one after the other, as classic pcap."
    S, A, P, F = dpkt.tcp.TH_SYN, dpkt.tcp.TH_ACK, dpkt.tcp.TH_PUSH, dpkt.tcp.TH_FIN
    cli_ip, srv_ip = bytes([10, 0, 1, 5]), bytes([10, 0, 0, 10])
    with open(path, "wb") as f:
        w, t = dpkt.pcap.Writer(f), t0
        for i in range(n_flows):
            sp = 40000 + i
            for src, dst, s, d, fl, n in [
                (cli_ip, srv_ip, sp, 80, S, 0),
                (srv_ip, cli_ip, 80, sp, S | A, 0),
                (cli_ip, srv_ip, sp, 80, A, 0),
                (cli_ip, srv_ip, sp, 80, P | A, 200),
                (srv_ip, cli_ip, 80, sp, P | A, 900),
                (cli_ip, srv_ip, sp, 80, F | A, 0),
                (srv_ip, cli_ip, 80, sp, F | A, 0),
            ]:
                ip = dpkt.ip.IP(src=src, dst=dst, p=6, ttl=64, data=dpkt.tcp.TCP(sport=s, dport=d, flags=fl, win=64240, data=bytes(n)))
                w.writepkt(dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, data=ip), ts=t)
                t += 0.01
            t += 1.0
    return path


def _to_pcapng(src: Path, dst: Path) -> Path:
    with open(src, "rb") as f, open(dst, "wb") as g:
        w = dpkt.pcapng.Writer(g)
        for ts, buf in dpkt.pcap.Reader(f):
            w.writepkt(buf, ts=ts)
    return dst


@pytest.fixture(scope="module")
def nf_bundle(tmp_path_factory):
    "An untrained bundle over NFStream flows of a generated capture (enough to run `cyber-moe score` on captures)."
    from cyber_moe.nfstream import NFSTREAM, pcap_to_flows

    d = tmp_path_factory.mktemp("nf")
    cap = _write_capture(d / "train.pcap")
    flows = pcap_to_flows(cap)
    flows[FAMILY] = np.where(np.arange(len(flows)) % 2, "dos", "benign")
    flows[IS_ATTACK] = (flows[FAMILY] != "benign").astype("int8")
    return {"dir": d, "cap": cap, "model": save_bundle(untrained_bundle(flows, schema=NFSTREAM, model_cfg=SMALL), d / "model", onnx=False)}


def test_truncated_pcapng_is_refused(nf_bundle, cli):
    d = nf_bundle["dir"]
    from cyber_moe.nfstream import check_pcap

    ng = _to_pcapng(nf_bundle["cap"], d / "whole.pcapng")
    whole = ng.read_bytes()
    cut = d / "cut.pcapng"
    cut.write_bytes(whole[: len(whole) * 55 // 100])  # a copy interrupted half-way through
    assert_refused(run_cli(cli, "score", "--model", nf_bundle["model"], "--input", cut), "truncated at byte", "--allow-truncated")
    assert check_pcap(ng) == {"format": "pcapng", "n_packets": 175, "truncated_at": None}
    part = run_cli(cli, "score", "--model", nf_bundle["model"], "--input", cut, "--allow-truncated")
    assert part.returncode == 0, part.stderr[-2000:]


# ---- items 8, 11, 12: hostile data files through `cyber-moe data inspect` ------------------------------------------------
@pytest.fixture(scope="module")
def unsw_head(shared_data) -> tuple[bytes, list[bytes]]:
    "The header and the first 200 rows of the real UNSW-NB15 file, as bytes."
    with open(shared_data / "unsw-nb15" / "UNSW_NB15_training-set.dev80.csv", "rb") as f:
        lines = [f.readline() for _ in range(201)]
    return lines[0], lines[1:]


def test_zip_bomb_is_refused(unsw_head, cli, tmp_path):
    "A zip of a few hundred kB whose one member expands to 256 MB of valid rows (the issue's was 4.2 MB to 1 GB)."
    import zipfile

    header, rows = unsw_head
    block = rows[0] * (2**20 // len(rows[0]))  # one valid row, repeated
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf, zf.open("UNSW_NB15_training-set.csv", "w", force_zip64=True) as fh:
        fh.write(header)
        for _ in range(256 * 2**20 // len(block)):
            fh.write(block)
    assert bomb.stat().st_size < 4 * 2**20
    r = run_cli(cli, "data", "inspect", bomb, timeout=120)
    assert_refused(r, "likely zip bomb", "bomb.zip!UNSW_NB15_training-set.csv")


def test_sparse_file_with_valid_header_is_refused_cleanly(unsw_head, cli, tmp_path):
    "2 GB: a valid header, then a hole (zeros, no line break). The old reader aborted (SIGABRT, exit 134) or hung at exit."
    sparse = tmp_path / "UNSW_NB15_training-set.csv"
    sparse.write_bytes(unsw_head[0])
    os.truncate(sparse, 2 * 2**30)
    for _ in range(3):  # the abort was a race: 2 runs in 3
        r = run_cli(cli, "data", "inspect", sparse, timeout=60)
        assert_refused(r, "no line break in")


def test_escape_sequences_in_labels_do_not_reach_the_terminal(unsw_head, cli, tmp_path):
    header, rows = unsw_head
    evil_label = b"Exploits\x1b]0;pwned\x07\x1b[2J\x1b[31m\xc2\x9b1A\xe2\x80\xae"
    cols = header.decode().strip().split(",")
    i = cols.index("attack_cat")
    lines = []
    for k, line in enumerate(rows[:50]):
        cells = line.rstrip(b"\r\n").split(b",")
        if k % 5 == 0:
            cells[i] = evil_label
        lines.append(b",".join(cells))
    f = tmp_path / "UNSW_NB15_training-set.csv"
    f.write_bytes(header + b"\n".join(lines) + b"\n")
    for args in ([], ["--json"]):
        r = subprocess.run([cli, "data", "inspect", str(f), *args], capture_output=True, timeout=120)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out[-2000:]
        for raw in (b"\x1b", b"\x07", b"\xc2\x9b", b"\xe2\x80\xae"):
            assert raw not in out, (args, raw, out[-1500:])
    assert (
        b"Exploits\\x1b]0;pwned\\x07\\x1b[2J" in subprocess.run([cli, "data", "inspect", str(f)], capture_output=True, timeout=120).stdout
    )


# ---- item 7: the container fails closed; compose publishes on loopback ------------------------------------------------
ENTRYPOINT = Path(__file__).resolve().parent.parent / "deploy" / "docker-entrypoint.sh"
SHOW_KEY = ["sh", "-c", 'echo "started key=[${CYBER_MOE_API_KEY-unset}]"']


def _entry(tmp_path, key_file: bytes | None, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CYBER_MOE_", "PROMETHEUS_MULTIPROC"))}
    if key_file is not None:
        (tmp_path / "api_key").write_bytes(key_file)
        base["CYBER_MOE_API_KEY_FILE"] = str(tmp_path / "api_key")
    return subprocess.run(["sh", str(ENTRYPOINT), *SHOW_KEY], capture_output=True, text=True, timeout=30, env={**base, **env})


@pytest.mark.parametrize(
    "key_file,env",
    [
        (b"", {}),
        (b"\n", {}),
        (b"  \t\n", {}),
        (None, {}),
        (None, {"CYBER_MOE_API_KEY_FILE": "/nonexistent/api_key"}),
        (None, {"CYBER_MOE_API_KEY": " "}),
    ],
)
def test_entrypoint_refuses_to_start_without_a_key(tmp_path, key_file, env):
    r = _entry(tmp_path, key_file, **env)
    assert r.returncode == 78 and "started" not in r.stdout, (r.returncode, r.stdout, r.stderr)
    assert "no API key" in r.stderr and "CYBER_MOE_ALLOW_OPEN" in r.stderr


def test_entrypoint_runs_with_a_key_or_when_told_to_run_open(tmp_path):
    r = _entry(tmp_path, b"s3cret-key\n")
    assert r.returncode == 0 and "started key=[s3cret-key]" in r.stdout, r.stderr
    r = _entry(tmp_path, b"\n", CYBER_MOE_ALLOW_OPEN="true")
    assert r.returncode == 0 and "started key=[unset]" in r.stdout and "WARNING" in r.stderr, r.stderr
    r = _entry(tmp_path, None, CYBER_MOE_API_KEY="from-env")
    assert r.returncode == 0 and "started key=[from-env]" in r.stdout, r.stderr


def test_compose_publishes_ports_on_loopback_by_default():
    import re
    import yaml

    compose = yaml.safe_load((ENTRYPOINT.parent / "docker-compose.yml").read_text())
    published = []
    for name, svc in compose["services"].items():
        assert "CYBER_MOE_ALLOW_OPEN" not in (svc.get("environment") or {}), name
        for p in svc.get("ports", []):
            p = re.sub(r"\$\{(\w+):-([^}]*)\}", lambda m: m[2], str(p))  # compose's ${VAR:-default}, VAR unset
            host = p.rsplit(":", 2)[0] if p.count(":") == 2 else None
            published.append((name, host))
    assert published and all(h == "127.0.0.1" for _, h in published), published


# ---- item 13: models:/ resolves against the configured tracking store, never ./mlflow.db --------------------------------
@pytest.fixture(scope="module")
def registry(toy, tmp_path_factory):
    "A tracking store (SQLite) in which the toy bundle is registered as version 1 of `toy-model`."
    import mlflow
    from cyber_moe.bundle import load_bundle, log_pyfunc, use_mlflow_store

    d = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{d / 'store.db'}"
    with use_mlflow_store(uri):  # MLflow's global store for this fixture only
        mlflow.set_experiment(experiment_id=mlflow.create_experiment("harden", artifact_location=(d / "artifacts").as_uri()))
        with mlflow.start_run():
            log_pyfunc(load_bundle(toy["a"]), example=toy["flows"].head(5), registered_name="toy-model")
    return uri


def score_registered(cli, toy, where, tracking_uri: str | None):
    "`cyber-moe score` of models:/toy-model/1 run in folder `where` (created), with MLFLOW_TRACKING_URI `tracking_uri` (None: unset)."
    where.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update({"MLFLOW_TRACKING_URI": tracking_uri} if tracking_uri else {})
    cmd = [cli, "score", "--model", "models:/toy-model/1", "--input", str(toy["csv"])]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, cwd=where, env=env)


def test_models_uri_resolves_against_the_configured_store(toy, registry, cli, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    r = score_registered(cli, toy, elsewhere, registry)
    assert r.returncode == 0 and "scored 300 flows with toy v1" in r.stdout, r.stderr[-3000:]
    assert not list(elsewhere.iterdir()), list(elsewhere.iterdir())  # nothing written where the command ran


def test_models_uri_without_a_store_is_a_clear_error(toy, cli, root, tmp_path):
    "From another folder, with no MLFLOW_TRACKING_URI: the project's own store (outputs/mlflow.db), and no stray mlflow.db."
    elsewhere = tmp_path / "elsewhere"
    r = score_registered(cli, toy, elsewhere, f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}")
    assert_refused(r, "no MLflow tracking store at", str(tmp_path / "absent" / "mlflow.db"))
    r = score_registered(cli, toy, elsewhere, None)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert str(root / "outputs" / "mlflow.db") in r.stderr or "toy-model" in r.stderr, r.stderr[-2000:]
    assert not (elsewhere / "mlflow.db").exists() and not list(elsewhere.iterdir())
    assert_refused(
        run_cli(cli, "score", "--model", "http://127.0.0.1:9/model", "--input", toy["csv"], cwd=elsewhere),
        "only model folders and models:/ / runs:/ URIs load a model",
    )
