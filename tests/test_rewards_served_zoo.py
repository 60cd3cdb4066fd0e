"""geneval, ocr, imagereward, vlm_judge and win_rate on Ray Serve over real HTTP (tiny:// weights),
group-wise scoring through the API and handles, and `raydiff eval --prompts geneval --rewards geneval`."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from raydiff.rewards.base import make_reward
from raydiff.rewards.client import HandleRewards, RewardClient, encode_images

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

APP = "raydiff-zoo2"
GENEVAL_ARGS = {"detector_path": "tiny://owl", "clip_path": "tiny://clip", "threshold": 0.0, "counting_threshold": 0.0}


@pytest.fixture(scope="module")
def zoo(serve_rewards):
    """A second app on the session's Serve proxy (route /zoo2) serving the new rewards."""
    from ray import serve

    from conftest import free_port
    from raydiff.rewards.serve import deploy
    from raydiff.rewards.service_config import RewardServiceConfig

    dead = free_port()  # nothing listens there: vlm_judge falls back
    small = dict(num_cpus=0.1, max_batch_size=4, max_ongoing_requests=8)
    cfg = RewardServiceConfig(port=serve_rewards.cfg.port, app_name=APP, route_prefix="/zoo2", rewards=[
        dict(name="geneval", args=GENEVAL_ARGS, **small),
        dict(name="ocr", args={"model_path": "tiny://trocr", "crops": "both", "max_new_tokens": 6}, **small),
        dict(name="imagereward", args={"model_path": "tiny://imagereward"}, **small),
        dict(name="judge", reward="vlm_judge", args={"base_url": f"http://127.0.0.1:{dead}/v1", "required": False,
                                                     "fallback_score": 0.3, "max_retries": 0, "timeout_s": 2}, **small),
        dict(name="brightness_rank", reward="win_rate", args={"reward": "brightness"}, **small),
    ])
    from raydiff.models.weights import resolve_weights

    for kind in ("owl", "clip", "trocr", "imagereward"):  # build once here, not in racing replicas
        resolve_weights(f"tiny://{kind}")
    url = deploy(cfg)
    yield url
    serve.delete(APP)


def _imgs(levels, size=32):
    return np.stack([np.full((size, size, 3), v, np.uint8) for v in levels])


def test_catalogue_lists_new_rewards(zoo):
    cat = {r["name"]: r for r in RewardClient(zoo).catalogue()}
    assert set(cat) == {"geneval", "ocr", "imagereward", "judge", "brightness_rank"}
    assert cat["geneval"]["version"] == "geneval-owl-partial-1" and cat["geneval"]["range"] == [0.0, 1.0]
    assert cat["imagereward"]["differentiable"] is True and cat["ocr"]["version"] == "trocr-editdist-1"
    assert cat["brightness_rank"]["group_wise"] is True and cat["geneval"]["group_wise"] is False
    assert cat["judge"]["reward"] == "vlm_judge" and cat["judge"]["group_wise"] is False


