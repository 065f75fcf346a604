"""The packet-sequence expert on a held-out lab session (issue 14), in one run, through the project's own training path.

Four models on one split and one preprocessing (`cyber_moe.train.prepare` of the run config: `params/default.yaml`
by default, train on the first session folder, test on the last, validation rows from the training session):

- MoE without the sequence expert (the config's experts, e.g. the default TabM),
- MoE with it (the same experts plus `sequence`),
- LightGBM on the flow statistics, and LightGBM with the same packets as flat `splt_*` columns.

Both MoEs are trained by `fit_moe` (Lightning, early stopping and checkpoint on validation macro-F1) with the
config's training settings; every model's verdict comes from `evaluate_run` (one operating point chosen on
validation by the config's rule). Reports family macro-F1, detection per family, per tool and per slow-HTTP
variant, the benign false-positive rate, and the MoE's mean gate weight per family; the load average is recorded.

    .venv/bin/python benchmarks/bench_sequence.py --train outputs/seqlab/default-1 --test outputs/seqlab/default-2
    # the bounded run recorded in RESULTS.md (loaded machine), one process per model:
    #   ... --models moe+sequence --epochs 4 --cap-per-family 2500 --out outputs/bench_sequence_moe+sequence.json
Sessions: `cyber-moe lab record --scenario params/lab/default.yaml --seed 1|2` into outputs/seqlab/default-1|2.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from cyber_moe.config import load_config, setup_logging
from cyber_moe.lab import detection_rates
from cyber_moe.train import evaluate_baseline, evaluate_run, fit_moe, fit_run_baseline, prepare

SEQUENCE = {"d_seq": 64, "n_seq_layers": 3, "kernel_size": 3, "dropout": 0.1, "n_packets": 32}


def _experts(cfg) -> dict:
    e = cfg.model.experts
    return dict(e) if isinstance(e, dict) else {n: None for n in e}


def variant_detection(rows, flagged, family: str = "slowhttp") -> dict:
    "Flagged share of each variant of `family` (slowhttptest H = slowloris, B = slow body, X = slow read)."
    fl = np.asarray(flagged, bool)
    out = {}
    for v in sorted(rows.loc[rows["family"] == family, "variant"].astype(str).unique()):
        m = ((rows["family"] == family) & (rows["variant"].astype(str) == v)).to_numpy()
        out[v] = {"n": int(m.sum()), "rate": float(fl[m].mean())}
    return out


def summarise(metrics: dict, pred: dict, rows, classes) -> dict:
    det = detection_rates(rows, np.asarray(pred["is_attack"], bool))
    fam = metrics["family"]
    out = {
        "macro_f1": fam["macro_f1"],
        "f1": {c: v["f1"] for c, v in fam["per_class"].items() if v.get("support")},
        "binary_f1": metrics["binary"]["f1"],
        "threshold": metrics["binary"]["threshold"],
        "detection": {f: v["rate"] for f, v in det["families"].items()},
        "benign_fpr": det["benign_fpr"],
        "tools": {t: v["rate"] for t, v in det["tools"].items()},
        "slowhttp_variants": variant_detection(rows, pred["is_attack"]),
    }
    if "gate" in metrics:
        out["gate"] = metrics["gate"]["per_class"]
    return out


class _NoBaseline:
    "evaluate_run scores a baseline next to the net; the MoE-only runs hand it one that predicts the class prior."

    def __init__(self, prep):
        self.p = np.bincount(prep.arrays["train"]["y_family"], minlength=len(prep.classes)) / len(prep.arrays["train"]["y_family"])
        self.feature_names = []

    def predict_proba(self, X):
        return np.tile(self.p, (len(X), 1))


def evaluate_moe(prep, net, *, rule: str, target_fpr: float) -> tuple[dict, dict]:
    "The MoE half of `cyber_moe.train.evaluate_run` (the net's own validation operating point)."
    m, preds = evaluate_run(prep, net, _NoBaseline(prep), rule=rule, target_fpr=target_fpr)
    return m["model"], preds["model"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True, help="recorded lab session folder to train and validate on")
    ap.add_argument("--test", required=True, help="recorded lab session folder held out for test (another seed)")
    ap.add_argument("--params", default="params/default.yaml")
    ap.add_argument("--epochs", type=int, default=None, help="train.max_epochs (default: the config's)")
    ap.add_argument("--seeds", default="42", help="comma-separated training seeds (each MoE is trained once per seed)")
    ap.add_argument("--out", default="outputs/bench_sequence.json")
    ap.add_argument(
        "--cap-per-family",
        type=int,
        default=None,
        help="train the MoEs on at most this many training rows per family (random, seeded; validation, test and "
        "the preprocessing fit stay as they are): a shorter run on a loaded machine",
    )
    ap.add_argument("--models", default="lightgbm,lightgbm+flat_seq,moe,moe+sequence", help="comma-separated subset to run")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    setup_logging("INFO")  # one line per epoch (EpochLog)
    over = [f"data.paths=[{Path(a.train).resolve()},{Path(a.test).resolve()}]", "run_name=bench-sequence", "split.strategy=session"]
    if a.epochs:
        over.append(f"train.max_epochs={a.epochs}")
    base_cfg = load_config(a.params, over)
    plain = _experts(base_cfg)
    plain.pop("sequence", None)
    with_seq = {**plain, "sequence": SEQUENCE}
    cfg_seq = base_cfg.model_copy(update={"model": base_cfg.model.model_copy(update={"experts": with_seq})})
    t0 = time.perf_counter()
    prep = prepare(cfg_seq)  # one split, one preprocessing (with sequence scaling) for all four models
    test_rows = prep.rows("test")
    res = {
        "params": a.params,
        "train": str(a.train),
        "test": str(a.test),
        "classes": prep.classes,
        "rows": {s: int(len(getattr(prep.split, s))) for s in ("train", "val", "test")},
        "prepare_s": round(time.perf_counter() - t0, 1),
        "experts": {"moe": plain, "moe+sequence": with_seq},
        "max_epochs": base_cfg.train.max_epochs,
        "load_before": os.getloadavg(),
        "models": {},
    }
    run = set(a.models.split(","))
    print("prepared", res["rows"], flush=True)
    prep_moe = prep
    if a.cap_per_family:
        from dataclasses import replace as dc_replace

        rng = np.random.default_rng(0)
        fam = prep.rows("train")["family"].astype(str).to_numpy()
        keep = np.sort(np.concatenate([rng.permutation(np.flatnonzero(fam == f))[: a.cap_per_family] for f in np.unique(fam)]))
        split = dc_replace(prep.split, train=prep.split.train[keep]) if hasattr(prep.split, "__dataclass_fields__") else prep.split
        if split is prep.split:
            raise SystemExit("--cap-per-family: the split is not a dataclass")
        prep_moe = dc_replace(prep, split=split, arrays={**prep.arrays, "train": {k: v[keep] for k, v in prep.arrays["train"].items()}})
        res["moe_train_rows"] = int(len(keep))
        res["cap_per_family"] = a.cap_per_family
        print("MoE training rows capped:", len(keep), flush=True)

    for name, n_seq in (("lightgbm", 0), ("lightgbm+flat_seq", prep.schema.sequence)):
        if name not in run:
            continue
        t = time.perf_counter()
        b = fit_run_baseline(base_cfg, prep, sequence=n_seq)
        train_s = time.perf_counter() - t
        mb, pb = evaluate_baseline(prep, b, rule=base_cfg.train.operating_point, target_fpr=base_cfg.train.target_fpr)
        res["models"][name] = {
            **summarise(mb, pb, test_rows, prep.classes),
            "n_features": b.n_features,
            "train_s": round(train_s, 1),
            "best_iteration": b.best_iteration,
            "load": os.getloadavg(),
        }
        print(name, round(res["models"][name]["macro_f1"], 4), flush=True)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1, default=float))
    for seed in [int(s) for s in a.seeds.split(",")]:
        for name, experts in (("moe", plain), ("moe+sequence", with_seq)):
            if name not in run:
                continue
            cfg = base_cfg.model_copy(
                update={
                    "seed": seed,
                    "run_name": f"bench-sequence-{name.replace('+', '-')}-{seed}",
                    "model": base_cfg.model.model_copy(update={"experts": experts}),
                }
            )
            t = time.perf_counter()
            fit = fit_moe(cfg, prep_moe, enable_progress_bar=False)
            train_s = time.perf_counter() - t
            m = evaluate_moe(prep, fit.net, rule=cfg.train.operating_point, target_fpr=cfg.train.target_fpr)
            key = name if len(a.seeds.split(",")) == 1 else f"{name} seed {seed}"
            res["models"][key] = {
                **summarise(m[0], m[1], test_rows, prep.classes),
                "train_s": round(train_s, 1),
                "epochs": fit.epochs,
                "best_epoch": fit.best_epoch,
                "best_val_macro_f1": fit.best_score,
                "load": os.getloadavg(),
            }
            print(key, round(res["models"][key]["macro_f1"], 4), f"{train_s:.0f}s", flush=True)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(res, indent=1, default=float))
    res["load_after"] = os.getloadavg()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1, default=float))
    print_tables(res)


def print_tables(res: dict) -> None:
    m, classes = res["models"], res["classes"]
    att = [c for c in classes if c != "benign"]
    print("\n| model | family macro-F1 | " + " | ".join(f"{c} det." for c in att) + " | benign FPR | slow read (X) |")
    print("|---|---|" + "---|" * (len(att) + 2))
    for k, v in m.items():
        x = v["slowhttp_variants"].get("X", {}).get("rate", float("nan"))
        print(
            f"| {k} | {v['macro_f1']:.3f} | "
            + " | ".join(f"{v['detection'].get(c, float('nan')):.3f}" for c in att)
            + f" | {v['benign_fpr']:.4f} | {x:.2f} |"
        )
    for k, v in m.items():
        if "gate" not in v:
            continue
        ex = list(next(iter(v["gate"].values())))
        print(f"\n{k}: mean gate weight per family\n| family | " + " | ".join(ex) + " |\n|---|" + "---|" * len(ex))
        for c, gw in v["gate"].items():
            print(f"| {c} | " + " | ".join(f"{gw[e]:.2f}" for e in ex) + " |")


if __name__ == "__main__":
    main()
