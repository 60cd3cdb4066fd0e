"""Log-prob numerics: fp32 step maths for bf16 samples, no NaN at the last step, η validated per algorithm."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from raydiff.config import ConfigError, load_config
from raydiff.sampling.steps.ddim import ddim_step


def _scheduler(set_alpha_to_one: bool, steps: int = 4) -> DDIMScheduler:
    s = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                      set_alpha_to_one=set_alpha_to_one, steps_offset=1)
    s.set_timesteps(steps)
    return s


def test_bf16_inputs_get_fp32_maths_and_the_rounded_sample_is_scored():
    sched = _scheduler(False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).bfloat16()
    eps = torch.randn(2, 4, 8, 8, generator=g).bfloat16()
    t = int(sched.timesteps[1])
    out = ddim_step(sched, eps, t, x, 1.0, generator=torch.Generator().manual_seed(1))
    assert out.mean.dtype == torch.float32 and out.log_prob.dtype == torch.float32
    assert out.prev_sample.dtype == torch.bfloat16  # what the next step consumes
    ref = ddim_step(sched, eps.float(), t, x.float(), 1.0, prev_sample=out.prev_sample.float())  # same inputs, fp32
    torch.testing.assert_close(out.mean, ref.mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.log_prob, ref.log_prob, rtol=0, atol=1e-6)
    # Hand density of the bf16-rounded draw under the fp32 Gaussian.
    std = float(out.std)
    hand = (-((out.prev_sample.float() - ref.mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, hand, rtol=0, atol=1e-5)


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_last_step_log_prob_is_finite(set_alpha_to_one):
    """ᾱ_prev of the last step is ᾱ_0 (prev_t clamped to 0 as ddpo-pytorch): σ > 0, the log-prob finite."""
    sched = _scheduler(set_alpha_to_one)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    last = int(sched.timesteps[-1])
    out = ddim_step(sched, eps, last, x, 1.0, generator=g)
    assert float(out.std) > 0 and torch.isfinite(out.log_prob).all()
    a0 = sched.alphas_cumprod[0]
    a_t = sched.alphas_cumprod[last]
    assert float(out.std) == pytest.approx(float(((1 - a0) / (1 - a_t) * (1 - a_t / a0)).sqrt()), rel=1e-5)


@pytest.mark.parametrize("algorithm,eta,field_msg", [
    ("ddpo", 0.0, "sampling.eta=0.0"), ("dag", 0.5, "sampling.eta=0.5"), ("dag", 0.0, "sampling.eta=0.0")])
def test_undefined_log_prob_configs_fail_at_validation(algorithm, eta, field_msg):
    with pytest.raises((ConfigError, ValueError), match=field_msg.replace(".", r"\.")):
        load_config(None, [f"algorithm.name={algorithm}", f"sampling.eta={eta}"])
    load_config(None, [f"algorithm.name={algorithm}", "sampling.eta=1.0"])
    load_config(None, ["algorithm.name=alignprop", "sampling.eta=0.0"])  # no log-probs: η = 0 is fine
