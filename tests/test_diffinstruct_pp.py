"""Diff-Instruct++: IKL gradient vanishes at assistant = reference, one UNet call per image,
the tiny run learns through the Trainer, and the exported generator loads and generates."""

import numpy as np
import pytest
from conftest import train_config
import torch

from raydiff.algorithms.diffinstruct_pp import Config, DiffInstructPP
from raydiff.config import LearnerSection, ModelSection, RewardSection, SamplingSection
from raydiff.engine import checkpoint as ckpt
from raydiff.engine.learners.learner import Learner
from raydiff.engine.metrics import read_metrics
from raydiff.engine.learners.optim import TorchStepper
from raydiff.models.loader import load_model
from raydiff.models.one_step import OneStepPipeline, one_step_x0
from raydiff.sampling.conditioning import encode_prompts
from raydiff.sampling.sampler import initial_noise

PROMPTS = ["a cat", "a dog", "a fox"]


def _setup(tiny_sd, **cfg):
    torch.manual_seed(0)
    model = load_model(ModelSection(path=tiny_sd), "cpu")
    alg = DiffInstructPP(Config(t_star=500, distill_from_reference=True, **cfg), SamplingSection(), RewardSection())
    modules = alg.build_modules(model)
    cond = encode_prompts(model, PROMPTS)
    return model, alg, modules, cond


def _ikl_grads(model, alg, cond, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x0 = one_step_x0(model, initial_noise(model, len(PROMPTS), gen), cond, alg.config.t_star)
    loss, stats = alg.ikl_loss(model, x0, cond, gen)
    params = model.trainable_parameters()
    return torch.autograd.grad(loss, params), stats


@pytest.mark.parametrize("weighting", ["dmd", "sigma"])
def test_ikl_gradient_zero_at_reference_and_nonzero_after_assistant_moves(tiny_sd, weighting):
    model, alg, modules, cond = _setup(tiny_sd, ref_guidance_scale=1.0, weighting=weighting)
    grads, stats = _ikl_grads(model, alg, cond)
    assert stats["dipp/ikl"] == 0.0
    assert all(float(g.abs().max()) == 0.0 for g in grads)
    with torch.no_grad():  # the assistant moves (as after DSM steps on generator samples)
        for n, p in modules["assistant"].named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    grads, stats = _ikl_grads(model, alg, cond)
    assert stats["dipp/ikl"] > 0
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_ikl_surrogate_gradient_matches_score_difference(tiny_sd):
    """d loss / d x_0 = w(t)·√ᾱ_t·(s_ψ − s_ref)/d with s = −ε/σ (hand-computed from the UNet outputs)."""
    model, alg, modules, cond = _setup(tiny_sd, weighting="uniform")
    with torch.no_grad():
        for n, p in modules["assistant"].named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
    x0 = torch.randn(len(PROMPTS), 4, 8, 8, requires_grad=True)
    gen = torch.Generator().manual_seed(3)
    loss, _ = alg.ikl_loss(model, x0, cond, gen)
    (g,) = torch.autograd.grad(loss, x0)
    x_t, t, _, a = alg.noise(model, x0.detach(), torch.Generator().manual_seed(3))  # same draws
    from raydiff.sampling.sampler import predict_noise

    with torch.no_grad():
        eps_psi = predict_noise(model, x_t, t, cond, 1.0, unet=modules["assistant"].unet)
        with alg.reference(model)[1]:
            eps_ref = predict_noise(model, x_t, t, cond, 1.0)
    sigma = (1 - a).sqrt()
    s_psi, s_ref = -eps_psi / sigma, -eps_ref / sigma
    expected = a.sqrt() * (s_psi - s_ref) / (x0[0].numel() * len(PROMPTS))
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-7)


def _hand_eps(unet, x_t, t, embeds):
    return unet(x_t, t, encoder_hidden_states=embeds).sample.float()


