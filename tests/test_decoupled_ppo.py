"""Decoupled PPO (algorithms/common.py) through DDPO's real train_step, at the gradient level.

Toy policy: 1-D Gaussian N(μ, σ²) over x, reward r(x) = −(x − 2)², J(μ) = E[r] = −(μ − 2)² − σ²,
so ∇_μ J = −2(μ − 2): 2.0 at μ = 1. Trajectories hold one step (T = 1), log-probs are the
exact Gaussian log-density (a 1-element mean).
"""

import numpy as np
import pytest
import torch

from raydiff.algorithms.common import (ADV_KEY, PROX_CURRENT_KEY, PROX_KEY, attach_proximal_log_probs, decoupled_ppo_loss,
                                      importance_weights)
from raydiff.algorithms.ddpo import DDPO, Config, ppo_clipped_loss
from raydiff.algorithms.base import shuffled_pieces
from raydiff.types import Conditioning, Trajectory

SIGMA = 0.5


class GaussianPolicy:
    """The learner's Policy interface (device, log_prob(batch, j)) for x_1 ~ N(μ, σ²)."""

    def __init__(self, mu):
        self.mu = torch.nn.Parameter(torch.as_tensor(mu, dtype=torch.float32).clone())
        self.device = torch.device("cpu")

    def log_prob(self, batch: Trajectory, j: int) -> torch.Tensor:
        return self.element_log_prob(batch, j)[0].mean(dim=1)

    def element_log_prob(self, batch: Trajectory, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = batch.latents[:, j + 1]  # (N, D)
        return torch.distributions.Normal(self.mu, SIGMA).log_prob(x), torch.tensor(SIGMA)


class GradRecorder:
    """Stepper interface: backward only (accumulates ∇μ of the loss), or plain SGD steps when lr > 0."""

    def __init__(self, policy: GaussianPolicy, lr: float = 0.0):
        self.policy, self.lr, self.steps = policy, lr, 0

    def backward(self, loss, groups=None):
        loss.backward()
        if self.lr:
            with torch.no_grad():
                self.policy.mu -= self.lr * self.policy.mu.grad
            self.policy.mu.grad = None
            self.steps += 1
        return bool(self.lr)


def toy_batch(n: int, mu_behaviour: float, staleness: int, seed: int = 0, dim: int = 1) -> Trajectory:
    """x ~ N(μ_b, σ² I_dim), reward −Σ_d (x_d − 2)², log-probs means over the dim elements, step noise kept."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, generator=g)
    x = mu_behaviour + SIGMA * z
    lp_b = torch.distributions.Normal(torch.tensor(mu_behaviour), SIGMA).log_prob(x).mean(dim=1)
    e = torch.zeros(n, 1, 1)
    return Trajectory(
        prompts=["p"] * n, latents=torch.stack([torch.zeros(n, dim), x], dim=1), timesteps=torch.tensor([1]),
        log_probs=lp_b[:, None], cond=Conditioning(e, e), images=np.zeros((n, 1, 1, 3), np.uint8), version=0,
        num_steps=1, guidance_scale=1.0, eta=1.0, rewards=(-((x - 2) ** 2).sum(dim=1)).numpy(),
        staleness=torch.full((n,), staleness), max_staleness=staleness, extras={"noise": z[:, None]})


def ddpo(**kw) -> DDPO:
    cfg = Config(per_prompt_stat_tracking=False, clip_range=0.2, **kw)
    return DDPO(cfg, sampling=None)


def per_sample_grads(algo: DDPO, policy: GaussianPolicy, batch: Trajectory) -> torch.Tensor:
    """−∇_μ loss for each sample alone (the ascent direction), through prepare_batch + train_step."""
    batch = algo.prepare_batch(policy, batch)
    out = []
    for i in range(len(batch)):
        policy.mu.grad = None
        algo.train_step(policy, GradRecorder(policy), batch.index([i]), torch.Generator().manual_seed(0))
        out.append(-policy.mu.grad.clone())
    return torch.stack(out)


def test_stale_gradient_matches_current_policys_true_gradient():
    """Behaviour μ = 0 (stale), current μ = 1: the mean gradient is ∇J(1) = 2.0 (not the behaviour's 4.0).

    A = r and no importance-weighted baseline (so the estimator is unbiased); c̄ large so nothing is truncated.
    Tolerance: 4 standard errors of the mean, and the standard error itself below 0.1.
    """
    algo = ddpo(is_clip=1e9, adv_clip_max=1e9, is_baseline=False)
    batch = toy_batch(4000, 0.0, staleness=2)
    batch.advantages = torch.as_tensor(batch.rewards, dtype=torch.float32)
    g = per_sample_grads(algo, GaussianPolicy(1.0), batch)
    mean, se = g.mean().item(), (g.std() / len(g) ** 0.5).item()
    assert se < 0.1, se
    assert abs(mean - 2.0) < 4 * se, (mean, se)
    assert abs(mean - 4.0) > 10 * se  # the behaviour policy's gradient (a delayed gradient) is far off
    # The whole batch in one train_step gives the same mean gradient (the loss is a mean over samples).
    policy = GaussianPolicy(1.0)
    metrics = algo.train_step(policy, GradRecorder(policy), batch, torch.Generator())
    assert -policy.mu.grad.item() == pytest.approx(mean, rel=1e-4)
    assert metrics["ratio_max_dev"] < 1e-6 and metrics["clipfrac"] == 0  # θ = prox on the first minibatch
    assert metrics["is_weight_max_dev"] > 0.5 and metrics["behaviour_approx_kl"] > 0


def test_per_element_stale_gradient_matches_current_policys_true_gradient():
    """D = 16 independent elements, behaviour μ_b = 0.75, current μ = 1 per element: ∇_μd J = 2.0 for every d.

    The per-element estimator (stale_objective=per_element) weights each element by its own
    π_prox,d / π_b,d, so with a batch-mean baseline A = r − mean r its mean gradient (×D: the loss
    is a mean over elements) is 2.0 per element. Tolerance: 4 standard errors of the mean over
    samples and elements, the standard error below 0.1. The per-sample geometric-mean weight on the
    same batch is off by > 3 of its standard errors (the pull towards π_b; measured 1.65 ± 0.08).
    """
    dim = 16
    batch = toy_batch(4000, 0.75, staleness=2, dim=dim)
    r = torch.as_tensor(batch.rewards, dtype=torch.float32)
    batch.advantages = r - r.mean()
    algo = ddpo(is_clip=1e9, adv_clip_max=1e9)
    assert algo.config.stale_objective == "per_element" and algo.needs.keep_noise
    g = per_sample_grads(algo, GaussianPolicy(torch.ones(dim)), batch) * dim  # (N, D)
    per_sample_mean = g.mean(dim=1)  # average over elements: the same expectation, less variance
    mean, se = per_sample_mean.mean().item(), (per_sample_mean.std() / len(g) ** 0.5).item()
    assert se < 0.1, se
    assert abs(mean - 2.0) < 4 * se, (mean, se)
    assert (g.mean(dim=0) - 2.0).abs().max() < 8 * g.std(dim=0).max() / len(g) ** 0.5  # every element
    geo = per_sample_grads(ddpo(is_clip=1e9, adv_clip_max=1e9, stale_objective="per_sample"),
                           GaussianPolicy(torch.ones(dim)), batch).mul(dim).mean(dim=1)
    geo_se = (geo.std() / len(geo) ** 0.5).item()
    assert abs(geo.mean().item() - 2.0) > 3 * geo_se, (geo.mean().item(), geo_se)
    # θ = prox: every per-element ratio is 1; the per-element weights spread (δ/σ = 0.5 per element).
    policy = GaussianPolicy(torch.ones(dim))
    metrics = algo.train_step(policy, GradRecorder(policy), algo.prepare_batch(policy, batch), torch.Generator())
    assert metrics["ratio_max_dev"] < 1e-6 and metrics["clipfrac"] == 0 and metrics["is_weight_max_dev"] > 1
    assert metrics["is_weight_mean"] == pytest.approx(1.0, abs=0.05)  # E_b[π_prox,d / π_b,d] = 1


def test_per_element_batch_keeps_fresh_samples_on_the_per_sample_loss():
    """In a stale batch, staleness-0 samples still get DDPO's per-sample loss (stored log-probs); stale ones per element."""
    dim = 4
    fresh, stale = toy_batch(4, 0.0, staleness=0, seed=1, dim=dim), toy_batch(4, 0.0, staleness=2, seed=2, dim=dim)
    algo = ddpo()
    batch = algo.prepare_batch(GaussianPolicy(torch.full((dim,), 0.3)), algo.prepare(Trajectory.cat([fresh, stale])))
    g = per_sample_grads(algo, GaussianPolicy(torch.full((dim,), 0.3)), batch)
    for i in range(4):
        policy = GaussianPolicy(torch.full((dim,), 0.3))
        one = batch.index([i])
        loss, _ = ppo_clipped_loss(policy.log_prob(one, 0), one.log_probs[:, 0], one.advantages.clamp(-5, 5), 0.2)
        loss.backward()
        torch.testing.assert_close(-policy.mu.grad, g[i])
    policy = GaussianPolicy(torch.full((dim,), 0.3))  # a stale sample: per-element weights (not the per-sample ones)
    one = batch.index([5])
    lp_d = policy.element_log_prob(one, 0)[0]
    beh_d = torch.distributions.Normal(0.0, SIGMA).log_prob(one.latents[:, 1])
    w_d = torch.exp(lp_d.detach() - beh_d)
    (-(one.advantages.clamp(-5, 5)[:, None] * w_d * torch.exp(lp_d - lp_d.detach())).mean()).backward()
    torch.testing.assert_close(-policy.mu.grad, g[5])


def test_per_element_objective_needs_the_step_noise():
    batch = toy_batch(8, 0.0, staleness=1)
    batch.extras.clear()
    with pytest.raises(ValueError, match="stale_objective"):
        ddpo().prepare_batch(GaussianPolicy(1.0), batch)


def test_importance_weighted_baseline_keeps_the_true_gradient_and_removes_offsets():
    """Behaviour μ = 0.5, current μ = 1: with A' = A − Σ w A / Σ w the mean gradient is still ∇J(1) = 2.0.

    A constant added to every advantage changes nothing (the baseline absorbs it), while
    without the baseline the same offset moves the estimate far (the pull towards π_b).
    """
    batch = toy_batch(4000, 0.5, staleness=2)
    batch.advantages = torch.as_tensor(batch.rewards, dtype=torch.float32) + 10.0
    algo = ddpo(is_clip=1e9, adv_clip_max=1e9, is_baseline=True)
    prepared = algo.prepare_batch(GaussianPolicy(1.0), batch)
    w = importance_weights(prepared.extras[PROX_KEY], prepared.log_probs, 1e9)
    assert (w * prepared.extras[ADV_KEY]).sum().abs() < 1e-2 * w.sum()  # Σ w A' = 0 per step
    g = per_sample_grads(algo, GaussianPolicy(1.0), batch)
    mean, se = g.mean().item(), (g.std() / len(g) ** 0.5).item()
    assert se < 0.15 and abs(mean - 2.0) < 4 * se, (mean, se)
    batch.advantages = batch.advantages - 10.0
    assert per_sample_grads(algo, GaussianPolicy(1.0), batch).mean().item() == pytest.approx(mean, rel=1e-3)
    batch.advantages = batch.advantages + 10.0
    raw = per_sample_grads(ddpo(is_clip=1e9, adv_clip_max=1e9, is_baseline=False), GaussianPolicy(1.0), batch)
    assert abs(raw.mean().item() - 2.0) > 0.5  # the uncentred estimator with the same offset is far off
    policy = GaussianPolicy(1.0)
    prepared = algo.prepare_batch(policy, batch)
    metrics = algo.train_step(policy, GradRecorder(policy), prepared, torch.Generator())
    assert metrics["is_baseline"] == pytest.approx(float(prepared.advantages.mean() - prepared.extras[ADV_KEY].mean()), rel=1e-4)


def test_truncation_bounds_weights():
    algo = ddpo(is_clip=2.0)
    batch = toy_batch(512, 0.0, staleness=1)
    batch = algo.prepare(batch)
    policy = GaussianPolicy(1.0)
    metrics = algo.train_step(policy, GradRecorder(policy), algo.prepare_batch(policy, batch), torch.Generator())
    assert 0 < metrics["is_truncated_frac"] < 1
    assert metrics["is_weight_max_dev"] == pytest.approx(1.0)  # w ≤ c̄ = 2 and w ≥ 0 hits the bound


def test_masked_importance_weights_drop_what_truncation_caps():
    """is_mode=mask: weights outside [1/c̄, c̄] are 0 (left out), those inside are the exact ratio; truncate caps at c̄."""
    log_w = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0])
    truncated = importance_weights(log_w, torch.zeros(5), 2.0)
    masked = importance_weights(log_w, torch.zeros(5), 2.0, "mask")
    assert torch.allclose(truncated, torch.exp(log_w).clamp(max=2.0))
    assert masked[0] == 0 and masked[-1] == 0 and torch.allclose(masked[1:4], torch.exp(log_w[1:4]))
    algo = ddpo(is_clip=2.0, is_mode="mask", stale_objective="per_sample")
    batch = algo.prepare(toy_batch(512, 0.0, staleness=1))
    policy = GaussianPolicy(1.0)
    metrics = algo.train_step(policy, GradRecorder(policy), algo.prepare_batch(policy, batch), torch.Generator())
    assert 0 < metrics["is_truncated_frac"] < 1 and metrics["is_weight_max_dev"] == pytest.approx(1.0)  # some w = 0


