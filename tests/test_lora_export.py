"""Exported LoRA loads in plain diffusers and reproduces the trained model's output."""

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

from raydiff.config import ModelSection
from raydiff.models.loader import load_model
from raydiff.models.lora import export_weights, load_trainable_state_dict, state_checksum, trainable_state_dict
from raydiff.sampling.conditioning import encode_prompts
from raydiff.sampling.sampler import sample


@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_lora_export_reloads_in_diffusers(kind, tiny_sd, tiny_sdxl, tmp_path):
    path = tiny_sd if kind == "sd" else tiny_sdxl
    model = load_model(ModelSection(path=path, lora={"rank": 4, "alpha": 8}))  # alpha != rank: metadata matters
    with torch.no_grad():
        for n, p in model.unet.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    export_weights(model, tmp_path / "lora")
    cls = StableDiffusionXLPipeline if kind == "sdxl" else StableDiffusionPipeline
    extra = {} if kind == "sdxl" else {"safety_checker": None}
    pipe = cls.from_pretrained(path, **extra)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    run = lambda: pipe(["a cat"], num_inference_steps=3, guidance_scale=4.0, eta=0.0,
                       generator=torch.Generator().manual_seed(0), output_type="latent").images
    base = run()
    pipe.load_lora_weights(str(tmp_path / "lora"))
    tuned = run()
    assert (tuned - base).abs().max() > 1e-3, "the LoRA did not change the pipeline's output"
    ours = sample(model, encode_prompts(model, ["a cat"]), ["a cat"], 3, 4.0, 0.0, torch.Generator().manual_seed(0))
    torch.testing.assert_close(tuned.float(), ours.latents[:, -1], atol=1e-4, rtol=1e-4)


def test_trainable_state_round_trip_and_checksum(tiny_sd):
    a = load_model(ModelSection(path=tiny_sd))
    b = load_model(ModelSection(path=tiny_sd))
    with torch.no_grad():
        for n, p in a.unet.named_parameters():
            if p.requires_grad:
                p.add_(0.01)
    sa = trainable_state_dict(a.unet)
    assert state_checksum(sa) != state_checksum(trainable_state_dict(b.unet))
    load_trainable_state_dict(b.unet, sa)
    assert state_checksum(trainable_state_dict(b.unet)) == state_checksum(sa)
    bad = dict(sa)
    bad.pop(next(iter(bad)))
    with pytest.raises(ValueError, match="1 missing"):
        load_trainable_state_dict(b.unet, bad)