def test_cfg_reference_direction_for_omega_not_one(tiny_sd):
    """ω = 3: d loss / d x_0 = √ᾱ·(s_ψ − s_ref^ω)/d, s_ref^ω from ε_∅ + ω(ε_c − ε_∅) of direct base-UNet calls;
    descending it moves x_0 along s_ref^ω − s_ψ, i.e. towards the guided reference (further along ε_c − ε_∅)."""
    model, alg, modules, cond = _setup(tiny_sd, weighting="uniform", ref_guidance_scale=3.0)
    x0 = torch.randn(len(PROMPTS), 4, 8, 8, requires_grad=True)
    loss, _ = alg.ikl_loss(model, x0, cond, torch.Generator().manual_seed(4))
    (g,) = torch.autograd.grad(loss, x0)
    x_t, t, _, a = alg.noise(model, x0.detach(), torch.Generator().manual_seed(4))
    with torch.no_grad(), alg.reference(model)[1]:
        e_u = _hand_eps(model.unet, x_t, t, cond.neg_embeds)
        e_c = _hand_eps(model.unet, x_t, t, cond.embeds)
    with torch.no_grad():
        e_psi = _hand_eps(modules["assistant"].unet, x_t, t, cond.embeds)
    sigma = (1 - a).sqrt()
    e_ref = e_u + 3.0 * (e_c - e_u)
    expected = a.sqrt() * ((e_ref - e_psi) / sigma) / (x0[0].numel() * len(PROMPTS))
    torch.testing.assert_close(g, expected, rtol=1e-4, atol=1e-7)
    # The assistant starts as the conditional reference, so here s_ψ − s_ref^ω = (ω − 1)(ε_c − ε_∅)/σ:
    # the descent direction −g points along −(ε_c − ε_∅), i.e. along the guided score s_c − s_∅.
    cfg_dir = a.sqrt() * (2.0 * (e_c - e_u) / sigma) / (x0[0].numel() * len(PROMPTS))
    torch.testing.assert_close(g, cfg_dir, rtol=1e-3, atol=1e-7)
    assert float((g * (e_c - e_u)).sum()) > 0


def test_dmd_weight_and_dsm_target_hand_computed(tiny_sd):
    model, alg, modules, cond = _setup(tiny_sd, weighting="dmd")
    g = torch.Generator().manual_seed(5)
    x0, x_t, eps_ref = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    a = torch.tensor([0.9, 0.5, 0.1]).view(-1, 1, 1, 1)
    w = alg.weight(x0, x_t, eps_ref, a)
    for i in range(3):  # DMD: σ²/(ᾱ · mean|x_0 − x̂_0^ref|), x̂_0^ref = (x_t − σ ε_ref)/√ᾱ
        s2, ai = 1 - float(a[i]), float(a[i])
        x0_ref = (x_t[i] - s2**0.5 * eps_ref[i]) / ai**0.5
        assert float(w[i]) == pytest.approx(s2 / (ai * float((x0[i] - x0_ref).abs().mean())), rel=1e-5)
    with torch.no_grad():
        for n, p in modules["assistant"].named_parameters():
            if "lora_B" in n:
                p.add_(0.05 * torch.randn_like(p))
        dsm = alg.dsm_loss(model, x0, cond, torch.Generator().manual_seed(6))
        gen = torch.Generator().manual_seed(6)  # the same draws, in noise()'s order: t, then ε
        t = torch.randint(alg.config.t_min, alg.config.t_max + 1, (3,), generator=gen)
        eps = torch.randn(x0.shape, generator=gen)
        ab = model.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
        pred = _hand_eps(modules["assistant"].unet, ab.sqrt() * x0 + (1 - ab).sqrt() * eps, t, cond.embeds)
    assert float(dsm) == pytest.approx(float((pred - eps).pow(2).mean()), rel=1e-5)  # target: the added noise ε


def test_real_model_configs_need_a_generator():
    from raydiff.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="algorithm.generator_path is required"):
        load_config("configs/diffinstruct_pp_sd15.yaml", ["algorithm.generator_path=null"])
    assert load_config("configs/diffinstruct_pp_sd15.yaml").algorithm.generator_path
    assert load_config("configs/tiny_diffinstruct_pp.yaml").algorithm.distill_from_reference