def test_clip_engages_once_a_step_moves_past_epsilon():
    """Two inner epochs with SGD: the first minibatch sees ρ ≡ 1, later ones a ratio beyond ε = 0.2."""
    algo = ddpo(num_inner_epochs=2, train_batch_size=64)
    policy = GaussianPolicy(1.0)
    batch = algo.prepare_batch(policy, algo.prepare(toy_batch(128, 0.0, staleness=1)))
    stepper = GradRecorder(policy, lr=0.5)
    rng = torch.Generator().manual_seed(0)
    seen = [algo.train_step(policy, stepper, mb, rng) for mb in algo.minibatches(batch, rng)]
    assert len(seen) == 4 and stepper.steps == 4
    assert seen[0]["clipfrac"] == 0 and seen[0]["ratio_max_dev"] < 1e-6
    assert max(m["clipfrac"] for m in seen[1:]) > 0
    assert max(m["ratio_max_dev"] for m in seen[1:]) > 0.2
    # π_prox stays the arrival-time policy: it is not re-evaluated between minibatches.
    assert torch.equal(batch.extras[PROX_KEY], algo.prepare_batch(GaussianPolicy(1.0), batch).extras[PROX_KEY])


def test_staleness_zero_is_fresh_ddpo_exactly():
    """At staleness 0, π_prox = the stored log-probs (no re-score): loss and gradient equal on-policy clipped PPO."""
    algo = ddpo(is_baseline=True)  # the baseline too must leave fresh batches alone
    policy = GaussianPolicy(0.3)  # differs from the behaviour μ = 0: a re-score would change π_prox

    def must_not_rescore(batch, j):
        raise AssertionError("re-scored a fresh batch")

    batch = algo.prepare(toy_batch(64, 0.0, staleness=0))
    batch = algo.prepare_batch(type("P", (), {"log_prob": must_not_rescore, "device": policy.device})(), batch)
    assert torch.equal(batch.extras[PROX_KEY], batch.log_probs) and ADV_KEY not in batch.extras  # no baseline either
    metrics = algo.train_step(policy, GradRecorder(policy), batch, torch.Generator())
    g_decoupled = policy.mu.grad.clone()
    policy.mu.grad = None
    lp = policy.log_prob(batch, 0)
    loss, stats = ppo_clipped_loss(lp, batch.log_probs[:, 0], batch.advantages.clamp(-5, 5), 0.2)
    loss.backward()
    assert torch.equal(policy.mu.grad, g_decoupled)
    assert metrics["loss"] == loss.item() and metrics["clipfrac"] == stats["clipfrac"]
    assert metrics["is_weight_mean"] == 1.0 and metrics["is_weight_max_dev"] == 0.0


