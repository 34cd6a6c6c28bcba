#!/usr/bin/env python3
"""Trains the load forecaster: one small global model for every series, on the train split (the
first 2/3 of each series' steps) of the datasets `datasets.py` builds from ../shared/traces, and
exports it as ONNX with a fixture the Rust side checks itself against, and the data card.
Run by `cargo xtask train-forecaster` (which installs requirements.txt into a venv).

The feature contract (policy/src/forecast/model.rs implements the same; the fixture proves it):
  history y[0..n), season S (steps per day, 0: none), at origin n-1
  window  w = the last WINDOW values, the front padded with y[0]
  s       = max(mean(w), 1)                      every value below is divided by s
  x[0..48)   w / s
  x[48], x[49]  mean of the last 192 and 768 values (as many as there are) / s
  x[50]      ln(1 + mean(w)) / 5                 the level itself, for the noise it implies
  x[51]      share of zeros in w
  x[52..72)  y[n-1-S+k] / s for k = -4..=15 (yesterday around now and the next 15 steps),
             where S > 15 and n >= S + 5, else 0
  x[72]      1 where the row above is filled, else 0
Outputs, per step ahead h = 1..15, in units of s: `point` (trained on the q = 0.5 pinball loss,
so the MAE that MASE scores) and `upper` = point + |d| (the q = 0.9 pinball loss). Each sample's
loss is weighted by s / (its series' one-step naive MAE on train), so training minimises the
MASE-scaled loss, and every dataset weighs the same in total.
"""
import argparse
import datetime
import json
import os
import sys
import time

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = os.path.dirname(os.path.abspath(__file__))
WINDOW, H, BEFORE = 48, 15, 4
LONG = (192, 768)
FEATURES = WINDOW + 2 + 2 + (BEFORE + H + 1) + 1
HIDDEN = 64
Q = 0.9
CLIP = float(os.environ.get("PRESCIENT_FORECASTER_CLIP", "0.99"))


def features(y, origins, season):
    """The feature rows of series y at the given origins (numpy, vectorised)."""
    y = np.asarray(y, dtype=np.float64)
    o = np.asarray(origins)
    c = np.concatenate([[0.0], np.cumsum(y)])
    idx = np.clip(o[:, None] - (WINDOW - 1) + np.arange(WINDOW)[None, :], 0, None)
    w = y[idx]
    mean = w.mean(axis=1)
    s = np.maximum(mean, 1.0)
    x = np.zeros((len(o), FEATURES))
    x[:, :WINDOW] = w / s[:, None]
    for j, span in enumerate(LONG):
        lo = np.clip(o - span + 1, 0, None)
        x[:, WINDOW + j] = (c[o + 1] - c[lo]) / (o + 1 - lo) / s
    x[:, WINDOW + 2] = np.log1p(mean) / 5.0
    x[:, WINDOW + 3] = (w == 0).mean(axis=1)
    if season > H:
        ok = o >= season + BEFORE
        k = np.arange(-BEFORE, H + 1)
        lag = np.clip(o[:, None] - season + k[None, :], 0, None)
        x[:, WINDOW + 4:WINDOW + 4 + len(k)] = np.where(ok[:, None], y[lag] / s[:, None], 0.0)
        x[:, -1] = ok
    return x.astype(np.float32), s


def dataset_samples(d):
    data = np.loadtxt(d["file"], delimiter=",", skiprows=1, ndmin=2)[:, 1:]
    xs, ts, ws, val = [], [], [], []
    for j in range(data.shape[1]):
        y = data[:, j]
        train_end = 2 * len(y) // 3  # targets below this index are train
        train = y[:train_end]
        naive = np.abs(np.diff(train)).mean() if len(train) > 1 else 0.0
        if naive <= 0:
            continue
        origins = np.arange(WINDOW - 1, train_end - H)
        if len(origins) < 10:
            continue
        x, s = features(y, origins, d["season"])
        t = y[origins[:, None] + np.arange(1, H + 1)[None, :]] / s[:, None]
        xs.append(x)
        ts.append(t.astype(np.float32))
        ws.append(s / naive)
        v = np.zeros(len(origins), dtype=bool)
        v[int(len(origins) * 0.8):] = True  # the latest fifth of train: early stopping
        val.append(v)
    x, t, w, v = (np.concatenate(a) for a in (xs, ts, ws, val))
    w = np.minimum(w, np.quantile(w, CLIP)) if CLIP < 1 else w
    return x, t, (w / w.sum()).astype(np.float32), v


