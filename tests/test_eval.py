"""`raydiff eval`: stats hand-checked; a tiny checkpoint vs its base through the CLI and the served rewards."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from raydiff.eval.stats import aggregate, paired_delta, summarize, t_quantile


def test_t_quantile_known_values():
    # Tables: t_{0.975}(1)=12.7062, (2)=4.3027, (4)=2.7764, (9)=2.2622, (30)=2.0423
    for df, want in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]:
        assert t_quantile(0.975, df) == pytest.approx(want, abs=2e-3)


def test_summarize_hand_checked():
    s = summarize([1.0, 2.0, 3.0, 4.0, 5.0])
    # mean 3, sample std sqrt(2.5), sem sqrt(2.5)/sqrt(5) = 0.70711, t_{0.975}(4) = 2.7764
    assert s["mean"] == 3.0 and s["std"] == pytest.approx(math.sqrt(2.5))
    assert s["ci_low"] == pytest.approx(3 - 2.7764 * 0.707107, abs=2e-3)
    assert s["ci_high"] == pytest.approx(3 + 2.7764 * 0.707107, abs=2e-3)
    one = summarize([np.nan, 2.0])
    assert one["n"] == 1 and one["n_nan"] == 1 and math.isnan(one["ci_low"])


def test_aggregate_uses_prompts_and_paired_delta():
    a = np.array([[1.0, 3.0], [2.0, 4.0], [6.0, 6.0]])  # per-prompt means 2, 3, 6
    s = aggregate(a)
    assert s["unit"] == "prompt" and s["n"] == 3 and s["mean"] == pytest.approx(11 / 3)
    d = paired_delta(a + 1.0, a)  # constant shift: zero-width CI at 1
    assert d["mean"] == pytest.approx(1.0) and d["ci_low"] == pytest.approx(1.0) and d["significant"]
    with pytest.raises(ValueError):
        paired_delta(a, a[:2])


def test_prompt_sets():
    from raydiff.eval.prompts import resolve_prompt_set

    p = resolve_prompt_set("parti:animals", limit=3)
    assert len(p.prompts) == 3 and all(m["category"] == "Animals" for m in p.metadata)
    assert resolve_prompt_set("parti", category="Animals", limit=2).prompts == p.prompts[:2]
    with pytest.raises(ValueError, match="categories"):
        resolve_prompt_set("parti:NoSuchThing")
    g = resolve_prompt_set("geneval", limit=2)
    assert g.metadata[0]["include"][0]["count"] == 1
    g = resolve_prompt_set("geneval", per_tag=2)
    assert len(g.prompts) == 12 and [m["tag"] for m in g.metadata].count("position") == 2
    with pytest.raises(ValueError, match="--per-tag applies to --prompts geneval only"):
        resolve_prompt_set("parti", per_tag=2)


def make_tiny_checkpoint(tiny_sd: str, run_dir):
    """A run dir with one checkpoint: LoRA B perturbed so the policy differs from its base."""
    from _checkpoints import perturbed_lora_checkpoint

    from raydiff.config import load_config, to_yaml

    cfg = load_config(None, [f"model.path={tiny_sd}", "model.lora.rank=4", "model.lora.alpha=4",
                             "sampling.num_steps=3", "sampling.guidance_scale=2.0"])
    return perturbed_lora_checkpoint(run_dir, cfg.model, to_yaml(cfg))


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_sd, tmp_path_factory):
    return make_tiny_checkpoint(tiny_sd, tmp_path_factory.mktemp("evalrun"))


def test_eval_checkpoint_vs_base_cli(ray_cluster, serve_rewards, tiny_sd, tiny_ckpt, tmp_path):
    from raydiff.cli import main

    out = tmp_path / "eval"
    rc = main(["eval", "--checkpoint", str(tiny_ckpt.parent.parent), "--base", tiny_sd, "--prompts", "parti:Animals",
               "--limit", "3", "--num-per-prompt", "2", "--rewards", "brightness,clip:0.5", "--batch-size", "4",
               "--workers", "2", "--num-cpus", "0.5", "--reward-app", serve_rewards.app_name, "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["steps"] == 3 and res["guidance_scale"] == 2.0  # from the checkpoint's config
    assert set(res["policies"]) == {"checkpoint", "base"}
    ck = res["policies"]["checkpoint"]
    assert ck["weights"] == "learner.pt" and set(ck["aggregate"]) == {"total", "brightness", "clip"}
    assert np.array(ck["scores"]["total"]).shape == (3, 2) and len(ck["per_prompt"]) == 3
    total = np.array(ck["scores"]["brightness"]) + 0.5 * np.array(ck["scores"]["clip"])
    assert np.allclose(total, ck["scores"]["total"], atol=1e-5)
    agg = ck["aggregate"]["total"]
    assert agg["unit"] == "prompt" and agg["ci_low"] <= agg["mean"] <= agg["ci_high"]
    d = res["comparison"]["delta"]["brightness"]
    a, b = (np.array(res["policies"][k]["scores"]["brightness"]).mean(1) for k in ("checkpoint", "base"))
    assert d["mean"] == pytest.approx(float((a - b).mean()), abs=1e-6) and d["mean"] != 0.0
    assert "geneval" not in res  # PartiPrompts have no GenEval metadata
    md = (out / "eval.md").read_text()
    assert "| checkpoint | total |" in md and "checkpoint − base" in md
    for f in ("grid_checkpoint.png", "grid_base.png", "compare_grid.png"):
        assert (out / f).stat().st_size > 0


def test_eval_export_matches_learner_pt(ray_cluster, serve_rewards, tiny_sd, tiny_ckpt, tmp_path):
    """The diffusers export and learner.pt load the same policy: identical scores, zero delta."""
    from raydiff.cli import main

    out = tmp_path / "eval"
    rc = main(["eval", "--checkpoint", str(tiny_ckpt / "learner" / "export"), "--compare", str(tiny_ckpt),
               "--prompts", "simple_animals", "--limit", "2", "--num-per-prompt", "1", "--rewards", "brightness",
               "--num-cpus", "0.5", "--reward-app", serve_rewards.app_name, "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["policies"]["checkpoint"]["weights"] == "export" and res["policies"]["compare"]["weights"] == "learner.pt"
    np.testing.assert_allclose(res["policies"]["checkpoint"]["scores"]["total"],
                               res["policies"]["compare"]["scores"]["total"], atol=1e-3)