def test_http_scores_equal_in_process(zoo):
    c = RewardClient(zoo)
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)
    gp = ["a photo of a dog right of a teddy bear", "a photo of two clocks", "a photo of a bench"]
    np.testing.assert_allclose(c.score("geneval", imgs, gp), make_reward("geneval", **GENEVAL_ARGS)(imgs, gp), atol=1e-6)
    op = ['A sign that says "OPEN"', 'A mug printed with "HELLO WORLD"', 'A note that says "BE KIND"']
    local = make_reward("ocr", model_path="tiny://trocr", crops="both", max_new_tokens=6)
    np.testing.assert_allclose(c.score("ocr", imgs, op, format="png"), local(imgs, op), atol=1e-6)
    ir = make_reward("imagereward", model_path="tiny://imagereward")
    np.testing.assert_allclose(c.score("imagereward", imgs, gp), ir(imgs, gp), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(c.score("judge", imgs, gp), [0.3] * 3, rtol=1e-6)  # endpoint down: fallback
    # a prompt without GenEval metadata is a per-item error; the other items are scored
    res = c.score_response("geneval", imgs[:2], ["a cat", gp[1]])
    assert "no GenEval metadata for prompt 'a cat'" in res["errors"][0] and res["errors"][1] is None


def test_group_wise_over_http(zoo):
    levels = [10, 200, 90, 250, 30]
    imgs = _imgs(levels)
    url = zoo + "/v1/rewards/brightness_rank:score"

    def post(**body):
        return httpx.post(url, json={"prompts": ["p"] * 5, "images": encode_images(imgs), **body}, timeout=60)

    # groups [[0,1,2],[3,4]]: 10 < 90 < 200 -> 0, 1, .5; 30 < 250 -> 1, 0
    r = post(groups=[[0, 1, 2], [3, 4]])
    assert r.status_code == 200, r.text
    np.testing.assert_allclose(r.json()["scores"], [0.0, 1.0, 0.5, 1.0, 0.0])
    np.testing.assert_allclose(post(group_ids=["a", "a", "a", 7, 7]).json()["scores"], [0.0, 1.0, 0.5, 1.0, 0.0])
    np.testing.assert_allclose(post().json()["scores"], [0.0, 0.75, 0.5, 1.0, 0.25])  # default: one prompt, one group
    for bad, msg in [({"groups": [[0, 1], [1, 2, 3, 4]]}, "groups.1: image 1 is in more than one group"),
                     ({"groups": [[0, 1, 2, 3, 9]]}, "groups.0: index 9 is out of range for 5 images"),
                     ({"groups": [[0, 1]]}, "groups cover 2 of 5 images"),
                     ({"groups": [[0, 1, 2, 3, 4]], "group_ids": [1] * 5}, "either groups or group_ids")]:
        r = post(**bad)
        assert r.status_code == 422 and msg in r.json()["detail"], r.text
    # an undecodable image leaves its group; the rest is ranked without it
    body = {"prompts": ["p"] * 5, "images": encode_images(imgs), "groups": [[0, 1, 2], [3, 4]]}
    body["images"][1] = {"format": "png", "data": "bm90IGEgcG5n"}
    res = httpx.post(url, json=body, timeout=60).json()
    assert res["errors"][1].startswith("undecodable PNG") and res["scores"][1] is None
    np.testing.assert_allclose([res["scores"][i] for i in (0, 2, 3, 4)], [0.0, 1.0, 1.0, 0.0])
    # mix: the pointwise judge (endpoint down: fallback 0.3) ignores groups, the group-wise one uses them
    total, parts = RewardClient(zoo).score_mix({"judge": 1.0, "brightness_rank": 2.0}, imgs, ["p"] * 5,
                                               groups=[[0, 1, 2], [3, 4]])
    np.testing.assert_allclose(parts["brightness_rank"], [0.0, 1.0, 0.5, 1.0, 0.0])
    np.testing.assert_allclose(total, 0.3 + 2 * parts["brightness_rank"], atol=1e-5)


def test_group_wise_over_handles(zoo):
    h = HandleRewards(APP, [("brightness_rank", 1.0)])
    imgs = _imgs([10, 200, 90, 250])
    total, _ = h(imgs, ["a", "b", "a", "b"])  # default groups: by prompt -> {0, 2}, {1, 3}
    np.testing.assert_allclose(total, [0.0, 0.0, 1.0, 1.0])
    total, _ = h(imgs, ["a", "b", "a", "b"], groups=[[0, 1, 2, 3]])
    np.testing.assert_allclose(total, [0.0, 2 / 3, 1 / 3, 1.0])


def test_eval_geneval_per_tag_table(zoo, tiny_sd, tmp_path):
    from raydiff.cli import main

    out = tmp_path / "eval"
    rc = main(["eval", "--base", tiny_sd, "--prompts", "geneval", "--per-tag", "1", "--num-per-prompt", "2",
               "--steps", "2", "--rewards", "geneval", "--reward-app", APP, "--batch-size", "6", "--num-cpus", "0.5",
               "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "eval.json").read_text())
    g = res["geneval"]
    assert g["reward"] == "geneval" and g["version"] == "geneval-owl-partial-1"
    table = g["policies"]["base"]
    assert list(table["tags"]) == ["single_object", "two_object", "counting", "colors", "position", "color_attr"]
    scores = np.array(res["policies"]["base"]["scores"]["geneval"])  # (6 prompts, 2 samples)
    assert scores.shape == (6, 2) and ((0 <= scores) & (scores <= 1)).all()
    for i, (tag, row) in enumerate(table["tags"].items()):
        assert row["images"] == 2 and row["accuracy"] == pytest.approx(float((scores[i] == 1.0).mean()))
        assert row["mean_score"] == pytest.approx(float(scores[i].mean()))
    assert table["overall"] == pytest.approx(np.mean([r["accuracy"] for r in table["tags"].values()]))
    md = (out / "eval.md").read_text()
    assert "## GenEval" in md and "| counting | 1 | 2 |" in md and "overall (mean over tags)" in md
    assert "Mask2Former" in md