def test_stepper_group_option_leaves_other_groups_untouched():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    st = TorchStepper([{"name": "policy", "params": [a]}, {"name": "assistant", "params": [b]}], LearnerSection(weight_decay=0.5, learning_rate=0.1), 1)
    st.backward((a * b).sum(), groups=["assistant"])  # both get grads; only b may move
    assert torch.equal(a.detach(), torch.ones(3)) and not torch.equal(b.detach(), torch.ones(3))
    assert set(st.group_grad_norms) == {"assistant"}
    with pytest.raises(ValueError, match="unknown optimiser groups"):
        st.backward((a * b).sum(), groups=["critic"])


def test_generator_is_one_unet_call_per_image(tiny_sd):
    pipe = OneStepPipeline.from_pretrained(tiny_sd, t_star=500)
    calls = []
    hook = pipe.model.unet.register_forward_hook(lambda m, args, kwargs_out=None: calls.append(args[0].shape[0]))
    images = pipe(PROMPTS, seed=1)
    hook.remove()
    assert calls == [len(PROMPTS)]  # one batched call: exactly one UNet evaluation per image
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, pipe(PROMPTS, seed=1))


@pytest.fixture(scope="module")
def dipp_run(ray_cluster, tmp_path_factory):
    return train_config("configs/tiny_diffinstruct_pp.yaml", tmp_path_factory.mktemp("tiny_dipp"))


def test_tiny_run_reward_rises_ikl_bounded_dsm_falls(dipp_run):
    cfg, run_dir = dipp_run
    m = read_metrics(run_dir)
    assert len(m) == cfg.train.num_epochs
    for key in ("reward/mean", "dipp/ikl", "dipp/dsm_loss", "train/grad_norm"):  # per-group norms: engine=torch only
        assert key in m[0], key
    series = {k: np.array([x[k] for x in m]) for k in ("reward/mean", "dipp/ikl", "dipp/dsm_loss")}
    r, ikl, dsm = series["reward/mean"], series["dipp/ikl"], series["dipp/dsm_loss"]
    assert r[-4:].mean() > r[:4].mean() + 0.01, f"reward did not rise: {r.round(4)}"
    assert np.isfinite(ikl).all() and ikl.max() < 1.0, f"IKL not bounded: {ikl.round(4)}"
    assert dsm[-4:].mean() < dsm[:4].mean() - 0.05, f"assistant DSM loss did not fall: {dsm.round(4)}"
    assert len(list((run_dir / "samples").glob("step_*.png"))) == cfg.train.num_epochs


def test_exported_generator_loads_and_matches_learner(dipp_run, tiny_sd):
    cfg, run_dir = dipp_run
    last = ckpt.latest_checkpoint(run_dir)
    export = last / "learner" / "export"
    assert (export / "pytorch_lora_weights.safetensors").is_file()
    # Checkpoint holds only the assistant's trainable (LoRA) weights, not a UNet copy.
    state = torch.load(last / "learner" / "learner.pt", weights_only=False)
    assert state["modules"]["assistant"] and all("lora_" in k for k in state["modules"]["assistant"])

    pipe = OneStepPipeline.from_pretrained(tiny_sd, lora_dir=str(export), t_star=cfg.algorithm.t_star)
    images = pipe(PROMPTS, seed=5)
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8

    learner = Learner(cfg)
    learner.load(str(last / "learner"))
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        z = initial_noise(learner.model, len(PROMPTS), g)
        ref = one_step_x0(learner.model, z, encode_prompts(learner.model, PROMPTS), cfg.algorithm.t_star)
    torch.testing.assert_close(pipe.latents(PROMPTS, seed=5), ref, rtol=1e-4, atol=1e-4)
    base = OneStepPipeline.from_pretrained(tiny_sd, t_star=cfg.algorithm.t_star)
    assert not torch.allclose(base.latents(PROMPTS, seed=5), ref, atol=1e-3)  # the export changed the generator
