"""Seconds to explain one flow (`cyber_moe.explain.explain_flow`) against the bundle's plain predict of the same flow.

A bundle over the real UNSW-NB15 rows (../shared/data): the preprocessing fitted on 5,000 rows, a network of the
default `ModelConfig` sizes (untrained unless --bundle names a trained one: with a dense gate the cost does not
depend on the weights), a background of 100 training rows. For each background size, every one of `--flows` flows
is explained and predicted one at a time, in turn, so that both share the machine's load; the table gives the
median seconds per flow and the ratio explain / predict measured in the same run.

    python benchmarks/bench_explain.py [--threads 2] [--flows 15] [--bundle DIR] [--append benchmarks/RESULTS.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from datetime import date
from pathlib import Path

import torch

from cyber_moe.bundle import ModelBundle, load_model_bundle
from cyber_moe.config import ModelConfig
from cyber_moe.data import load_flows
from cyber_moe.explain import attach_background, bundle_background, explain_flow, make_background
from cyber_moe.features import Preprocessor
from cyber_moe.models import MoEClassifier, n_parameters
from cyber_moe.schema import get_schema

from common import emit_table

ROOT = Path(__file__).resolve().parent.parent
UNSW = ROOT.parent / "shared" / "data" / "unsw-nb15" / "UNSW_NB15_training-set.dev80.csv"


def default_bundle(train) -> ModelBundle:
    "A bundle of the default ModelConfig sizes over UNSW-NB15, preprocessing fitted on `train`, untrained weights."
    schema = get_schema("unsw-nb15")
    pre = Preprocessor(schema=schema).fit(train)
    torch.manual_seed(0)
    dims = dict(
        n_num=len(schema.numeric), cat_cardinalities=list(pre.cat_cardinalities), n_time=len(schema.timing), n_classes=len(pre.classes)
    )
    net = MoEClassifier.from_config(ModelConfig(), **dims)
    kw = {**dims, **ModelConfig().model_dump(exclude={"load_balance_weight"})}
    return ModelBundle(schema=schema, preprocessor=pre, net=net, net_kwargs=kw, name="bench-explain")


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--flows", type=int, default=15)
    p.add_argument("--backgrounds", type=int, nargs="+", default=[10, 25, 50, 100])
    p.add_argument(
        "--bundle", type=Path, help="a trained bundle folder or MLflow model (UNSW-NB15 schema); default: untrained, default sizes"
    )
    p.add_argument("--data", type=Path, default=UNSW)
    p.add_argument("--append", type=Path, help="append the result table to this markdown file")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    df, _ = load_flows("unsw-nb15", [a.data])
    df = df.sample(frac=1.0, random_state=0).reset_index(drop=True)
    train, flows = df.iloc[:5000], df.iloc[5000 : 5000 + a.flows]
    b = load_model_bundle(a.bundle) if a.bundle else default_bundle(train)
    if bundle_background(b) is None:
        attach_background(b, make_background(train, schema=b.schema, n=100, seed=0))
    load_before = os.getloadavg()[0]
    for i in range(2):
        explain_flow(b, flows.iloc[[i]], n_background=10)
        b.predict(flows.iloc[[i]])  # warm-up
    times = {n: {"explain": [], "predict": []} for n in a.backgrounds}
    for i in range(len(flows)):
        row = flows.iloc[[i]]
        for n in a.backgrounds:
            t0 = time.perf_counter()
            explain_flow(b, row, top_k=10, n_background=n)
            times[n]["explain"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            b.predict(row)
            times[n]["predict"].append(time.perf_counter() - t0)
    n_feat = len(b.schema.features)
    lines = [
        f"### bench_explain.py, {date.today()} ({a.threads} thread{'s' if a.threads != 1 else ''}, {platform.machine()}, torch {torch.__version__})",
        "",
        f"{'bundle ' + str(a.bundle) if a.bundle else 'UNSW-NB15 schema, default ModelConfig sizes, untrained'}: "
        f"{n_parameters(b.net):,d} parameters, {n_feat} raw features, {len(flows)} real flows explained one at a time "
        f"(p_attack, top 10, one antithetic permutation); load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after.",
        "",
        "| background rows | network rows per flow | explain_flow s/flow | predict s/flow | explain / predict |",
        "|---|---|---|---|---|",
    ]
    for n, t in times.items():
        ex, pr = statistics.median(t["explain"]), statistics.median(t["predict"])
        lines.append(f"| {n} | {2 * (n_feat - 1) * n + n + 1:,d} | {ex:.3f} | {pr:.4f} | x{ex / pr:,.0f} |")
    return emit_table(lines, a.append)


if __name__ == "__main__":
    main()