def test_mixed_staleness_rescores_only_stale_samples():
    fresh, stale = toy_batch(4, 0.0, staleness=0, seed=1), toy_batch(4, 0.0, staleness=2, seed=2)
    batch = ddpo().prepare(Trajectory.cat([fresh, stale]))
    assert batch.sample_staleness().tolist() == [0] * 4 + [2] * 4 and batch.max_staleness == 2
    policy = GaussianPolicy(0.5)
    prox = attach_proximal_log_probs(policy, batch).extras[PROX_KEY]
    assert torch.equal(prox[:4], batch.log_probs[:4])
    with torch.no_grad():
        torch.testing.assert_close(prox[4:, 0], policy.log_prob(batch, 0)[4:])
    # A shard keeps the batch-level max (every rank re-scores) and its own per-sample staleness.
    shard = batch.shard(0, 2)
    assert shard.max_staleness == 2 and shard.sample_staleness().tolist() == [0, 0, 2, 2]


def test_loss_hand_computed():
    lp, prox, beh = torch.tensor([0.1, 0.0]), torch.tensor([0.0, 0.0]), torch.tensor([-0.5, 0.3])
    adv = torch.tensor([1.0, -2.0])
    loss, stats = decoupled_ppo_loss(lp, prox, beh, adv, clip_range=0.05, is_clip=1.5)
    w = np.minimum(np.exp([0.5, -0.3]), 1.5)
    r = np.exp([0.1, 0.0])
    per = [w[0] * max(-1 * r[0], -1 * 1.05), w[1] * max(2 * r[1], 2 * 1.0)]
    assert loss.item() == pytest.approx(np.mean(per), rel=1e-6)
    assert stats["is_truncated_frac"] == 0.5 and stats["is_weight_max_dev"] == pytest.approx(0.5)
    assert stats["clipfrac"] == 0.5 and stats["behaviour_approx_kl"] == pytest.approx(0.5 * np.mean([0.25, 0.09]))


