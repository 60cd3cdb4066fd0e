"""The reward service over real HTTP on a local Ray Serve (fixtures in conftest.py)."""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

from raydiff.rewards.base import WeightedRewards, make_reward
from raydiff.rewards.client import HandleRewards, RewardClient, RewardServiceError, encode_images, ensure_reward_service
from raydiff.rewards.serve.reuse import RewardAppMismatch

pytestmark = pytest.mark.timeout(300)


def _images(n=4, h=32, w=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _png_b64(img) -> str:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _post(url, path, body, **kw):
    return httpx.post(url + path, json=body, timeout=30, **kw)


def _assert_service_ok(url):
    r = _post(url, "/v1/rewards/brightness:score", {"prompts": ["x"], "images": encode_images(_images(1))})
    assert r.status_code == 200 and r.json()["errors"] == [None], r.text


@pytest.fixture(scope="module")
def svc(serve_rewards):
    return serve_rewards


@pytest.fixture(scope="module")
def clip_local(svc):
    return make_reward("clip_score", clip_path=svc.tiny_clip)


def test_health_catalogue_docs(svc):
    assert httpx.get(svc.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(svc.url + "/readyz", timeout=30)
    assert ready.status_code == 200 and set(ready.json()["rewards"]) == {"brightness", "clip"}
    cat = {r["name"]: r for r in RewardClient(svc.url).catalogue()}
    assert cat["clip"]["reward"] == "clip_score" and cat["clip"]["differentiable"] is True
    assert cat["clip"]["input_size"] == 32 and cat["clip"]["version"] == "openai-vit-l14"
    assert cat["brightness"]["range"] == [0.0, 1.0] and cat["brightness"]["replicas"] == 2
    assert httpx.get(svc.url + "/docs").status_code == 200
    paths = httpx.get(svc.url + "/openapi.json").json()["paths"]
    assert {"/v1/rewards/{name}:score", "/v1/score", "/v1/rewards", "/healthz", "/readyz"} <= set(paths)


@pytest.mark.parametrize("fmt", ["raw", "png"])
def test_http_scores_equal_in_process(svc, clip_local, fmt):
    imgs = _images(5, 40, 48, seed=1)
    prompts = ["a photo of a cat", "a red car", "", "the apple", "a dog"]
    client = RewardClient(svc.url)
    res = client.score_response("clip", imgs, prompts, format=fmt)
    assert res["model"] == "clip" and res["version"] == "openai-vit-l14" and res["errors"] == [None] * 5
    assert res["latency_ms"] > 0 and res["batch_size"] >= 5
    np.testing.assert_allclose(res["scores"], clip_local(imgs, prompts), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(client.score("brightness", imgs, prompts, format=fmt),
                               imgs.reshape(5, -1).mean(1) / 255, rtol=1e-5)


def test_mix_equals_weighted_in_process(svc, clip_local):
    imgs, prompts = _images(3, seed=2), ["a", "b", "c"]
    total, parts = RewardClient(svc.url).score_mix({"brightness": 2.0, "clip": 0.5}, imgs, prompts, format="png")
    want_total, want = WeightedRewards([(make_reward("brightness"), 2.0), (clip_local, 0.5)])(imgs, prompts)
    np.testing.assert_allclose(parts["brightness"], want["brightness"], rtol=1e-5)
    np.testing.assert_allclose(parts["clip"], want["clip_score"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(total, want_total, rtol=1e-4, atol=1e-3)
    # No weights given: every served reward at its configured weight (brightness 1.0, clip 0.5).
    r = _post(svc.url, "/v1/score", {"prompts": prompts, "images": encode_images(imgs)}).json()
    assert r["weights"] == {"brightness": 1.0, "clip": 0.5}


def test_concurrent_requests_are_batched(svc):
    def one(i):
        body = {"prompts": ["x"], "images": encode_images(_images(1, seed=i))}
        return _post(svc.url, "/v1/rewards/brightness:score", body).json()

    with ThreadPoolExecutor(24) as ex:
        out = list(ex.map(one, range(48)))
    assert all(o["errors"] == [None] for o in out)
    assert max(o["batched_requests"] for o in out) > 1
    assert max(o["batch_size"] for o in out) > 1


def _item_cases():
    good = _images(1, 16, 16, seed=3)[0]
    jpeg = io.BytesIO()
    Image.fromarray(good).save(jpeg, format="JPEG")
    return {
        "undecodable PNG": {"format": "png", "data": base64.b64encode(b"not a png at all").decode()},
        "expected a PNG": {"format": "png", "data": base64.b64encode(jpeg.getvalue()).decode()},
        "not valid base64": {"format": "raw", "data": "@@@@", "shape": [1, 1, 3]},
        "needs 768": {"format": "raw", "data": base64.b64encode(good.tobytes()[:-1]).decode(), "shape": [16, 16, 3]},
        "shape [H, W, 3]": {"format": "raw", "data": base64.b64encode(good.tobytes()).decode(), "shape": [16, 12, 4]},
        "but shape says": {"format": "png", "data": _png_b64(good), "shape": [8, 8, 3]},
        "max_image_pixels": {"format": "raw", "data": "", "shape": [2000, 2000, 3]},
    }


@pytest.mark.parametrize("case", list(_item_cases()))
def test_bad_item_is_a_per_item_error(svc, case):
    good = _images(1, 16, 16, seed=4)
    body = {"prompts": ["a", "b", "a"],
            "images": encode_images(good, "png") + [_item_cases()[case]] + encode_images(good, "raw")}
    r = _post(svc.url, "/v1/rewards/clip:score", body)
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["errors"][0] is None and res["errors"][2] is None and case in res["errors"][1]
    assert res["scores"][1] is None and res["scores"][0] == pytest.approx(res["scores"][2], abs=1e-3)
    mix = _post(svc.url, "/v1/score", body).json()
    assert mix["total"][1] is None and case in mix["errors"][1] and mix["total"][0] is not None
    _assert_service_ok(svc.url)


def _bad_requests():
    img = encode_images(_images(1, 8, 8))
    return [
        # (path, body or raw bytes, status, text in detail)
        ("/v1/rewards/brightness:score", {"prompts": ["a", "b"], "images": img}, 422, "prompts has 2 entries but images has 1"),
        ("/v1/rewards/brightness:score", {"prompts": ["a"], "images": "x"}, 422, "images"),
        ("/v1/rewards/brightness:score", {"prompts": [1], "images": img}, 422, "prompts.0"),
        ("/v1/rewards/brightness:score", {"prompts": ["a"], "images": [{"format": "gif", "data": ""}]}, 422, "images.0.format"),
        ("/v1/rewards/brightness:score", {"prompts": ["a"], "images": img, "extra": 1}, 422, "extra"),
        ("/v1/rewards/brightness:score", {"images": img}, 422, "prompts"),
        ("/v1/rewards/brightness:score", b"{not json", 422, "JSON"),
        ("/v1/score", b'{"rewards": {"brightness": NaN}, "prompts": ["a"], "images": ' + json.dumps(img).encode() + b"}",
         422, "rewards.brightness"),
        ("/v1/score", b'{"rewards": {"brightness": 1e400}, "prompts": ["a"], "images": ' + json.dumps(img).encode() + b"}",
         422, "rewards.brightness"),
        ("/v1/score", {"rewards": {}, "prompts": ["a"], "images": img}, 422, "rewards is empty"),
        ("/v1/score", {"rewards": {"nope": 1.0}, "prompts": ["a"], "images": img}, 404, "known rewards: ['brightness', 'clip']"),
        ("/v1/rewards/nope:score", {"prompts": ["a"], "images": img}, 404, "known rewards: ['brightness', 'clip']"),
        ("/v1/rewards/brightness:score", {"prompts": ["a"] * 65, "images": img * 65}, 413, "max_images_per_request=64"),
        ("/v1/rewards/brightness:score", {"prompts": ["a"], "images": [{"format": "raw", "data": "A" * 2**21, "shape": [1, 1, 3]}]},
         413, "max_body_bytes=1048576"),
    ]


@pytest.mark.parametrize("path,body,status,text", _bad_requests(), ids=lambda v: v if isinstance(v, int) else None)
def test_bad_request_status(svc, path, body, status, text):
    if isinstance(body, bytes):
        r = httpx.post(svc.url + path, content=body, headers={"content-type": "application/json"}, timeout=30)
    else:
        r = _post(svc.url, path, body)
    assert r.status_code == status, r.text
    assert text in r.json()["detail"], r.json()
    _assert_service_ok(svc.url)


def test_streamed_body_over_limit_is_413(svc):
    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"prompts": ["a"], "images": [{"format": "raw", "shape": [1, 1, 3], "data": "'
        for _ in range(20):
            yield b"A" * 2**17
        yield b'"}]}'

    r = httpx.post(svc.url + "/v1/rewards/brightness:score", content=chunks(),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"], (r.status_code, r.text)
    _assert_service_ok(svc.url)


def test_handle_rewards_equal_in_process(svc, clip_local):
    imgs, prompts = _images(6, 24, 24, seed=5), ["a cat"] * 3 + ["a dog"] * 3
    total, parts = HandleRewards(svc.app_name, [("brightness", 1.0), ("clip", 0.25)])(imgs, prompts)
    want_total, want = WeightedRewards([(make_reward("brightness"), 1.0), (clip_local, 0.25)])(imgs, prompts)
    assert total.dtype == np.float32 and total.shape == (6,)
    np.testing.assert_allclose(parts["brightness"], want["brightness"], rtol=1e-5)
    np.testing.assert_allclose(parts["clip"], want["clip_score"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(total, want_total, rtol=1e-4, atol=1e-3)
    # ensure_reward_service reuses the running app when the component's config hash matches (it did
    # not deploy it, so it will not delete it); a reward it lacks, or one configured otherwise, is refused.
    h = ensure_reward_service([svc.component("brightness")], app_name=svc.app_name)
    assert h.owned_app is None
    np.testing.assert_allclose(h(imgs, prompts)[0], want["brightness"], rtol=1e-5)
    with pytest.raises(RewardAppMismatch, match="reward 'aesthetic' is not served"):
        ensure_reward_service([("aesthetic", 1.0)], app_name=svc.app_name)
    with pytest.raises(RewardAppMismatch, match="num_cpus: running 0.1, asked 1.0.*reward.reuse=replace"):
        ensure_reward_service([{**svc.component("brightness"), "num_cpus": 1.0}], app_name=svc.app_name)
    # raydiff eval names rewards only: by_name takes the served deployment as configured there.
    assert ensure_reward_service([("brightness", 1.0)], app_name=svc.app_name, reuse="by_name").owned_app is None
    with pytest.raises(RewardAppMismatch, match="'aesthetic' is not served"):
        ensure_reward_service([("aesthetic", 1.0)], app_name=svc.app_name, reuse="by_name")


def test_client_retries_connection_errors():
    from conftest import free_port

    c = RewardClient(f"http://127.0.0.1:{free_port()}", max_retries=2, backoff=0.01)
    with pytest.raises(RewardServiceError, match="gave up after 3 attempts"):
        c.catalogue()
    assert c.retries == 2 and c.ready() is False


@pytest.fixture(scope="module")
def aux_app(svc):
    """A second app on the same proxy: bearer token required, and a reward that backpressures early."""
    from ray import serve

    from raydiff.rewards.serve import build_app
    from raydiff.rewards.service_config import RewardServiceConfig

    cfg = RewardServiceConfig(
        app_name="raydiff-rewards-aux", route_prefix="/aux", token_env="RAYDIFF_TEST_TOKEN", retry_after_s=2,
        rewards=[dict(name="tight", reward="jpeg_incompressibility", num_cpus=0.1, max_batch_size=1,
                      max_ongoing_requests=1, max_queued_requests=1)],
    )
    os.environ["RAYDIFF_TEST_TOKEN"] = "s3cret"
    try:
        serve.run(build_app(cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)
    finally:
        del os.environ["RAYDIFF_TEST_TOKEN"]  # only the digest was shipped to the ingress
    yield svc.url + "/aux"
    serve.delete(cfg.app_name)


def test_bearer_token(aux_app):
    body = {"prompts": ["a"], "images": encode_images(_images(1))}
    assert httpx.get(aux_app + "/healthz").status_code == 200  # probes need no token
    r = _post(aux_app, "/v1/rewards/tight:score", body)
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert _post(aux_app, "/v1/rewards/tight:score", body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(aux_app + "/v1/rewards").status_code == 401
    ok = _post(aux_app, "/v1/rewards/tight:score", body, headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200 and ok.json()["errors"] == [None]
    assert RewardClient(aux_app, token="s3cret").catalogue()[0]["name"] == "tight"
    with pytest.raises(RewardServiceError) as e:
        RewardClient(aux_app, token="nope").catalogue()
    assert e.value.status == 401


def test_overload_is_503_with_retry_after(aux_app):
    # Smooth 512x512 images: small as PNG, but each JPEG encode takes a while in the replica.
    grad = np.linspace(0, 255, 512, dtype=np.float32)
    imgs = np.stack([np.stack(np.broadcast_arrays(grad[:, None], grad[None, :], grad[:, None] * 0 + k), -1)
                     for k in range(16)]).astype(np.uint8)
    body = {"prompts": ["a"] * 16, "images": encode_images(imgs, "png")}
    auth = {"Authorization": "Bearer s3cret"}
    with ThreadPoolExecutor(12) as ex:
        codes = list(ex.map(lambda _: _post(aux_app, "/v1/rewards/tight:score", body, headers=auth), range(12)))
    busy = [r for r in codes if r.status_code == 503]
    assert busy and all(r.headers["retry-after"] == "2" and "overloaded" in r.json()["detail"] for r in busy)
    assert all(r.status_code in (200, 503) for r in codes) and any(r.status_code == 200 for r in codes)
    ok = _post(aux_app, "/v1/rewards/tight:score", {"prompts": ["a"], "images": encode_images(_images(1))}, headers=auth)
    assert ok.status_code == 200


def _running_replicas(app: str, dep: str) -> int:
    from ray import serve

    return serve.status().applications[app].deployments[dep].replica_states.get("RUNNING", 0)


def test_killed_replica_is_replaced_without_failed_requests(svc):
    """Kill one brightness replica mid-traffic: Serve replaces it and retrying clients see no failure."""
    import ray

    replicas = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["namespace"] == "serve" and a["name"].startswith(f"SERVE_REPLICA::{svc.app_name}#reward_brightness#")]
    assert len(replicas) == 2
    stop, failures, done = threading.Event(), [], []

    def traffic(seed):
        client = RewardClient(svc.url, max_retries=8, backoff=0.1)
        imgs = _images(2, 16, 16, seed=seed)
        while not stop.is_set():
            try:
                s = client.score("brightness", imgs, ["a", "b"])
                assert np.allclose(s, imgs.reshape(2, -1).mean(1) / 255, rtol=1e-5)
                done.append(1)
            except Exception as e:  # noqa: BLE001
                failures.append(repr(e))

    threads = [threading.Thread(target=traffic, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    warm = time.time() + 60  # traffic flowing before the kill (first requests are slow on a busy machine)
    while not done and time.time() < warm:
        time.sleep(0.2)
    before = len(done)
    ray.kill(ray.get_actor(replicas[0]["name"], namespace="serve"), no_restart=True)
    deadline = time.time() + 180

    def replaced() -> bool:  # Serve has seen the death (the old name is gone) and runs 2 again; right after the
        # kill serve.status() can still count the dead replica as RUNNING, so the count alone ends the wait too early
        names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"}
        return replicas[0]["name"] not in names and _running_replicas(svc.app_name, "reward_brightness") == 2

    while time.time() < deadline and not replaced():
        time.sleep(0.5)
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join(60)
    assert not failures, failures[:3]
    assert before > 0 and len(done) > before
    assert _running_replicas(svc.app_name, "reward_brightness") == 2
    names = {a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == "serve"}
    assert replicas[0]["name"] not in names  # a new replica, not the old one restarted


def test_owned_app_reuse_replace_and_delete_on_failure(svc, tmp_path):
    """ensure_reward_service: deploys and owns an absent app, reuses one with the same config hash, refuses
    other args (or replaces them); a training run that fails after deploying its app deletes it."""
    from ray import serve

    from raydiff.config import load_config
    from raydiff.engine.trainer import Trainer
    from raydiff.rewards.serve.reuse import app_details

    comp = {"name": "brightness", "num_cpus": 0.1}
    h = ensure_reward_service([comp], app_name="own-app")
    assert h.owned_app == "own-app"
    assert ensure_reward_service([comp], app_name="own-app").owned_app is None  # same hash: reused, not owned
    with pytest.raises(RewardAppMismatch, match="max_batch_size: running 16, asked 4"):
        ensure_reward_service([{**comp, "max_batch_size": 4}], app_name="own-app")
    h2 = ensure_reward_service([{**comp, "max_batch_size": 4}], app_name="own-app", reuse="replace")
    assert h2.owned_app == "own-app"
    config = app_details("own-app").deployments["reward_brightness"].deployment_config.user_config["config"]
    assert config["max_batch_size"] == 4
    h2.delete_owned_app()
    assert "own-app" not in serve.status().applications
    # A reward no node could ever hold fails at once naming the field, instead of serve.run waiting forever.
    from raydiff.engine.cluster.placement import PlacementError

    with pytest.raises(PlacementError, match=r"remove 'reward' from reward.components\[0\].resources"):
        ensure_reward_service([{**comp, "resources": {"reward": 1}}], app_name="nowhere-app")
    assert "nowhere-app" not in serve.status().applications

    cfg = load_config("configs/tiny_ddpo.yaml", [
        f"output.run_dir={tmp_path}", "output.progress=false", "reward.backend=serve", "reward.serve_app=fail-app",
        "reward.components=[{name: brightness, num_cpus: 0.1}]", "learner.engine=torch", "learner.num_workers=2"])
    with pytest.raises(ValueError, match="needs learner.engine=deepspeed"):
        Trainer(cfg).run()  # fails after _start_roles deployed fail-app
    assert "fail-app" not in serve.status().applications
