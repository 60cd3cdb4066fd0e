"""Differentiable DDIM sampler and the reward-backprop learners (AlignProp, DRaFT-K/LV, DRTune).

Gradient checks run a 3-step chain of the tiny SD model in float64: the autograd
directional derivative along a random LoRA direction must match central finite
differences for full backprop; truncation and DRTune's stop-grad must cut exactly
the paths they claim to. The e2e runs train each algorithm through `Trainer.run()`.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from raydiff.config import ConfigError, RewardSection, load_config
from raydiff.models.loader import load_model
from raydiff.rewards.simple import Brightness
from raydiff.sampling.conditioning import encode_prompts
from raydiff.sampling.differentiable import (
    GradPlan,
    adapters_disabled,
    decode_with_grad,
    last_k,
    sample_with_grad,
    spread_steps,
)
from raydiff.sampling.sampler import sample

PROMPTS = ["a cat", "a dog"]
T = 3


def _lora_params(model):
    return [p for n, p in model.unet.named_parameters() if p.requires_grad]


@pytest.fixture(scope="module")
def model64(tiny_sd):
    """Tiny SD in float64 with a perturbed (active) LoRA, so every path carries gradient."""
    cfg = load_config(None, [f"model.path={tiny_sd}", "model.lora.rank=2", "model.lora.alpha=2"]).model
    torch.manual_seed(0)
    m = load_model(cfg, "cpu")
    m.unet.double()
    m.vae.double()
    m.dtype = torch.float64
    with torch.no_grad():
        for n, p in m.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    cond = encode_prompts(m, PROMPTS).to("cpu", torch.float64)
    x_T = torch.randn(len(PROMPTS), 4, m.latent_size, m.latent_size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    return m, cond, x_T


def _reward(m, out):
    """Mean brightness of the decoded images, all in float64 (decode_float casts to float32, too coarse for finite differences)."""
    lat = torch.cat([out.latents, *out.lv_latents]) if out.lv_latents else out.latents
    img = m.vae.decode(lat / m.vae.config.scaling_factor, return_dict=False)[0]
    return (img / 2 + 0.5).mean()


def _run(m, cond, x_T, plan, eta=0.0, checkpointing=True, seed=3, **kw):
    gen = torch.Generator().manual_seed(seed)
    return sample_with_grad(m, cond, plan, guidance_scale=3.0, eta=eta, generator=gen, latents=x_T, checkpointing=checkpointing, **kw)


def _grads(m, cond, x_T, plan, **kw):
    params = _lora_params(m)
    for p in params:
        p.grad = None
    x = x_T.clone().requires_grad_(True)
    _reward(m, _run(m, cond, x, plan, **kw)).backward()
    return [None if p.grad is None else p.grad.clone() for p in params], x.grad


class UNetCalls:
    """Forward pre-hook on the UNet: per call, (grad mode on, input requires grad)."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append((torch.is_grad_enabled(), bool(args[0].requires_grad)))

    def close(self):
        self.handle.remove()


def test_full_backprop_matches_finite_differences(model64):
    """eta = 1: the step noise comes from the seeded generator, so every evaluation sees the same noise."""
    m, cond, x_T = model64
    eta = 1.0
    plan = last_k(T, T)
    params = _lora_params(m)
    g = torch.Generator().manual_seed(7)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    norm = torch.sqrt(sum((d**2).sum() for d in direction))
    direction = [d / norm for d in direction]

    grads, _ = _grads(m, cond, x_T, plan, eta=eta)
    analytic = sum((gr * d).sum() for gr, d in zip(grads, direction)).item()

    def f(scale):
        with torch.no_grad():
            for p, d in zip(params, direction):
                p.add_(scale * d)
            val = _reward(m, _run(m, cond, x_T, plan, eta=eta)).item()
            for p, d in zip(params, direction):
                p.sub_(scale * d)
            return val

    h = 1e-4
    numeric = (f(h) - f(-h)) / (2 * h)
    assert abs(analytic) > 1e-6, "degenerate check: the directional derivative is ~0"
    assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-9)

    # Checkpointing recomputes the same graph: identical gradients without it.
    grads_nock, _ = _grads(m, cond, x_T, plan, eta=eta, checkpointing=False)
    for a, b in zip(grads, grads_nock):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-14)