class Mlp:
    def __init__(self, rng):
        def init(i, o, scale=1.0):
            return (rng.standard_normal((i, o)) * scale * np.sqrt(2.0 / i)).astype(np.float32)
        self.p = {
            "w1": init(FEATURES, HIDDEN), "b1": np.zeros(HIDDEN, np.float32),
            "w2": init(HIDDEN, HIDDEN), "b2": np.zeros(HIDDEN, np.float32),
            "wp": init(HIDDEN, H, 0.1), "sp": np.zeros((FEATURES, H), np.float32),
            "bp": np.zeros(H, np.float32),
            "wd": init(HIDDEN, H, 0.1), "sd": np.zeros((FEATURES, H), np.float32),
            "bd": np.full(H, 0.3, np.float32),
        }
        # Start from "the window's last value" so training begins at the naive forecast.
        self.p["sp"][WINDOW - 1, :] = 1.0
        self.m = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.v = {k: np.zeros_like(v) for k, v in self.p.items()}
        self.steps = 0

    def forward(self, x):
        p = self.p
        z1 = x @ p["w1"] + p["b1"]
        h1 = np.maximum(z1, 0)
        z2 = h1 @ p["w2"] + p["b2"]
        h2 = np.maximum(z2, 0)
        point = h2 @ p["wp"] + x @ p["sp"] + p["bp"]
        d = h2 @ p["wd"] + x @ p["sd"] + p["bd"]
        return point, point + np.abs(d), (z1, h1, z2, h2, d)

    def loss(self, x, t, w):
        point, upper, _ = self.forward(x)
        return float((w[:, None] * (pinball(t - point, 0.5) + pinball(t - upper, Q))).sum() / H)

    def step(self, x, t, w, lr):
        p = self.p
        point, upper, (z1, h1, z2, h2, d) = self.forward(x)
        gp = np.where(t >= point, -0.5, 0.5)
        gu = np.where(t >= upper, -Q, 1 - Q)
        scale = w[:, None] / H
        dpoint = (gp + gu) * scale
        dd = gu * np.sign(d) * scale
        g = {"wp": h2.T @ dpoint, "sp": x.T @ dpoint, "bp": dpoint.sum(0),
             "wd": h2.T @ dd, "sd": x.T @ dd, "bd": dd.sum(0)}
        dh2 = dpoint @ p["wp"].T + dd @ p["wd"].T
        dz2 = dh2 * (z2 > 0)
        g["w2"], g["b2"] = h1.T @ dz2, dz2.sum(0)
        dz1 = (dz2 @ p["w2"].T) * (z1 > 0)
        g["w1"], g["b1"] = x.T @ dz1, dz1.sum(0)
        self.steps += 1
        b1, b2 = 0.9, 0.999
        for k in p:
            self.m[k] = b1 * self.m[k] + (1 - b1) * g[k]
            self.v[k] = b2 * self.v[k] + (1 - b2) * g[k] ** 2
            mh = self.m[k] / (1 - b1 ** self.steps)
            vh = self.v[k] / (1 - b2 ** self.steps)
            p[k] -= (lr * mh / (np.sqrt(vh) + 1e-12)).astype(np.float32)


def pinball(e, q):
    return np.where(e >= 0, q * e, (q - 1) * e)


