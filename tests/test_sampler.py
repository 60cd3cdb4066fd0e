"""The rollout sampler reproduces diffusers' pipelines and its log-probs are exact Gaussian log-densities."""


import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from raydiff.config import ModelSection
from raydiff.models.loader import load_model
from raydiff.sampling.conditioning import encode_prompts
from raydiff.sampling.steps.ddim import backward_log_prob, ddim_step
from raydiff.sampling.sampler import decode_float, predict_noise, sample

PROMPTS = ["a cat", "a red dog"]


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def model(request, tiny_sd, tiny_sdxl):
    path = tiny_sd if request.param == "sd" else tiny_sdxl
    m = load_model(ModelSection(path=path, attention="default"))
    with torch.no_grad():  # a non-zero LoRA, so the comparison covers adapters too
        for n, p in m.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    return m


def _pipeline(model):
    cls = StableDiffusionXLPipeline if model.kind == "sdxl" else StableDiffusionPipeline
    extra = {} if model.kind == "sdxl" else {"safety_checker": None, "feature_extractor": None}
    pipe = cls(vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=model.unet,
               scheduler=DDIMScheduler.from_config(model.scheduler.config),
               **({"text_encoder_2": model.text_encoders[1], "tokenizer_2": model.tokenizers[1]} if model.kind == "sdxl" else extra))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_images_equal_diffusers_pipeline(model, eta):
    pipe = _pipeline(model)
    ref = pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, eta=eta,
               generator=torch.Generator().manual_seed(3), output_type="latent").images
    cond = encode_prompts(model, PROMPTS)
    traj = sample(model, cond, PROMPTS, 4, 5.0, eta, torch.Generator().manual_seed(3))
    torch.testing.assert_close(traj.latents[:, -1], ref.float(), atol=1e-5, rtol=1e-5)
    ref_img = pipe(PROMPTS, num_inference_steps=4, guidance_scale=5.0, eta=eta,
                   generator=torch.Generator().manual_seed(3), output_type="np").images
    assert np.abs(traj.images.astype(int) - (ref_img * 255).round().astype(int)).max() <= 1


def test_recomputed_log_prob_equals_sampled(model):
    cond = encode_prompts(model, PROMPTS)
    traj = sample(model, cond, PROMPTS, 4, 5.0, 1.0, torch.Generator().manual_seed(0))
    model.scheduler.set_timesteps(4)
    for j, t in enumerate(traj.timesteps):
        with torch.no_grad():
            eps = predict_noise(model, traj.latents[:, j], t, cond, 5.0)
        out = ddim_step(model.scheduler, eps, t, traj.latents[:, j], 1.0, prev_sample=traj.latents[:, j + 1])
        torch.testing.assert_close(out.log_prob, traj.log_probs[:, j], atol=1e-5, rtol=0)


def test_kept_noise_gives_the_per_element_behaviour_density(model):
    """extras['noise'] is the realised z of the stored x_{t-1}: −z²/2 − log σ − ½ log 2π is the learner's per-element density."""
    from raydiff.algorithms.common import behaviour_element_log_prob
    from raydiff.sampling.policy import Policy

    cond = encode_prompts(model, PROMPTS)
    traj = sample(model, cond, PROMPTS, 4, 5.0, 1.0, torch.Generator().manual_seed(0), keep_noise=True)
    assert traj.extras["noise"].shape == traj.latents[:, 1:].shape
    policy = Policy(model)
    for j in range(4):
        with torch.no_grad():
            lp_d, std = policy.element_log_prob(traj, j)
        beh_d = behaviour_element_log_prob(traj.extras["noise"][:, j], std)
        torch.testing.assert_close(beh_d, lp_d, atol=1e-3, rtol=0)
        torch.testing.assert_close(beh_d.mean(dim=(1, 2, 3)), traj.log_probs[:, j], atol=1e-5, rtol=0)


def test_log_prob_equals_torch_normal(model):
    torch.manual_seed(0)
    model.scheduler.set_timesteps(10)
    t = model.scheduler.timesteps[3]
    x_t, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    out = ddim_step(model.scheduler, eps, t, x_t, 1.0, generator=torch.Generator().manual_seed(1))
    ref = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, ref, atol=1e-5, rtol=0)
    # backward kernel q(x_t | x_{t-1}) against its closed form
    a_t = model.scheduler.alphas_cumprod[int(t)]
    a_prev = model.scheduler.alphas_cumprod[int(t) - 100]
    ratio = a_t / a_prev
    ref_b = torch.distributions.Normal(ratio.sqrt() * out.prev_sample, (1 - ratio).sqrt()).log_prob(x_t).mean(dim=(1, 2, 3))
    torch.testing.assert_close(backward_log_prob(model.scheduler, t, x_t, out.prev_sample), ref_b, atol=1e-5, rtol=0)


def test_log_prob_depends_on_schedule_and_eta_zero_is_nan(model):
    model.scheduler.set_timesteps(4)
    t = model.scheduler.timesteps[0]
    x = torch.randn(1, 4, 8, 8)
    eps = torch.randn(1, 4, 8, 8)
    assert torch.isnan(ddim_step(model.scheduler, eps, t, x, 0.0).log_prob).all()
    with pytest.raises(RuntimeError, match="set_timesteps"):
        fresh = DDIMScheduler.from_config(model.scheduler.config)
        ddim_step(fresh, eps, t, x, 1.0)


def test_decode_float_keeps_graph(model):
    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    decode_float(model, z).mean().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
