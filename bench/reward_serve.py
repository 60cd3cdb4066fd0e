"""Reward service throughput: @serve.batch vs max_batch_size=1, HTTP vs in-cluster handles, Serve vs in-process.

    python bench/reward_serve.py [--seconds 20] [--clients 16] [--repeats 2] [--clip b16|tiny]

Deploys two apps on a local Ray cluster with the same clip_score reward: max_batch_size=B
(/batched, `--batch`) and max_batch_size=1 (/unbatched), one replica each (equal deployment:
same CPUs, same threads). The scorer has a realistic cost: the real CLIP ViT-B/16 architecture
at 224² with random weights (`--clip b16`; `tiny` for a quick smoke run). `--clients` (≥ B)
concurrent clients each send one-image requests back to back, and the batch wait
(`--batch-wait`) is long enough for those requests to fill a batch. Every phase gets a warm-up;
phases run interleaved (order reversed every repeat); median (min, max) over repeats is printed,
with the mean requests per batch. `in-process` calls the same scorer in this process, batch B,
same thread count: the cost Serve adds over a plain call. The client runs on the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import spread  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _http_load(url: str, name: str, body: dict, clients: int, seconds: float) -> tuple[float, float]:
    import httpx

    done, errors, batch = 0, 0, []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:  # a loaded CPU scorer queues long
        stop = time.perf_counter() + seconds

        async def worker():
            nonlocal done, errors
            while time.perf_counter() < stop:
                r = await http.post(f"/v1/rewards/{name}:score", json=body)
                if r.status_code == 200:
                    done += 1
                    batch.append(r.json()["batched_requests"])
                else:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        el = time.perf_counter() - t0
    assert errors == 0, f"{errors} failed requests"
    return done / el, float(np.mean(batch))


async def _handle_load(app: str, name: str, img: np.ndarray, clients: int, seconds: float) -> tuple[float, float]:
    from ray import serve

    h = serve.get_deployment_handle(f"reward_{name}", app)
    done, batch = 0, []
    stop = time.perf_counter() + seconds

    async def worker():
        nonlocal done
        while time.perf_counter() < stop:
            res = await h.score.remote(img, ["a photo of a cat"])
            done += 1
            batch.append(res["batched_requests"])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(clients)))
    return done / (time.perf_counter() - t0), float(np.mean(batch))


def _inprocess(clip_path: str, img: np.ndarray, batch: int, threads: int, seconds: float) -> tuple[float, float]:
    """Images/s of the same scorer called in this process with batches of `batch`."""
    import torch

    from raydiff.rewards.base import make_reward

    torch.set_num_threads(threads)
    r = make_reward("clip_score", clip_path=clip_path)
    imgs, prompts = np.repeat(img, batch, 0), ["a photo of a cat"] * batch
    r(imgs[:1], prompts[:1])  # warm-up
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or done == 0:
        r(imgs, prompts)
        done += batch
    return done / (time.perf_counter() - t0), float(batch)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0, help="timed seconds per phase and repeat")
    ap.add_argument("--warmup", type=float, default=3.0, help="untimed seconds before every phase")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--batch", type=int, default=8, help="max_batch_size of the batched app")
    ap.add_argument("--batch-wait", type=float, default=0.5, help="batch_wait_timeout_s of the batched app")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--clip", choices=("b16", "tiny"), default="b16")
    ap.add_argument("--threads", type=int, default=1, help="CPUs (= torch threads) per replica and in-process")
    ap.add_argument("--size", type=int, default=64, help="image side sent (pixels; the scorer resizes to its input)")
    a = ap.parse_args(argv)
    if a.clients < a.batch:
        ap.error(f"--clients {a.clients} < --batch {a.batch}: batches could never fill")

    import ray
    from ray import serve

    from raydiff.rewards.client import encode_images
    from raydiff.rewards.serve import build_app
    from raydiff.rewards.service_config import RewardServiceConfig

    if a.clip == "b16":
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _clip_b16 import build_clip_b16

        clip_path = build_clip_b16()
    else:
        clip_path = "tiny://clip"
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    apps = {}
    for app, mbs, wait in (("batched", a.batch, a.batch_wait), ("unbatched", 1, 0.0)):
        cfg = RewardServiceConfig(
            app_name=app, route_prefix=f"/{app}", port=port, max_inflight_requests=1024,
            rewards=[dict(name="r", reward="clip_score", args={"clip_path": clip_path}, num_cpus=a.threads,
                          max_batch_size=mbs, batch_wait_timeout_s=wait, max_ongoing_requests=128, max_queued_requests=-1)],
        )
        serve.run(build_app(cfg), name=app, route_prefix=cfg.route_prefix)
        apps[app] = f"http://127.0.0.1:{port}/{app}"
    img = np.random.default_rng(0).integers(0, 256, (1, a.size, a.size, 3), dtype=np.uint8)
    body = {"prompts": ["a photo of a cat"], "images": encode_images(img, "raw")}

    async def phase(name: str, seconds: float):
        kind, app = name.split()
        if kind == "http":
            return await _http_load(apps[app], "r", body, a.clients, seconds)
        return await _handle_load(app, "r", img, a.clients, seconds)

    names = ["http batched", "http unbatched", "handle batched", "handle unbatched"]
    res: dict[str, list] = {n: [] for n in names + ["in-process"]}

    async def run_all():
        for rep in range(a.repeats):
            for n in (names if rep % 2 == 0 else names[::-1]):
                await phase(n, a.warmup)
                res[n].append(await phase(n, a.seconds))
                print(f"  rep {rep} {n:18s} {res[n][-1][0]:8.2f} req/s  requests per batch {res[n][-1][1]:5.1f}", flush=True)

    asyncio.run(run_all())
    serve.shutdown()
    ray.shutdown()
    for rep in range(a.repeats):  # the Serve replicas are gone: the scorer gets the same (idle) cores
        res["in-process"].append(_inprocess(clip_path, img, a.batch, a.threads, a.seconds))
    med = {n: statistics.median(r[0] for r in v) for n, v in res.items()}
    print(f"\nreward=clip_score clip={a.clip} image={a.size}x{a.size} clients={a.clients} batch={a.batch} "
          f"batch_wait={a.batch_wait}s seconds={a.seconds} repeats={a.repeats} cpus={os.cpu_count()}")
    for n, v in res.items():
        print(f"  {n:18s} req/s {spread([r[0] for r in v])}   mean requests per batch {statistics.fmean(r[1] for r in v):5.1f}")
    ratios = {"reward_serve_batched_vs_unbatched_http": med["http batched"] / med["http unbatched"],
              "reward_serve_batched_vs_unbatched_handle": med["handle batched"] / med["handle unbatched"],
              "reward_serve_handle_vs_http": med["handle batched"] / med["http batched"],
              "reward_serve_handle_vs_inprocess": med["handle batched"] / med["in-process"]}
    for k, v in ratios.items():
        print(f"RATIO {k} {v:.3f}")
    return {"ratios": ratios, "req_per_s": med}


if __name__ == "__main__":
    main()