def export(p, path):
    init = [numpy_helper.from_array(v.astype(np.float32), k) for k, v in p.items()]
    n = helper.make_node
    nodes = [
        n("MatMul", ["features", "w1"], ["m1"]), n("Add", ["m1", "b1"], ["z1"]),
        n("Relu", ["z1"], ["h1"]),
        n("MatMul", ["h1", "w2"], ["m2"]), n("Add", ["m2", "b2"], ["z2"]),
        n("Relu", ["z2"], ["h2"]),
        n("MatMul", ["h2", "wp"], ["pa"]), n("MatMul", ["features", "sp"], ["pb"]),
        n("Add", ["pa", "pb"], ["pc"]), n("Add", ["pc", "bp"], ["point"]),
        n("MatMul", ["h2", "wd"], ["da"]), n("MatMul", ["features", "sd"], ["db"]),
        n("Add", ["da", "db"], ["dc"]), n("Add", ["dc", "bd"], ["d"]),
        n("Abs", ["d"], ["spread"]), n("Add", ["point", "spread"], ["upper"]),
    ]
    graph = helper.make_graph(
        nodes, "prescient_forecaster",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("point", TensorProto.FLOAT, ["N", H]),
         helper.make_tensor_value_info("upper", TensorProto.FLOAT, ["N", H])],
        initializer=init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)],
                              producer_name="prescient models/train_forecaster.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(HERE, "..", "target", "forecast-data"))
    ap.add_argument("--out", default=HERE)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    datasets = json.load(open(os.path.join(a.data, "datasets.json")))
    rng = np.random.default_rng(a.seed)
    parts = [dataset_samples(d) for d in datasets]
    counts = {d["name"]: int(len(p[0])) for d, p in zip(datasets, parts)}
    x = np.concatenate([p[0] for p in parts])
    t = np.concatenate([p[1] for p in parts])
    w = np.concatenate([p[2] for p in parts]) / len(parts)
    v = np.concatenate([p[3] for p in parts])
    xt, tt, wt = x[~v], t[~v], w[~v] / w[~v].sum()
    xv, tv, wv = x[v], t[v], w[v] / w[v].sum()
    print(f"{len(xt)} training and {len(xv)} validation samples, {FEATURES} features",
          file=sys.stderr)
    mlp = Mlp(rng)
    best, best_p, stale, lr = float("inf"), None, 0, 2e-3
    batch = 1024
    start = time.time()
    history = []
    for epoch in range(a.epochs):
        order = rng.permutation(len(xt))
        # Resampled by weight within each batch's loss (weights stay as given; the batch sum
        # is rescaled so the learning rate does not depend on the dataset mix).
        for i in range(0, len(order), batch):
            b = order[i:i + batch]
            wb = wt[b] / wt[b].sum()
            mlp.step(xt[b], tt[b], wb, lr)
        lv = mlp.loss(xv, tv, wv)
        history.append(lv)
        print(f"epoch {epoch}: validation loss {lv:.4f} ({time.time() - start:.0f} s)",
              file=sys.stderr)
        if lv < best - 1e-5:
            best, best_p, stale = lv, {k: v.copy() for k, v in mlp.p.items()}, 0
        else:
            stale += 1
            lr *= 0.5
            if stale >= 4:
                break
    naive = Mlp(rng)
    naive_loss = naive.loss(xv, tv, wv)
    onnx_path = os.path.join(a.out, "forecaster.onnx")
    export(best_p, onnx_path)
    mlp.p = best_p
    write_fixture(mlp, datasets, os.path.join(a.out, "forecaster_fixture.json"))
    card = {
        "trained": str(datetime.date.today()), "seed": a.seed, "epochs_run": len(history),
        "samples": counts, "validation_loss": best, "naive_validation_loss": naive_loss,
        "features": FEATURES, "hidden": HIDDEN, "horizon": H, "window": WINDOW,
        "parameters": int(sum(v.size for v in best_p.values())),
        "bytes": os.path.getsize(onnx_path),
    }
    json.dump(card, open(os.path.join(a.out, "forecaster.json"), "w"), indent=1)
    print(json.dumps(card), file=sys.stderr)


def write_fixture(mlp, datasets, path):
    """Histories, their feature rows and the model's outputs, for the Rust side's test."""
    cases = []
    for d in datasets:
        data = np.loadtxt(d["file"], delimiter=",", skiprows=1, ndmin=2)[:, 1:]
        y = data[:, 0]
        for o in (10, min(len(y) - 1, 1600)):
            keep = y[max(0, o - 1599):o + 1] if o >= 1600 else y[:o + 1]
            x, s = features(keep, [len(keep) - 1], d["season"])
            full, _ = features(y, [o], d["season"])
            assert np.allclose(x, full), f"{d['name']}: a 1600-step suffix must not change features"
            point, upper, _ = mlp.forward(x.astype(np.float32))
            cases.append({"dataset": d["name"], "season": d["season"],
                          "history": keep.tolist(), "features": x[0].tolist(),
                          "scale": float(s[0]),
                          "point": point[0].tolist(), "upper": upper[0].tolist()})
    json.dump(cases, open(path, "w"))


if __name__ == "__main__":
    main()
