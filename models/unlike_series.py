#!/usr/bin/env python3
"""Writes series unlike the traces the forecaster was trained on, two days of per-minute counts
each (a regime shift, a flash crowd, timers, a trend, on/off bursts), as a CSV for
`prescient forecast backtest`, and scores the shipped forecaster against EWMA per series:
the check that per-series selection is never worse than EWMA where the model is out of its
depth. No dependencies; seeded.

    python3 models/unlike_series.py OUT_DIR [PRESCIENT_BINARY]
"""
import collections
import csv
import math
import os
import random
import subprocess
import sys

T = 2 * 1440


def poisson(rng, lam):
    if lam > 50:
        return max(0, int(round(rng.gauss(lam, math.sqrt(lam)))))
    limit, k, p = math.exp(-lam), 0, 1.0
    while True:
        p *= rng.random()
        if p < limit:
            return k
        k += 1


def columns():
    rng = random.Random(7)
    shift, crowd = int(0.7 * T), int(0.8 * T)
    return {
        "regime_shift": [poisson(rng, 20 if t < shift else 80) for t in range(T)],
        "flash_crowd": [poisson(rng, 200 if crowd <= t < crowd + 30 else 10) for t in range(T)],
        "timer_15m": [120 if t % 15 == 0 else 0 for t in range(T)],
        "timer_hourly": [poisson(rng, 300) if t % 60 == 0 else poisson(rng, 0.5) for t in range(T)],
        "trend": [poisson(rng, 5 + 95 * t / T) for t in range(T)],
        "on_off": [poisson(rng, 40) if t % 30 < 10 else 0 for t in range(T)],
    }


def mae(data, path):
    out = collections.defaultdict(lambda: [0.0, 0])
    for r in csv.DictReader(open(path)):
        y = data[r["series"]][int(r["origin"]) + int(r["h"])]
        k = (r["series"], int(r["h"]))
        out[k][0] += abs(y - float(r["point"]))
        out[k][1] += 1
    return {k: v[0] / v[1] for k, v in out.items()}


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else "."
    binary = sys.argv[2] if len(sys.argv) > 2 else "prescient"
    os.makedirs(out, exist_ok=True)
    cols = columns()
    data = os.path.join(out, "unlike.csv")
    with open(data, "w") as f:
        f.write("minute," + ",".join(cols) + "\n")
        for t in range(T):
            f.write(f"{t * 60}," + ",".join(str(cols[n][t]) for n in cols) + "\n")
    runs = {}
    for name, extra in [("shipped", []), ("ewma", ["--method", "ewma"])]:
        path = os.path.join(out, f"{name}.csv")
        with open(path, "w") as f:
            subprocess.run([binary, "forecast", "backtest", "--csv", data, "--step", "60"] + extra,
                           stdout=f, check=True)
        runs[name] = mae({n: [float(x) for x in v] for n, v in cols.items()}, path)
    print("| series | h = 1 | h = 5 | h = 15 |")
    print("| --- | --- | --- | --- |")
    for n in cols:
        ratios = [runs["shipped"][(n, h)] / max(runs["ewma"][(n, h)], 1e-12) for h in (1, 5, 15)]
        print(f"| {n} | " + " | ".join(f"{r:.3f}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
