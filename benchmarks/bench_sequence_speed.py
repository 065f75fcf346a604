"""Scoring speed with packet sequences (issue 14): pcap -> verdicts against NFStream's own flows/s, and pyfunc batch scoring.

On one recorded lab capture (default: the held-out session of bench_sequence.py), in the same run:
NFStream alone without and with `splt_analysis=32`, `score_pcap` with the default model plus the sequence expert and
with the default model alone (these four alternate for `--rounds` rounds: medians, and ratios within each round),
and batch scoring of the metered flows through the MLflow pyfunc (ONNX Runtime, its default, and torch) and the
bundle itself on ONNX Runtime, all on 2 threads. Untrained weights: inference costs what a trained model's costs.
The sequence expert's settings are those of `--sequence-params` (params/lab-sequence.yaml). The load average before
and after is recorded (the machine is shared).

    .venv/bin/python benchmarks/bench_sequence_speed.py --session outputs/seqlab/default-2 [--params params/default.yaml]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from cyber_moe.alerts import score_pcap
from cyber_moe.bundle import save_pyfunc
from cyber_moe.config import load_config
from cyber_moe.lab import LAB_SEQUENCE, read_session
from cyber_moe.nfstream import pcap_to_flows
from cyber_moe.testing import untrained_bundle
from cyber_moe.train import lab_schema


def best_of(fn, repeats: int):
    "(result, best seconds of `repeats` calls)."
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--session", default="outputs/seqlab/default-2")
    ap.add_argument("--params", default="params/default.yaml")
    ap.add_argument("--sequence-params", default="params/lab-sequence.yaml", help="run whose sequence expert is measured")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many calls for the batch-scoring steps")
    ap.add_argument("--rounds", type=int, default=7, help="alternated rounds of the pcap steps (medians reported)")
    ap.add_argument("--out", default="outputs/bench_sequence_speed.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    cfg = load_config(a.params)
    pcap = Path(a.session) / "capture.pcap"
    flows_lab, _ = read_session(a.session)
    e = cfg.model.experts
    plain = dict(e) if isinstance(e, dict) else {n: None for n in e}
    sequence = dict(load_config(a.sequence_params).model.experts)["sequence"]
    bundles = {}
    for name, experts, seq in (("default", plain, 0), ("default+sequence", {**plain, "sequence": sequence}, LAB_SEQUENCE)):
        mc = cfg.model.model_copy(update={"experts": experts})
        b = untrained_bundle(flows_lab, schema=lab_schema(cfg.data.lab_dst_port, sequence=seq), model_cfg=mc, name=name)
        b.threshold = float(np.median(b.predict(flows_lab.head(4000))["p_attack"]))
        bundles[name] = b
    res = {"session": str(a.session), "sequence_expert": sequence, "load_before": os.getloadavg(), "rows": {}, "torch_threads": 2}

    def row(key, n, s):
        res["rows"][key] = {"flows": n, "seconds": round(s, 3), "flows_per_s": round(n / s, 1)}
        print(key, res["rows"][key], flush=True)

    # the pcap steps alternate, round after round, and each round gives its own ratios: on a shared 2-core machine the
    # speed drifts by tens of percent within minutes, and a ratio of two steps measured minutes apart measures the drift
    pcap_steps = {
        "nfstream": lambda: pcap_to_flows(pcap, allow_truncated=True),
        "nfstream splt=32": lambda: pcap_to_flows(pcap, allow_truncated=True, splt=LAB_SEQUENCE),
        **{f"score_pcap {name}": (lambda b=b: score_pcap(b, pcap, allow_truncated=True)) for name, b in bundles.items()},
    }
    warm = {k: f() for k, f in pcap_steps.items()}  # warm-up; its flows are kept for the batch-scoring steps
    times: dict[str, list] = {k: [] for k in pcap_steps}
    for _ in range(a.rounds):
        for k, f in pcap_steps.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    for k, ts in times.items():
        row(k, len(warm[k]), statistics.median(ts))
        res["rows"][k]["rounds_seconds"] = [round(t, 3) for t in ts]
    flows_s = warm["nfstream splt=32"]
    import mlflow

    with tempfile.TemporaryDirectory() as d:
        for name, b in bundles.items():
            save_pyfunc(b, Path(d) / name, example=flows_s.head(5))
            model = mlflow.pyfunc.load_model(str(Path(d) / name))  # ONNX Runtime: the saved bundle carries its checked graph
            _, s = best_of(lambda: model.predict(flows_s), a.repeats)
            row(f"pyfunc {name} (ONNX Runtime)", len(flows_s), s)
            _, s = best_of(lambda: model.predict(flows_s, params={"runtime": "torch"}), a.repeats)
            row(f"pyfunc {name} (torch)", len(flows_s), s)
            b.use_onnx(threads=2)
            _, s = best_of(lambda: b.predict(flows_s), a.repeats)
            row(f"bundle.predict {name} (ONNX Runtime)", len(flows_s), s)
            b.runtime = None
            arrays = b.preprocessor.transform(flows_s)
            _, s = best_of(lambda: b.preprocessor.transform(flows_s), a.repeats)
            row(f"  preprocessing only {name}", len(flows_s), s)
            _, s = best_of(lambda: b.predict_arrays(arrays), a.repeats)
            row(f"  network only {name} (torch)", len(flows_s), s)

    def ratio(step, against):  # median over rounds of NFStream's time / the step's time in the same round
        return round(statistics.median([n / s for n, s in zip(times[against], times[step])]), 3)

    res["ratio_score_pcap_seq_vs_nfstream_splt"] = ratio("score_pcap default+sequence", "nfstream splt=32")
    res["ratio_score_pcap_seq_vs_nfstream"] = ratio("score_pcap default+sequence", "nfstream")
    res["ratio_score_pcap_default_vs_nfstream"] = ratio("score_pcap default", "nfstream")
    res["rounds"] = a.rounds
    res["load_after"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "rows"}, indent=1))


if __name__ == "__main__":
    main()
