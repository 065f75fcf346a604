"""UNSW-NB15 targets of the MoE issue, measured in one run on this machine:

- test split: MoE family macro-F1 vs the LightGBM baseline's, binary F1 gap (model - baseline), both models' verdicts
  by the same rule (cyber_moe.evaluate.decide) at their own validation operating points; family macro-F1 again with
  each model's lean towards rare families chosen the same way on validation (`choose_family_tilt`), and the hybrid row
  (the mean of the two models' distributions, its own validation operating point);
- with value encodings (model.numeric.target_encoding), LightGBM given the same encodings, as a row of its own;
- seconds per training epoch (about 43k training rows);
- batch scoring through the MLflow pyfunc (raw rows in) in flows/s, as a ratio to LightGBM's predict rate
  on the same preprocessed rows measured in the same run.

Usage: .venv/bin/python benchmarks/bench_unsw.py [--epochs N] [--outputs DIR] [KEY=VALUE ...]
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=None, help="train.max_epochs (default: the params file's)")
    ap.add_argument("--outputs", default=str(ROOT / "outputs" / "bench"))
    ap.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = ap.parse_args()

    import mlflow
    import pandas as pd
    from cyber_moe.baseline import Baseline, measure_predict_rate, sequence_length_of
    from cyber_moe.config import load_config, write_json
    from cyber_moe.train import baseline_matrix, evaluate_baseline, fit_run_baseline, load_prepared, train_run

    cfg = load_config(
        ROOT / "params" / "unsw-nb15.yaml",
        [f"outputs_dir={args.outputs}", *([f"train.max_epochs={args.epochs}"] if args.epochs else []), *args.overrides],
    )
    t0 = time.perf_counter()
    metrics = train_run(cfg, enable_progress_bar=False, register=False)
    total = time.perf_counter() - t0
    training = json.loads((cfg.run_dir / "training.json").read_text())

    prep = load_prepared(cfg)
    raw = prep.rows("test").drop(columns=["family", "is_attack"])
    model = mlflow.pyfunc.load_model(str(cfg.run_dir / "model"))
    model.predict(raw.head(512))
    t = time.perf_counter()
    reps = 0
    while time.perf_counter() - t < 3 or reps < 2:
        model.predict(raw)
        reps += 1
    moe_rate = reps * len(raw) / (time.perf_counter() - t)
    base = Baseline.load(cfg.run_dir / "baseline")
    X = baseline_matrix(prep, "test", sequence_length_of(base.feature_names))
    lgb_rate = measure_predict_rate(base.predict_proba, X)

    m, b = metrics["model"], metrics["baseline"]
    rows = {
        "family macro-F1": (m["family"]["macro_f1"], b["family"]["macro_f1"]),
        "  each tilted": (m["family"]["macro_f1_tilted"], b["family"]["macro_f1_tilted"]),
        "binary F1": (m["binary"]["f1"], b["binary"]["f1"]),
        "PR-AUC": (m["binary"]["pr_auc"], b["binary"]["pr_auc"]),
        "FPR @99% recall": (m["binary"]["fpr_at_recall_99"], b["binary"]["fpr_at_recall_99"]),
    }
    print(f"UNSW-NB15 dev file, test split {len(raw):,} flows; run {total:.0f} s; {training['n_parameters']:,} parameters")
    print(f"{'metric':<18}{'MoE':>10}{'LightGBM':>10}{'MoE-LGBM':>10}")
    for k, (x, y) in rows.items():
        print(f"{k:<18}{x:>10.4f}{y:>10.4f}{x - y:>+10.4f}")
    print(
        f"epochs {training['epochs']} (best {training['best_epoch']}), {training['seconds_per_epoch']:.1f} s/epoch over {training['train_rows']:,} rows"
    )
    print(
        f"scoring raw rows via pyfunc: {moe_rate:,.0f} flows/s; LightGBM predict on preprocessed rows: {lgb_rate:,.0f} flows/s; "
        f"ratio {moe_rate / lgb_rate:.2f}"
    )
    per_class = pd.DataFrame(
        {
            "MoE": {c: v["f1"] for c, v in m["family"]["per_class"].items()},
            "LightGBM": {c: v["f1"] for c, v in b["family"]["per_class"].items()},
        }
    )
    print(per_class.round(3).to_string())
    print(
        f"operating points (validation, rule {m['operating_point']['rule']}): MoE threshold {m['operating_point']['threshold']:.4f}, "
        f"LightGBM {b['operating_point']['threshold']:.4f}"
    )
    print(
        "tilted: the attack families reweighted by training prior ** -tau, tau chosen on validation family macro-F1 for "
        f"each model (cyber_moe.evaluate.choose_family_tilt): MoE tau {m['family']['tilt']['tau']:+.2f}, "
        f"LightGBM {b['family']['tilt']['tau']:+.2f}"
    )
    h = metrics["hybrid"]
    print(
        f"hybrid (mean of the two distributions; measured, not served): family macro-F1 {h['family']['macro_f1']:.4f} "
        f"(tilted {h['family']['macro_f1_tilted']:.4f}), binary F1 {h['binary']['f1']:.4f}, "
        f"FPR @99% recall {h['binary']['fpr_at_recall_99']:.4f}"
    )
    if prep.preprocessor.encoded_columns:  # for transparency: LightGBM given the network's value encodings too
        te, _ = evaluate_baseline(
            prep, fit_run_baseline(cfg, prep, encodings=True), rule=cfg.train.operating_point, target_fpr=cfg.train.target_fpr
        )
        metrics["baseline_with_encodings"] = te
        write_json(cfg.run_dir / "bench_extra.json", {"baseline_with_encodings": te})
        print(
            f"LightGBM given the same value encodings (not the baseline): family macro-F1 {te['family']['macro_f1']:.4f}, "
            f"binary F1 {te['binary']['f1']:.4f}, FPR @99% recall {te['binary']['fpr_at_recall_99']:.4f}"
        )
    targets = {
        "macro-F1 >= LightGBM + 0.02": m["family"]["macro_f1"] >= b["family"]["macro_f1"] + 0.02,
        "binary F1 >= LightGBM - 0.003": m["binary"]["f1"] >= b["binary"]["f1"] - 0.003,
        "FPR@99% recall <= 1.2 x LightGBM": m["binary"]["fpr_at_recall_99"] <= 1.2 * b["binary"]["fpr_at_recall_99"],
        "pyfunc >= 20,000 flows/s": moe_rate >= 20_000,
        "epoch < 30 s": training["seconds_per_epoch"] < 30,
    }
    for k, ok in targets.items():
        print(f"target {k}: {'met' if ok else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
