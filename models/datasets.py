#!/usr/bin/env python3
"""Builds the forecaster's datasets from ../shared/traces as the CSVs `prescient forecast
backtest` reads (first column the step, one column of counts per series), into a directory
(default target/forecast-data), with `datasets.json` naming each file's step and season.
Standard library only, so the backtest can be scored without the training environment.

    python3 models/datasets.py [--traces DIR] [--out DIR]

Datasets (every series split 2/3 train, 1/3 test by the backtest itself):
  azure-functions  invocations per minute of the 174 functions non-zero in at least half of the
                   day's minutes (one day; no "yesterday" for any origin)
  nasa-1m, nasa-5m NASA KSC requests per 1 and 5 minutes, Jul-Aug 1995; the 07-28 13:33 to
                   07-31 gap between the logs (in the train part) filled with the same minute one
                   week earlier, so the daily lag stays aligned
  twitter-1m       Twitter sample-stream events per minute, 22 days
  llm-code-1s,     Azure LLM inference requests per second (57 and 58 minutes): per minute they
  llm-conv-1s      would leave 19 test targets
"""
import argparse
import csv
import datetime as dt
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def write(out, name, step, season, names, columns, note):
    path = os.path.join(out, f"{name}.csv")
    t = len(columns[0])
    with open(path, "w") as f:
        f.write("step," + ",".join(names) + "\n")
        for i in range(t):
            f.write(str(i * step) + "," + ",".join(f"{c[i]:g}" for c in columns) + "\n")
    return {"name": name, "file": path, "step": step, "season": season,
            "series": len(names), "steps": t, "note": note}


def azure(traces):
    rows = list(csv.reader(open(os.path.join(
        traces, "azure_functions_2019_invitro_sample", "1350_inv.csv"))))[1:]
    names, cols = [], []
    for r in rows:
        y = [float(v) for v in r[3:]]
        if sum(1 for v in y if v > 0) * 2 >= len(y):
            names.append(r[0][:12])
            cols.append(y)
    return names, cols


def nasa(traces):
    path = os.path.join(traces, "nasa_http_1995", "nasa_requests_per_minute.csv")
    start = dt.datetime(1995, 7, 1)
    counts = {}
    last = start
    for r in csv.DictReader(open(path)):
        m = dt.datetime.strptime(r["minute_start_edt"], "%Y-%m-%d %H:%M")
        if r["requests"].strip():
            counts[int((m - start).total_seconds() // 60)] = float(r["requests"])
        last = max(last, m)
    t = int((last - start).total_seconds() // 60) + 1
    week = 7 * 1440
    y = []
    for i in range(t):
        if i in counts:
            y.append(counts[i])
        else:
            y.append(y[i - week] if i >= week else 0.0)
    return y


def twitter(traces):
    path = os.path.join(traces, "twitter_stream_2021_08", "twitter_events_per_minute.csv")
    rows = list(csv.DictReader(open(path)))
    return [float(r["events"] or 0) for r in rows]


def llm(traces, which):
    path = os.path.join(traces, "azure_llm_2023", f"AzureLLMInferenceTrace_{which}.csv")
    stamps = []
    for r in csv.DictReader(open(path)):
        s = r["TIMESTAMP"][:26]
        stamps.append(dt.datetime.strptime(s, "%Y-%m-%d %H:%M:%S.%f"))
    first = min(stamps)
    secs = [int((s - first).total_seconds()) for s in stamps]
    y = [0.0] * (max(secs) + 1)
    for s in secs:
        y[s] += 1
    return y


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--traces", default=os.path.join(HERE, "..", "..", "shared", "traces"))
    p.add_argument("--out", default=os.path.join(HERE, "..", "target", "forecast-data"))
    a = p.parse_args()
    if not os.path.isdir(a.traces):
        sys.exit(f"datasets.py: no traces at {a.traces} (pass --traces DIR)")
    os.makedirs(a.out, exist_ok=True)
    index = []
    names, cols = azure(a.traces)
    index.append(write(a.out, "azure-functions", 60, 1440, names, cols,
                       "functions non-zero in >= half the minutes"))
    y = nasa(a.traces)
    index.append(write(a.out, "nasa-1m", 60, 1440, ["nasa"], [y], "07-28..31 gap filled from a week before"))
    y5 = [sum(y[i:i + 5]) for i in range(0, len(y) - len(y) % 5, 5)]
    index.append(write(a.out, "nasa-5m", 300, 288, ["nasa"], [y5], "sum of 1-minute counts"))
    index.append(write(a.out, "twitter-1m", 60, 1440, ["twitter"], [twitter(a.traces)], ""))
    for which in ["code", "conv"]:
        index.append(write(a.out, f"llm-{which}-1s", 1, 0, [which], [llm(a.traces, which)],
                           "requests per second"))
    with open(os.path.join(a.out, "datasets.json"), "w") as f:
        json.dump(index, f, indent=1)
    for d in index:
        print(f"{d['name']}: {d['series']} series x {d['steps']} steps of {d['step']} s")


if __name__ == "__main__":
    main()
