"""Batch-inference speed of the MoE and its experts against LightGBM's predict, measured in the same run.

Random data with the UNSW-NB15 sizes (28 numeric, 3 categorical, 11 timing features, 10 classes) by default.
Rates are flows/s in `torch.inference_mode` at batch 4096 (the fastest of `--reps` timed calls after a warm-up,
the models timed in turn within each repetition: the machine is shared, and the fastest call is the one least
disturbed by other work);
each model's rate is also given as a ratio of the LightGBM rate measured in the same run, since the machine
is shared and absolute numbers move with its load.

    python benchmarks/bench_model.py [--threads 2] [--batch 4096] [--reps 7] [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from cyber_moe.models import MoEClassifier, n_parameters

from common import emit_table

CARDS = [135, 14, 12]  # proto, service, state in the UNSW-NB15 training partition, plus the unknown bucket


def random_flows(n: int, *, n_num: int, n_time: int, seed: int = 0) -> dict[str, np.ndarray]:
    "Standard-normal numeric and timing values, uniform category indices, and a family label that depends on them."
    rng = np.random.default_rng(seed)
    x_num = rng.standard_normal((n, n_num), dtype=np.float32)
    x_time = rng.standard_normal((n, n_time), dtype=np.float32)
    x_cat = np.stack([rng.integers(0, c, n) for c in CARDS], 1).astype(np.int64)
    return {"x_num": x_num, "x_cat": x_cat, "x_time": x_time}


def interleaved_rates(fns: dict[str, callable], n_rows: int, reps: int) -> dict[str, float]:
    "Best flows/s of each `fn()` (its least disturbed call), timing the functions in turn within each repetition."
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: n_rows / min(v) for k, v in times.items()}


def torch_predict(model: torch.nn.Module, x: dict[str, torch.Tensor]):
    "A function scoring `x` with `model` in eval mode under inference_mode."
    model.eval()

    def fn():
        with torch.inference_mode():
            return model(x["x_num"], x["x_cat"], x["x_time"])

    return fn


def lightgbm_predict(
    x: dict[str, np.ndarray], n_classes: int, *, n_rows: int, n_estimators: int, num_leaves: int, threads: int, n_fit: int = 3_000
):
    "Fit a multiclass LightGBM on the same features (categoricals as categorical); returns a function predicting `n_rows`."
    import lightgbm as lgb

    X = np.concatenate([x["x_num"], x["x_cat"].astype(np.float32), x["x_time"]], 1)
    n_num = x["x_num"].shape[1]
    # a label the trees can learn, so they grow to their full size as on real data
    score = X[:, 0] + X[:, n_num + 3] * X[:, 1] + np.sin(X[:, -1] * 3) + 0.5 * (x["x_cat"][:, 1] % 3)
    y = np.digitize(score, np.quantile(score, np.linspace(0, 1, n_classes + 1)[1:-1]))
    clf = lgb.LGBMClassifier(
        n_estimators=n_estimators, num_leaves=num_leaves, learning_rate=0.05, n_jobs=threads, verbose=-1, min_child_samples=5
    )
    clf.fit(X[:n_fit], y[:n_fit], categorical_feature=list(range(n_num, n_num + len(CARDS))))
    Xb = X[-n_rows:]
    return lambda: clf.predict_proba(Xb)


def balance_routing(model: MoEClassifier, x: dict[str, torch.Tensor]) -> None:
    "Shift the gate's logit bias so that the top-1 choice splits `x` about in half (a trained gate's routing is data-dependent)."
    with torch.inference_mode():
        diff = model.gate.logits(model.gate.features(x["x_num"], x["x_cat"], x["x_time"]))
    with torch.no_grad():
        model.gate.logits.bias[0] -= (diff[:, 0] - diff[:, 1]).median()


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--n-classes", type=int, default=10)
    p.add_argument("--lgb-estimators", type=int, default=400)
    p.add_argument("--lgb-leaves", type=int, default=63)
    p.add_argument("--append", type=Path, help="append the result table to this markdown file")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    n_num, n_time = 28, 11
    data = random_flows(max(a.batch, 9_096), n_num=n_num, n_time=n_time)
    batch = {k: torch.from_numpy(v[-a.batch :]) for k, v in data.items()}
    dims = dict(n_num=n_num, cat_cardinalities=CARDS, n_time=n_time, n_classes=a.n_classes)
    variants = [
        ("tabular only (FT-Transformer d_token 32, 2 blocks)", dict(experts=("tabular",))),
        ("temporal only (CNN 96 channels, 3 layers)", dict(experts=("temporal",))),
        ("MoE dense gate (defaults)", dict()),
        ("MoE top-1 gate (defaults)", dict(gate_top_k=1)),
        ("MoE top-1 gate (defaults), half the rows routed to each expert", dict(gate_top_k=1)),
        ("MoE dense, no eval chunking", dict(eval_chunk_size=None)),
        ("MoE dense, current ModelConfig sizes (d_temporal 64, d_head 128)", dict(d_temporal=64, d_head=128)),
        ("MoE dense, d_token 64 x 3 blocks", dict(d_token=64, n_blocks=3)),
    ]
    lgb_name = f"LightGBM {a.lgb_estimators} trees x {a.n_classes} classes, {a.lgb_leaves} leaves: predict_proba"
    fns = {
        lgb_name: lightgbm_predict(
            data, a.n_classes, n_rows=a.batch, n_estimators=a.lgb_estimators, num_leaves=a.lgb_leaves, threads=a.threads
        )
    }
    params = {lgb_name: "-"}
    for name, kw in variants:
        model = MoEClassifier(**dims, **kw)
        if name.endswith("half the rows routed to each expert"):
            balance_routing(model, batch)
        if model.gate is not None and model.gate.sparse:
            with torch.inference_mode():
                share = model(batch["x_num"], batch["x_cat"], batch["x_time"])["gate"][:, 0].gt(0).float().mean()
            name += f" ({share:.0%} of rows to the transformer)"
        fns[name], params[name] = torch_predict(model, batch), f"{n_parameters(model):,d}"
    rates = interleaved_rates(fns, a.batch, a.reps)
    lgb = rates[lgb_name]
    rows = [(n, params[n], r) for n, r in rates.items()]
    lines = [
        f"### bench_model.py, {date.today()} ({a.threads} threads, batch {a.batch}, {platform.machine()}, torch {torch.__version__})",
        "",
        "| model | params | flows/s | vs LightGBM |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {k} | {r:,.0f} | {r / lgb:.2f}x |" for n, k, r in rows]
    return emit_table(lines, a.append)


if __name__ == "__main__":
    main()
