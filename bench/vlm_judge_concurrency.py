"""vlm_judge wall time vs its concurrency limit, against the local OpenAI-compatible test server.

    python bench/vlm_judge_concurrency.py [--images 16] [--latency 0.25] [--limits 1,4,16]

Starts tests/_vlm_server.py (tiny random LLaVA, 127.0.0.1) in its own session, makes every answer
wait `--latency` s (a stand-in for a real VLM's decode time), then scores `--images` images in point
mode with each `max_concurrency`. Prints wall time and the server's most-in-flight count; stops the
server by pid.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--latency", type=float, default=0.25)
    ap.add_argument("--limits", default="1,4,16")
    a = ap.parse_args()
    sys.path.insert(0, ROOT)
    from raydiff.rewards.base import make_reward
    from raydiff.rewards.tiny_builders import build_tiny_vlm

    model = build_tiny_vlm(os.path.join(tempfile.mkdtemp(), "llava"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "_vlm_server.py"), "--model", model,
                             "--port", str(port)], env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        imgs = np.random.default_rng(0).integers(0, 256, (a.images, 32, 32, 3), dtype=np.uint8)
        for limit in (int(x) for x in a.limits.split(",")):
            httpx.post(url + "/control", json={"mode": "sleep", "sleep_s": a.latency})
            judge = make_reward("vlm_judge", base_url=url + "/v1", max_concurrency=limit, timeout_s=30)
            t0 = time.perf_counter()
            judge(imgs, ["a photo"] * a.images)
            wall = time.perf_counter() - t0
            inflight = httpx.get(url + "/stats").json()["max_inflight"]
            print(f"max_concurrency={limit:3d}: {a.images} images in {wall:6.2f} s "
                  f"({a.images / wall:5.1f} img/s), server saw at most {inflight} in flight")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)


if __name__ == "__main__":
    main()
