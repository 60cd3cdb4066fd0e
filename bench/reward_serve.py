"""Reward service throughput on CPU: @serve.batch vs max_batch_size=1, and HTTP vs in-cluster handles.

    python bench/reward_serve.py [--seconds 15] [--clients 64] [--reward clip_score|brightness]

Deploys two apps on a local Ray cluster: the same tiny-CLIP reward with max_batch_size=32 (/batched)
and max_batch_size=1 (/unbatched), one replica each. `--clients` concurrent clients each send
one-image requests back to back for `--seconds`; the client runs on the same machine, so the
HTTP figures include encoding/decoding on the same cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _http_load(url: str, name: str, body: dict, clients: int, seconds: float) -> tuple[float, float]:
    import httpx

    done, errors, batch = 0, 0, []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--reward", default="clip_score")
    ap.add_argument("--size", type=int, default=64, help="image side (pixels)")
    a = ap.parse_args()

    import ray
    from ray import serve

    from raydiff.rewards.client import encode_images
    from raydiff.rewards.serve import build_app
    from raydiff.rewards.service_config import RewardServiceConfig

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {"clip_path": "tiny://clip"} if a.reward != "brightness" else {}
    apps = {}
    for app, mbs in (("batched", 32), ("unbatched", 1)):
        cfg = RewardServiceConfig(
            app_name=app, route_prefix=f"/{app}", port=port, max_inflight_requests=1024,
            rewards=[dict(name="r", reward=a.reward, args=args, num_cpus=1, max_batch_size=mbs,
                          batch_wait_timeout_s=0.005, max_ongoing_requests=128, max_queued_requests=-1)],
        )
        serve.run(build_app(cfg), name=app, route_prefix=cfg.route_prefix)
        apps[app] = f"http://127.0.0.1:{port}/{app}"
    img = np.random.default_rng(0).integers(0, 256, (1, a.size, a.size, 3), dtype=np.uint8)
    body = {"prompts": ["a photo of a cat"], "images": encode_images(img, "raw")}

    async def run_all():
        await _http_load(apps["batched"], "r", body, a.clients, 2.0)  # warm-up
        await _http_load(apps["unbatched"], "r", body, a.clients, 2.0)
        res = {"http batched": await _http_load(apps["batched"], "r", body, a.clients, a.seconds),
               "http max_batch_size=1": await _http_load(apps["unbatched"], "r", body, a.clients, a.seconds)}
        await _handle_load("batched", "r", img, a.clients, 2.0)
        res["handle batched"] = await _handle_load("batched", "r", img, a.clients, a.seconds)
        res["handle max_batch_size=1"] = await _handle_load("unbatched", "r", img, a.clients, a.seconds)
        return res

    res = asyncio.run(run_all())
    print(f"\nreward={a.reward} image={a.size}x{a.size} clients={a.clients} seconds={a.seconds} "
          f"cpus={os.cpu_count()}")
    for k, (rps, mb) in res.items():
        print(f"  {k:24s} {rps:8.1f} req/s   mean requests per batch {mb:5.1f}")
    print(f"  batched / max_batch_size=1 (HTTP)   : {res['http batched'][0] / res['http max_batch_size=1'][0]:.2f}x")
    print(f"  batched / max_batch_size=1 (handle) : {res['handle batched'][0] / res['handle max_batch_size=1'][0]:.2f}x")
    print(f"  handle / HTTP (batched)             : {res['handle batched'][0] / res['http batched'][0]:.2f}x")
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