def test_minibatches_keep_every_sample_and_padding_has_no_weight():
    batch = toy_batch(10, 0.0, 0)
    pieces = list(shuffled_pieces(batch, 4, 2, torch.Generator().manual_seed(0)))
    assert [len(p) for p in pieces] == [4, 3, 3] * 2
    assert sorted(float(v) for p in pieces[:3] for v in p.latents[:, 1, 0]) == sorted(batch.latents[:, 1, 0].tolist())
    padded = batch.index([0, 1, 2]).pad_to(5)
    assert len(padded) == 5 and padded.weights.tolist() == [1, 1, 1, 0, 0]


@pytest.mark.parametrize("objective", ["per_element", "per_sample"])
def test_deferred_proximal_pass_equals_scoring_up_front(objective):
    """One pass, no baseline: the first minibatch takes π_prox from its own forward (θ = π_prox, no step yet),
    later ones are scored before the first step. Same SGD trajectory and metrics as scoring everything up front."""
    dim = 4
    batch = Trajectory.cat([toy_batch(6, 0.0, staleness=0, seed=1, dim=dim), toy_batch(18, 0.0, staleness=2, seed=2, dim=dim)])
    runs = []
    for deferred in (True, False):
        algo, policy = ddpo(train_batch_size=8, stale_objective=objective), GaussianPolicy(torch.full((dim,), 0.4))
        b = algo.prepare(batch.index(torch.arange(len(batch))))
        rng = torch.Generator().manual_seed(0)
        stepper = GradRecorder(policy, lr=0.3)
        if deferred:
            b = algo.prepare_batch(policy, b)
            assert PROX_KEY not in b.extras and b.extras[PROX_CURRENT_KEY].tolist() == [False] * 6 + [True] * 18
            pieces = algo.minibatches(b, rng)
        else:  # the eager pass of every sample, then the base class's shuffled pieces
            b = attach_proximal_log_probs(policy, b, per_element=objective == "per_element")
            pieces = shuffled_pieces(b, 8, 1, rng)
        metrics = [algo.train_step(policy, stepper, mb, rng) for mb in pieces]
        runs.append((policy.mu.detach().clone(), metrics))
    assert stepper.steps == 3
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=1e-6, rtol=0)
    assert (runs[0][0] - 0.4).abs().max() > 1e-3  # it did move
    for m_def, m_eager in zip(runs[0][1], runs[1][1]):
        assert m_def.keys() == m_eager.keys()
        for k in m_def:
            assert m_def[k] == pytest.approx(m_eager[k], abs=1e-5), k
    assert max(m["ratio_max_dev"] for m in runs[0][1][1:]) > 0  # later minibatches: θ moved away from π_prox