def test_truncation_leaves_earlier_steps_without_gradient(model64):
    m, cond, x_T = model64
    calls = UNetCalls(m.unet)
    try:
        grads, xg = _grads(m, cond, x_T, last_k(T, 1), checkpointing=False)  # no recompute calls in the record
    finally:
        calls.close()
    # Only the last UNet call runs with autograd; x_T gets no gradient at all.
    assert [c[0] for c in calls.calls] == [False, False, True]
    assert xg is None
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)
    # K = 1 differs from full backprop (earlier steps contribute there).
    full, xg_full = _grads(m, cond, x_T, last_k(T, T))
    assert xg_full is not None and xg_full.abs().sum() > 0
    assert any(not torch.allclose(a, b) for a, b in zip(grads, full))


def test_drtune_stop_grad_blocks_the_unet_input_path(model64):
    m, cond, x_T = model64
    plan = GradPlan(T, frozenset(range(T)), truncate=False, stop_grad_input=True)
    calls = UNetCalls(m.unet)
    try:
        grads, xg = _grads(m, cond, x_T, plan, checkpointing=False)
    finally:
        calls.close()
    # Every UNet call is differentiated (params get gradient through ε̂) but sees a detached input.
    assert calls.calls == [(True, False)] * T
    assert any(gr is not None and gr.abs().sum() > 0 for gr in grads)
    # d r / d x_T is exactly the linear DDIM path with every ε̂ constant: no UNet Jacobian in it.
    _, xg_linear = _grads(m, cond, x_T, GradPlan(T, frozenset(), truncate=False))
    torch.testing.assert_close(xg, xg_linear, rtol=1e-10, atol=1e-14)
    _, xg_full = _grads(m, cond, x_T, last_k(T, T))
    assert not torch.allclose(xg, xg_full)


def test_early_stop_and_chain_match_the_rollout_sampler(model64):
    m, cond, x_T = model64
    traj = sample(m, cond, PROMPTS, T, 3.0, eta=0.0, latents=x_T, keep_x0=True)
    with torch.no_grad():
        full = _run(m, cond, x_T, GradPlan(T, frozenset()))
        early = _run(m, cond, x_T, GradPlan(T, frozenset({0}), truncate=False, stop_at=1))
    torch.testing.assert_close(full.latents.float(), traj.latents[:, -1].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(early.latents.float(), traj.extras["x0_pred"][:, 1], rtol=1e-5, atol=1e-5)
    assert early.unet_calls == 2


def test_draft_lv_renoising_is_deterministic_and_differentiable(model64):
    m, cond, x_T = model64
    plan = last_k(T, 1, lv_renoise=2)
    a = _run(m, cond, x_T, plan, seed=5)
    b = _run(m, cond, x_T, plan, seed=5)
    assert len(a.lv_latents) == 2 and a.unet_calls == T + 2 and a.unet_calls_with_grad == 3
    for u, v in zip(a.lv_latents, b.lv_latents):
        torch.testing.assert_close(u, v, rtol=0, atol=0)
    assert not torch.allclose(a.lv_latents[0], a.lv_latents[1])
    assert all(lv.requires_grad for lv in a.lv_latents)


def test_draft_lv_gradient_is_the_mean_of_per_copy_gradients_and_skips_the_chain(model64):
    """DRaFT-LV as Clark et al. Algorithm 2: the chain runs without gradient; the loss's gradient is
    the mean of the n re-noised copies' gradients, and nothing flows into the chain (x_T, x_0)."""
    from raydiff.algorithms.draft import DRaFT
    from raydiff.algorithms.draft import Config as DraftConfig

    m, cond, x_T = model64
    plan = DRaFT(DraftConfig(variant="lv", lv_renoise=2), None).plan(T, random.Random(0))
    assert plan.grad_steps == frozenset() and plan.lv_renoise == 2
    x = x_T.clone().requires_grad_(True)
    out = _run(m, cond, x, plan, seed=5)
    assert not out.latents.requires_grad and out.unet_calls_with_grad == 2
    params = _lora_params(m)
    bright = [(m.vae.decode(lv / m.vae.config.scaling_factor, return_dict=False)[0] / 2 + 0.5).mean() for lv in out.lv_latents]
    per_copy = [torch.autograd.grad(b, params, retain_graph=True, allow_unused=True) for b in bright]
    total = torch.autograd.grad(torch.stack(bright).mean(), params, retain_graph=True, allow_unused=True)
    nonzero = 0
    for k, g in enumerate(total):
        gs = [pc[k] for pc in per_copy]
        if g is None:
            assert all(v is None for v in gs)
            continue
        torch.testing.assert_close(g, sum(gs) / len(gs), rtol=1e-10, atol=1e-14)
        nonzero += int(g.abs().sum() > 0)
    assert nonzero > 0
    torch.stack(bright).mean().backward()
    assert x.grad is None  # no gradient reached the chain's start


def test_plans():
    rng = random.Random(0)
    for run, k in [(50, 5), (7, 3), (4, 4), (3, 5)]:
        steps = sorted(spread_steps(run, k, rng))
        assert len(steps) == min(k, run) and steps[0] < run // min(k, run) and steps[-1] < run
    with pytest.raises(ValueError, match="outside the chain"):
        GradPlan(3, frozenset({3}))


def test_reference_regulariser_and_sdxl(tiny_sdxl):
    cfg = load_config(None, [f"model.path={tiny_sdxl}"]).model
    m = load_model(cfg, "cpu")
    cond = encode_prompts(m, PROMPTS)
    ref = lambda: adapters_disabled(m.unet)
    out = sample_with_grad(m, cond, last_k(T, 2), 3.0, generator=torch.Generator().manual_seed(0), reference=ref)
    assert out.reg is not None and out.reg.item() == 0.0  # fresh LoRA (B = 0) is the base model
    with torch.no_grad():
        for n, p in m.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    out = sample_with_grad(m, cond, last_k(T, 2), 3.0, generator=torch.Generator().manual_seed(0), reference=ref)
    loss = -Brightness().score_tensor(decode_with_grad(m, out.latents), PROMPTS).mean() + out.reg
    assert out.reg.item() > 0
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in _lora_params(m))


