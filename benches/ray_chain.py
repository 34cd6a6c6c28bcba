"""The Ray Serve reference for `prescient bench chain`.

The same chain of no-op stages, each calling the next through a DeploymentHandle, driven
closed-loop from a handle at each concurrency; prints JSON shaped like `prescient bench chain`.
Not part of CI: `python3 -m pip install "ray[serve]==2.60.*"` then
`python3 benches/ray_chain.py --stages 3 --concurrency 1,16 --duration 5`.
"""
import argparse
import asyncio
import json
import time

import ray
from ray import serve


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
class Stage:
    def __init__(self, next_stage=None):
        self.next = next_stage

    async def __call__(self, payload: bytes) -> bytes:
        if self.next is None:
            return payload
        return await self.next.remote(payload)


async def closed_loop(handle, concurrency, seconds, payload):
    latencies = []
    end = time.perf_counter() + seconds

    async def worker():
        while time.perf_counter() < end:
            t = time.perf_counter()
            await handle.remote(payload)
            latencies.append(time.perf_counter() - t)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    q = lambda p: int(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e6)
    return {
        "concurrency": concurrency,
        "rps": round(len(latencies) / elapsed),
        "p50_us": q(0.5),
        "p99_us": q(0.99),
        "ok": len(latencies),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--payload-bytes", type=int, default=64)
    args = ap.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    app = None
    for i in range(args.stages, 0, -1):
        app = Stage.options(name=f"s{i}").bind(app) if app else Stage.options(name=f"s{i}").bind()
    handle = serve.run(app, name="chain")
    payload = b"x" * args.payload_bytes
    results = []
    for c in [int(x) for x in args.concurrency.split(",")]:
        asyncio.run(closed_loop(handle, c, 1.0, payload))
        results.append(asyncio.run(closed_loop(handle, c, args.duration, payload)))
    print(json.dumps({"bench": "ray-serve-chain", "ray": ray.__version__, "stages": args.stages,
                      "results": results}, indent=2))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
