"""Fused-LoRA rollouts: exactly reversible, same images as the live adapters, new versions applied correctly."""

import numpy as np
import torch

from raydiff.config import ModelSection, load_config
from raydiff.engine.rollouts.worker import RolloutWorker
from raydiff.models.loader import load_model
from raydiff.models.lora import state_checksum, trainable_state_dict
from raydiff.models.lora_fuse import RolloutWeights
from raydiff.sampling.conditioning import encode_prompts
from raydiff.sampling.sampler import sample

PROMPTS = ["a cat", "a red dog"]


def _model(tiny_sd):
    torch.manual_seed(0)
    m = load_model(ModelSection(path=tiny_sd))
    _randomise_lora(m.unet, 0)
    return m


def _randomise_lora(unet, seed, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def _run(m, seed=1):
    cond = encode_prompts(m, PROMPTS, "")
    return sample(m, cond, PROMPTS, 4, 5.0, 1.0, torch.Generator().manual_seed(seed))


def _assert_same(a, b):
    torch.testing.assert_close(a.latents, b.latents, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.log_probs, b.log_probs, atol=1e-4, rtol=1e-5)
    assert np.abs(a.images.astype(int) - b.images.astype(int)).max() <= 1


def _base_state(unet):
    return {n: p.detach().clone() for n, p in unet.named_parameters() if "base_layer" in n}


def test_fuse_is_exactly_reversible_and_images_equal(tiny_sd):
    m = _model(tiny_sd)
    base = state_checksum(_base_state(m.unet))
    live = _run(m)
    w = RolloutWeights(m.unet, fuse=True)
    assert w.enabled and w.fused
    assert state_checksum(_base_state(m.unet)) != base  # the delta is in the base weights now
    fused = _run(m)
    _assert_same(fused, live)
    w.unfuse()
    assert state_checksum(_base_state(m.unet)) == base  # bit-exact restore, not W + d - d
    assert torch.equal(_run(m).latents, live.latents)


def test_new_version_after_fuse_matches_unfused_model_with_new_weights(tiny_sd):
    m_fused, m_live = _model(tiny_sd), _model(tiny_sd)
    w = RolloutWeights(m_fused.unet, fuse=True)
    _randomise_lora(m_live.unet, 7)
    new_state = trainable_state_dict(m_live.unet)
    w.load(new_state)
    assert w.fused
    assert state_checksum(trainable_state_dict(m_fused.unet)) == state_checksum(new_state)
    _assert_same(_run(m_fused), _run(m_live))
    w.unfuse()  # the base weights are still the pristine ones: no drift over versions
    assert state_checksum(_base_state(m_fused.unet)) == state_checksum(_base_state(m_live.unet))


def test_rollout_worker_fuses_by_default_and_applies_updates(tiny_sd):
    cfg = load_config("configs/tiny_ddpo.yaml", [f"model.path={tiny_sd}", "sampling.batch_size=2", "sampling.num_steps=3"])
    fused = RolloutWorker(cfg)
    live = RolloutWorker(load_config("configs/tiny_ddpo.yaml", [f"model.path={tiny_sd}", "sampling.batch_size=2",
                                                                "sampling.num_steps=3", "rollout.fuse_lora=false"]))
    assert fused.weights.fused and not live.weights.enabled
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in trainable_state_dict(fused.model.unet).items()}
    update = {"version": 1, "state": state, "checksum": state_checksum(state)}
    assert fused.set_weights(update) and live.set_weights(update)
    assert fused.weights_checksum() == live.weights_checksum() == (1, update["checksum"])
    _assert_same(fused.generate(PROMPTS, seed=5), live.generate(PROMPTS, seed=5))
