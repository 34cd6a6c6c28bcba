#!/usr/bin/env python3
"""The accuracy table: runs `prescient forecast backtest` on every dataset `datasets.py` built,
once for the shipped forecaster (model + per-series selection) and once per forecaster alone,
scores each on the test split with score_backtest.py and writes models/ACCURACY.md.
Standard library only.

    python3 models/evaluate.py [--prescient target/release/prescient] [--data target/forecast-data]

Pooled figures weigh every dataset equally (the mean of the per-dataset MASE and pinball), so
174 Azure functions do not drown NASA, Twitter and the LLM traces.
"""
import argparse
import concurrent.futures
import datetime
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import score_backtest  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINES = ["naive", "seasonal-naive", "moving-average", "ewma", "holt-winters"]
HORIZONS = [1, 5, 15]


def run(prescient, d, method, out):
    path = os.path.join(out, f"{d['name']}.{method or 'shipped'}.csv")
    cmd = [prescient, "forecast", "backtest", "--csv", d["file"], "--step", str(d["step"]),
           "--horizons", ",".join(map(str, HORIZONS))]
    if method:
        cmd += ["--method", method]
    with open(path, "w") as f:
        subprocess.run(cmd, stdout=f, check=True)
    data = score_backtest.series(d["file"])
    return d["name"], method or "shipped", score_backtest.score(data, path)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--prescient", default=os.path.join(HERE, "..", "target", "release", "prescient"))
    p.add_argument("--data", default=os.path.join(HERE, "..", "target", "forecast-data"))
    p.add_argument("--table", default=os.path.join(HERE, "ACCURACY.md"))
    p.add_argument("--methods", default="shipped,model," + ",".join(BASELINES))
    a = p.parse_args()
    datasets = json.load(open(os.path.join(a.data, "datasets.json")))
    out = os.path.join(a.data, "backtests")
    os.makedirs(out, exist_ok=True)
    methods = [None if m == "shipped" else m for m in a.methods.split(",")]
    jobs = [(d, m) for d in datasets for m in methods]
    res = {}
    with concurrent.futures.ThreadPoolExecutor(max(1, os.cpu_count() or 1)) as pool:
        for name, method, s in pool.map(lambda j: run(a.prescient, j[0], j[1], out), jobs):
            res[(name, method)] = s
            print(f"{name} {method}: " + "  ".join(
                f"h={h} MASE {s[h][0]:.3f} pin {s[h][1]:.3f}" for h in sorted(s)), file=sys.stderr)
    names = [d["name"] for d in datasets]
    cols = [m or "shipped" for m in methods]
    baselines = [c for c in cols if c in BASELINES]
    lines = [
        "# Forecast accuracy on the test split",
        "",
        f"Written by `models/evaluate.py` on {datetime.date.today()} from `prescient forecast backtest`"
        " (the node's code path). MASE: test-split MAE over the series' in-sample one-step naive"
        " MAE on train; pinball: q = 0.9 loss of the q90 column, scaled the same way. `shipped`"
        " is the model with per-series selection among it and the baselines; `model` is the"
        " ONNX model alone. Pooled: every dataset weighted equally. Ratio: shipped over the best"
        " baseline (the best on that row).",
        "",
    ]
    for h in HORIZONS:
        lines += [f"## h = {h}", "",
                  "| dataset | test targets | " + " | ".join(f"{c} MASE" for c in cols)
                  + " | ratio | shipped pinball | best baseline pinball |",
                  "|---" * (len(cols) + 5) + "|"]
        pooled = {c: [0.0, 0.0] for c in cols}
        for n in names:
            row = {c: res[(n, c)].get(h) for c in cols}
            if any(v is None for v in row.values()):
                continue
            for c in cols:
                pooled[c][0] += row[c][0] / len(names)
                pooled[c][1] += row[c][1] / len(names)
            best = min(baselines, key=lambda c: row[c][0])
            bestp = min(row[c][1] for c in baselines)
            lines.append(f"| {n} | {row['shipped'][2]} | " + " | ".join(
                f"{row[c][0]:.3f}" for c in cols)
                + f" | {row['shipped'][0] / row[best][0]:.3f} ({best})"
                + f" | {row['shipped'][1]:.3f} | {bestp:.3f} |")
        best = min(baselines, key=lambda c: pooled[c][0])
        bestp = min(pooled[c][1] for c in baselines)
        lines.append("| **pooled** | | " + " | ".join(f"{pooled[c][0]:.3f}" for c in cols)
                     + f" | **{pooled['shipped'][0] / pooled[best][0]:.3f}** ({best})"
                     + f" | {pooled['shipped'][1]:.3f} | {bestp:.3f} |")
        lines.append("")
    open(a.table, "w").write("\n".join(lines))
    print(f"wrote {a.table}", file=sys.stderr)


if __name__ == "__main__":
    main()