def test_non_differentiable_reward_is_rejected_by_name():
    from raydiff.algorithms.registry import make_algorithm

    cfg = load_config(None, ["algorithm.name=alignprop"])
    rewards = RewardSection(components=[{"name": "brightness"}, {"name": "jpeg_compressibility"}])
    with pytest.raises(ConfigError, match=r"reward\.components\[1\]\.name='jpeg_compressibility'"):
        make_algorithm(cfg.algorithm, cfg.sampling, rewards)


def test_objective_guards():
    from raydiff.algorithms.registry import make_algorithm

    r = torch.tensor([0.2, 0.5, 0.9])
    cfg = load_config(None, ["algorithm.name=draft", "algorithm.reward_target=0.5"])
    torch.testing.assert_close(make_algorithm(cfg.algorithm, cfg.sampling).objective(r), torch.tensor([-0.3, 0.0, -0.4]))
    cfg = load_config(None, ["algorithm.name=drtune", "algorithm.reward_clip=0.6"])
    torch.testing.assert_close(make_algorithm(cfg.algorithm, cfg.sampling).objective(r), torch.tensor([0.2, 0.5, 0.6]))
    algo = make_algorithm(load_config(None, ["algorithm.name=alignprop", "algorithm.eval_every=5"]).algorithm, cfg.sampling)
    assert algo.needs.mode == "sync" and [v for v in range(12) if algo.should_evaluate(v)] == [5, 10]


@pytest.mark.parametrize("config", ["configs/tiny_alignprop.yaml", "configs/tiny_draft_lv.yaml", "configs/tiny_drtune.yaml"])
def test_reward_rises_end_to_end(ray_cluster, tmp_path, config):
    from raydiff.engine.metrics import read_metrics
    from raydiff.engine.trainer import Trainer

    # 2 Ray Train workers, each a DeepSpeed engine; every epoch checks both ranks hold identical weights.
    cfg = load_config(config, [f"output.run_dir={tmp_path}", "output.progress=false", "output.tensorboard=false",
                               "learner.num_workers=2", "train.verify_weights_every=1"])
    Trainer(cfg).run()
    metrics = read_metrics(tmp_path)
    rewards = [m["reward/mean"] for m in metrics]
    assert len(rewards) == cfg.train.num_epochs
    first, last = np.mean(rewards[:3]), np.mean(rewards[-3:])
    assert last > first + 0.04, f"reward did not rise: first epochs {rewards[:3]}, last {rewards[-3:]}"
    for key in ("reward/std", "grad/norm", "grad/trained_steps", "train/loss"):
        assert key in metrics[0], key
    assert list((tmp_path / "samples").glob("step_*.png"))
    assert all(m["policy/weights_consistent"] == 1 for m in metrics)
