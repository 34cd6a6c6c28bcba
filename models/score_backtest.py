#!/usr/bin/env python3
"""Scores `prescient forecast backtest` output against its input CSV, per horizon, pooled over
the series: MASE (mean absolute error over the test split, each series scaled by its in-sample
one-step naive MAE on the train split, the first 2/3) and the pinball loss of the q90 column at
q = 0.9 (scaled the same way). No dependencies.

    prescient forecast backtest --csv data.csv > sel.csv
    prescient forecast backtest --csv data.csv --method naive > naive.csv
    python3 models/score_backtest.py data.csv sel.csv naive.csv
"""
import collections
import csv
import sys


def series(path):
    rows = list(csv.reader(open(path)))
    numeric = all(_num(c) for c in rows[0][1:])
    names = [f"s{i}" for i in range(1, len(rows[0]))] if numeric else rows[0][1:]
    body = rows if numeric else rows[1:]
    return {n: [float(r[i + 1]) for r in body] for i, n in enumerate(names)}


def _num(c):
    try:
        float(c)
        return True
    except ValueError:
        return False


def score(data, path):
    out = collections.defaultdict(lambda: [0.0, 0.0, 0])
    scale = {}
    for name, y in data.items():
        train = y[: 2 * len(y) // 3]
        mae = sum(abs(train[i] - train[i - 1]) for i in range(1, len(train)))
        scale[name] = mae / max(1, len(train) - 1)
    for r in csv.DictReader(open(path)):
        s = scale.get(r["series"])
        if not s:
            continue
        h = int(r["h"])
        t = data[r["series"]][int(r["origin"]) + h]
        p, q = float(r["point"]), float(r["q90"])
        pin = 0.9 * (t - q) if t >= q else 0.1 * (q - t)
        acc = out[h]
        acc[0] += abs(t - p) / s
        acc[1] += pin / s
        acc[2] += 1
    return {h: (a / n, b / n, n) for h, (a, b, n) in out.items()}


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    data = series(sys.argv[1])
    for path in sys.argv[2:]:
        for h, (mase, pinball, n) in sorted(score(data, path).items()):
            print(f"{path}\th={h}\tMASE {mase:.3f}\tpinball@0.9 {pinball:.3f}\tn={n}")


if __name__ == "__main__":
    main()
