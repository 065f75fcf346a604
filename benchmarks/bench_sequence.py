"""The packet-sequence expert on a held-out lab session (issue 14), in one run:

MoE without / with the sequence expert, LightGBM without / with the same sequence numbers as flat columns.
Train on one recorded session (85 % fit, 15 % validation for early stopping / best epoch), test on another.
Reports family macro-F1, per-family detection (share of a family's flows given any attack family) and the
MoE's mean gate weight per family.

    .venv/bin/python benchmarks/bench_sequence.py --train outputs/seqlab/default-1 --test outputs/seqlab/default-2
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from cyber_moe.baseline import categorical_indices, class_weights, fit_baseline, stack_features
from cyber_moe.evaluate import family_metrics, gate_usage
from cyber_moe.features import Preprocessor
from cyber_moe.lab import LAB, LAB_SEQUENCE, read_session
from cyber_moe.models import MoEClassifier


def split_val(df: pd.DataFrame, frac: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    "Stratified (by family) positions of fit and validation rows."
    rng = np.random.default_rng(seed)
    val = np.concatenate([rng.choice(g, max(1, int(round(len(g) * frac))), replace=False)
                          for g in df.groupby("family").indices.values() if len(g) > 1])
    fit = np.setdiff1d(np.arange(len(df)), val)
    return fit, np.sort(val)


def _tensors(arr: dict, names, rows=None) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(arr[k] if rows is None else arr[k][rows])) for k in names]


def predict_moe(net: MoEClassifier, arr: dict, names) -> tuple[np.ndarray, np.ndarray]:
    "(family probabilities, gate weights) over all rows."
    net.eval()
    p, g = [], []
    with torch.inference_mode():
        for s in range(0, len(arr["x_num"]), 4096):
            out = net(*_tensors(arr, names, slice(s, s + 4096)))
            p.append(out["family"].softmax(-1).numpy()); g.append(out["gate"].numpy())
    return np.concatenate(p), np.concatenate(g)


def train_moe(experts: dict, arr_fit, y_fit, arr_val, y_val, pre: Preprocessor, *, epochs: int, seed: int,
              batch: int = 256, lr: float = 2e-3) -> tuple[MoEClassifier, dict]:
    "A plain AdamW loop (family CE with balanced class weights + binary BCE + 0.01 load balance); the epoch of best validation macro-F1 is kept."
    torch.manual_seed(seed)
    names = ("x_num", "x_cat", "x_time") + (("x_seq",) if "sequence" in experts else ())
    C = len(pre.classes)
    net = MoEClassifier(n_num=arr_fit["x_num"].shape[1], cat_cardinalities=pre.cat_cardinalities, n_time=arr_fit["x_time"].shape[1],
                        n_classes=C, experts=experts, d_head=128, d_gate=32)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    w = torch.tensor(class_weights(y_fit, C), dtype=torch.float32)
    y_t, yb_t = torch.from_numpy(y_fit), torch.from_numpy((y_fit != 0).astype(np.float32))
    rng = np.random.default_rng(seed)
    best, best_state, hist = -1.0, None, []
    for ep in range(epochs):
        net.train()
        perm = rng.permutation(len(y_fit))
        for s in range(0, len(perm), batch):
            r = perm[s:s + batch]
            if len(r) < 2: continue
            out = net(*_tensors(arr_fit, names, r))
            loss = (F.cross_entropy(out["family"], y_t[r], weight=w) + F.binary_cross_entropy_with_logits(out["binary"], yb_t[r])
                    + 0.01 * out["aux_loss"])
            opt.zero_grad(); loss.backward(); opt.step()
        p, _ = predict_moe(net, arr_val, names)
        f1 = family_metrics(y_val, p, pre.classes)["macro_f1"]
        hist.append(round(f1, 4))
        if f1 > best: best, best_state = f1, {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(best_state)
    return net, {"val_macro_f1_per_epoch": hist, "best_val_macro_f1": best}


def summarise(y, p, classes, families) -> dict:
    "Family macro-F1 and per-family detection (share of the family's flows given an attack family; for benign, flagged share)."
    m = family_metrics(y, p, classes)
    pred = p.argmax(1)
    det = {c: float((pred[y == i] != 0).mean()) for i, c in enumerate(classes) if (y == i).any()}
    return {"macro_f1": m["macro_f1"], "detection": det, "f1": {c: v["f1"] for c, v in m["per_class"].items() if v["support"]}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train", required=True); ap.add_argument("--test", required=True)
    ap.add_argument("--epochs", type=int, default=8); ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="outputs/bench_sequence.json")
    ap.add_argument("--models", default="lightgbm,lightgbm+flat_seq,moe,moe+sequence", help="comma-separated subset to run")
    a = ap.parse_args(argv)
    torch.set_num_threads(2)
    train, info_tr = read_session(a.train)
    test, info_te = read_session(a.test)
    schema = replace(LAB, sequence=LAB_SEQUENCE)
    fit_rows, val_rows = split_val(train, 0.15, a.seed)
    fit_df, val_df = train.iloc[fit_rows].reset_index(drop=True), train.iloc[val_rows].reset_index(drop=True)
    pre = Preprocessor(schema=schema).fit(fit_df)
    classes = pre.classes
    test = test[test["family"].isin(classes)].reset_index(drop=True)
    arrs = {k: pre.transform(d, where=k) for k, d in (("fit", fit_df), ("val", val_df), ("test", test))}
    ys = {k: pre.encode_targets(d)["y_family"] for k, d in (("fit", fit_df), ("val", val_df), ("test", test))}
    res = {"train": info_tr["session"], "test": info_te["session"], "n_fit": len(fit_df), "n_val": len(val_df), "n_test": len(test),
           "classes": classes, "sequence": LAB_SEQUENCE, "epochs": a.epochs, "models": {}}
    fams = classes

    # LightGBM without / with the flat sequence columns (the raw splt values: trees need no scaling)
    seq_cols = list(schema.sequence_columns)
    run = set(a.models.split(","))
    for name, extra in (("lightgbm", False), ("lightgbm+flat_seq", True)):
        if name not in run: continue
        X = {k: stack_features(arrs[k]) for k in arrs}
        if extra:
            raw = {"fit": fit_df, "val": val_df, "test": test}
            X = {k: np.concatenate([X[k], raw[k][seq_cols].to_numpy(np.float32)], 1) for k in X}
        t0 = time.perf_counter()
        b = fit_baseline(X_train=X["fit"], y_train=ys["fit"], X_val=X["val"], y_val=ys["val"], categorical_idx=categorical_indices(schema),
                         n_classes=len(classes), classes=classes, class_weight="balanced", seed=a.seed)
        res["models"][name] = {**summarise(ys["test"], b.predict_proba(X["test"]), classes, fams),
                               "n_features": X["fit"].shape[1], "train_s": round(time.perf_counter() - t0, 1)}
        print(name, round(res["models"][name]["macro_f1"], 4), flush=True)

    small_tab = {"d_token": 32, "n_blocks": 1, "n_heads": 4}
    for name, experts in (("moe", {"tabular": small_tab, "temporal": {"d_temporal": 32}}),
                          ("moe+sequence", {"tabular": small_tab, "temporal": {"d_temporal": 32},
                                            "sequence": {"d_seq": 48, "n_packets": LAB_SEQUENCE}})):
        if name not in run: continue
        t0 = time.perf_counter()
        net, hist = train_moe(experts, arrs["fit"], ys["fit"], arrs["val"], ys["val"], pre, epochs=a.epochs, seed=a.seed)
        names = ("x_num", "x_cat", "x_time") + (("x_seq",) if "sequence" in experts else ())
        p, g = predict_moe(net, arrs["test"], names)
        res["models"][name] = {**summarise(ys["test"], p, classes, fams), **hist, "train_s": round(time.perf_counter() - t0, 1),
                               "gate": gate_usage(g, ys["test"], classes, list(net.experts))["per_class"]}
        print(name, round(res["models"][name]["macro_f1"], 4), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=1))
    m = res["models"]
    if not m: return
    print("\n| model | family macro-F1 | " + " | ".join(f"{c} det." for c in classes if c != "benign") + " | benign flagged |")
    print("|---|---|" + "---|" * len(classes))
    for k, v in m.items():
        print(f"| {k} | {v['macro_f1']:.3f} | " + " | ".join(f"{v['detection'].get(c, float('nan')):.3f}" for c in classes if c != "benign")
              + f" | {v['detection'].get('benign', float('nan')):.3f} |")
    if "gate" in m.get("moe+sequence", {}):
        ex = list(next(iter(m["moe+sequence"]["gate"].values())))
        print("\n| family | " + " | ".join(ex) + " |\n|---|" + "---|" * len(ex))
        for c, gw in m["moe+sequence"]["gate"].items(): print(f"| {c} | " + " | ".join(f"{gw[e]:.2f}" for e in ex) + " |")


if __name__ == "__main__":
    main()
