"""vlm_judge over real HTTP against a local OpenAI-compatible server running a tiny random LLaVA.

The server (tests/_vlm_server.py) runs in a subprocess on 127.0.0.1 that this module starts and
stops by pid; `POST /control` picks how its answers end (see that file).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from raydiff.rewards.base import make_reward
from raydiff.rewards.vlm_judge import VlmJudgeError, parse_pair, parse_point

pytestmark = pytest.mark.timeout(300)


def test_parsers():
    assert parse_point("blah\nFinal Score: 4") == pytest.approx(0.8)
    assert parse_point("Final Score:3.5 ok") == pytest.approx(0.7)
    with pytest.raises(VlmJudgeError, match=r"unparsable answer 'a lovely picture'.*Final Score"):
        parse_point("a lovely picture")
    with pytest.raises(VlmJudgeError, match="outside"):
        parse_point("Final Score: 9")
    assert parse_pair("<answer>Image 2 is better</answer>") == 1 and parse_pair("Image 1 is better") == 0
    with pytest.raises(VlmJudgeError, match="Image 1 is better"):
        parse_pair("both are fine")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from raydiff.rewards.tiny_builders import build_tiny_vlm

    model = build_tiny_vlm(tmp_path_factory.mktemp("vlm") / "llava")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "_vlm_server.py"),
                             "--model", model, "--port", str(port)], env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"VLM test server exited with {proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                raise RuntimeError("VLM test server did not come up in 120 s")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # its own session: only the server (and anything it started)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def control(url, **kw):
    r = httpx.post(url + "/control", json=kw, timeout=10)
    assert r.status_code == 200
    return r.json()


def stats(url):
    return httpx.get(url + "/stats", timeout=10).json()


def _images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 24, 24, 3), dtype=np.uint8)


def judge(url, **kw):
    args = dict(base_url=url + "/v1", model="tiny-llava", timeout_s=20, max_retries=2, backoff_s=0.05)
    return make_reward("vlm_judge", **{**args, **kw})


def test_point_scores_over_http(server):
    control(server, mode="oracle")
    imgs = np.stack([np.full((24, 24, 3), v, np.uint8) for v in (0, 128, 255)])
    r = judge(server, max_concurrency=2)
    s = r(imgs, ["a cat", "a dog", "a red car"])
    # oracle: score 1 + 4·brightness out of 5
    np.testing.assert_allclose(s, [(1 + 4 * v / 255) / 5 for v in (0, 128, 255)], atol=1e-3)
    st = stats(server)
    assert st["requests"] == 3 and 1 <= st["max_inflight"] <= 2
    control(server, mode="wrap")  # the model's own (random) generation decides the score: a real forward pass
    s = r(_images(4), ["a"] * 4)
    assert s.shape == (4,) and set(np.round(s * 5).astype(int)) <= {1, 2, 3, 4, 5}
    np.testing.assert_array_equal(s, r(_images(4), ["a"] * 4))  # greedy decoding: deterministic


def test_concurrency_limit(server):
    control(server, mode="sleep", sleep_s=0.3)
    r = judge(server, max_concurrency=3)
    t0 = time.perf_counter()
    r(_images(9), ["x"] * 9)
    wall = time.perf_counter() - t0
    st = stats(server)
    assert st["requests"] == 9 and st["max_inflight"] == 3  # never more than the limit, and it is used
    assert wall >= 3 * 0.3


def test_timeout_then_error_or_fallback(server):
    control(server, mode="sleep", sleep_s=3.0)
    r = judge(server, timeout_s=0.5, max_retries=1)
    t0 = time.perf_counter()
    with pytest.raises(VlmJudgeError, match=r"failed after 2 attempts: ReadTimeout"):
        r(_images(1), ["x"])
    assert time.perf_counter() - t0 < 2.9  # gave up on the client side, not after the server's 3 s
    fb = judge(server, timeout_s=0.5, max_retries=0, required=False, fallback_score=0.25)
    np.testing.assert_array_equal(fb(_images(2), ["x", "y"]), [0.25, 0.25])
    assert fb.stats["fallbacks"] == 2


def test_retry_succeeds_after_transient_500s(server):
    control(server, mode="fail", fail_count=2, then="oracle")
    r = judge(server, max_retries=3, backoff_s=0.05)
    s = r(np.full((1, 24, 24, 3), 255, np.uint8), ["x"])
    np.testing.assert_allclose(s, [1.0], atol=1e-3)
    assert r.stats["retries"] == 2 and stats(server)["requests"] == 3
    control(server, mode="fail", fail_count=5, then="oracle")
    with pytest.raises(VlmJudgeError, match=r"failed after 2 attempts: HTTP 500"):
        judge(server, max_retries=1)(_images(1), ["x"])


def test_unparsable_answer(server):
    control(server, mode="raw")
    r = judge(server)
    with pytest.raises(VlmJudgeError, match=r"unparsable answer .*no match for 'Final Score"):
        r(_images(2), ["x", "y"])
    assert stats(server)["requests"] == 2  # not retried: the same answer would come back
    fb = judge(server, required=False, fallback_score=0.1)
    np.testing.assert_allclose(fb(_images(2), ["x", "y"]), [0.1, 0.1], rtol=1e-6)


def test_pairwise_win_rate_over_http(server):
    control(server, mode="oracle")  # brighter image wins each comparison
    levels = [10, 200, 90, 250, 30, 120]
    imgs = np.stack([np.full((24, 24, 3), v, np.uint8) for v in levels])
    r = judge(server, mode="pairwise", max_concurrency=4)
    assert r.info().group_wise
    s = r(imgs, ["p"] * 6, groups=[[0, 1, 2], [3, 4, 5]])
    # group 1: 10 < 90 < 200 -> win rates 0, 1, 0.5; group 2: 30 < 120 < 250 -> 1, 0, 0.5
    np.testing.assert_allclose(s, [0.0, 1.0, 0.5, 1.0, 0.0, 0.5])
    assert stats(server)["requests"] == 2 * 3 * 2  # 3 pairs per group, both orders
    # default groups: same prompt -> same group
    s2 = r(imgs[:4], ["a", "a", "b", "b"])
    np.testing.assert_allclose(s2, [0.0, 1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match=r"groups.1: image 0 is in more than one group"):
        r(imgs[:2], ["a", "a"], groups=[[0, 1], [0]])


def test_config_errors():
    with pytest.raises(ValueError, match="vlm_judge.mode 'rank' must be point or pairwise"):
        make_reward("vlm_judge", base_url="http://127.0.0.1:1/v1", mode="rank")
    with pytest.raises(ValueError, match="must be an http"):
        make_reward("vlm_judge", base_url="127.0.0.1:1")
    with pytest.raises(ValueError, match="RAYDIFF_NO_SUCH_KEY.*not set"):
        make_reward("vlm_judge", base_url="http://127.0.0.1:1/v1", api_key_env="RAYDIFF_NO_SUCH_KEY")
