r"""One-step text-to-image generation: the generator Diff-Instruct++ trains, and how to load an exported one.

The generator is a diffusion UNet applied once at a fixed timestep t* to pure noise
(the ε-prediction's x̂_0, Luo 2024 / DMD2's "one-step from t = T−1"):

    z ~ N(0, I) (taken as x_{t*}),   x_0 = g_θ(z, c) = (z − √(1−ᾱ_{t*}) ε_θ(z, t*, c)) / √ᾱ_{t*}

with the conditional branch only (no CFG), so one image costs exactly one UNet call
(a batch of N images: one batched call). Latents are decoded by the VAE.

Loading what a DI++ run exported (`<run>/checkpoints/step_*/learner/export/`)::

    from raydiff.models.one_step import OneStepPipeline
    pipe = OneStepPipeline.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5",
                                           lora_dir="runs/dipp/checkpoints/step_000199/learner/export",
                                           t_star=999, device="cuda")
    images = pipe(["a photo of a cat"], seed=0)          # uint8 (N, H, W, 3)

`lora_dir` is a LoRA export (`pytorch_lora_weights.safetensors`, loaded with diffusers'
own `load_lora_weights`, so plain diffusers pipelines can load it too); an export of
`model.finetune=full` holds `unet/` instead and is passed as `unet_dir`. `t_star` must be
the run's `algorithm.t_star` (also in the run's config.yaml). `generate_one_step(...)`
is the one-call function form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import torch

from raydiff.sampling.conditioning import encode_prompts
from raydiff.sampling.sampler import decode_images, initial_noise, predict_noise


def one_step_x0(model, z: torch.Tensor, cond, t_star: int, unet=None) -> torch.Tensor:
    """x_0 = (z − √(1−ᾱ_{t*}) ε(z, t*, c)) / √ᾱ_{t*}: one conditional UNet call, keeps the graph.

    z: (N, C, h, w) latents taken as x_{t*}; cond: `Conditioning` for N prompts; returns (N, C, h, w).
    """
    a = model.scheduler.alphas_cumprod[int(t_star)].to(z.device, torch.float32)
    t = torch.full((z.shape[0],), int(t_star), device=z.device, dtype=torch.long)
    eps = predict_noise(model, z, t, cond, 1.0, unet=unet)
    return ((z.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()).to(z.dtype)


def _load_lora(model, lora_dir: str) -> None:
    """Load a LoRA export into `model.unet` through diffusers' pipeline loader (the path users take)."""
    pipe = model.family.pipeline(model)
    pipe.load_lora_weights(str(lora_dir))
    if not getattr(model.unet, "peft_config", None):
        raise ValueError(f"lora_dir {lora_dir!r}: no UNet LoRA layers were loaded (expected pytorch_lora_weights.safetensors from export_weights)")


class OneStepPipeline:
    """A base diffusion model plus an exported DI++ generator; `__call__` makes images in one UNet call."""

    def __init__(self, model, t_star: int):
        self.model, self.t_star = model, int(t_star)
        n_train = model.scheduler.config.num_train_timesteps
        if not 0 <= self.t_star < n_train:
            raise ValueError(f"t_star={t_star} must be in [0, {n_train - 1}]")

    @classmethod
    def from_pretrained(cls, base: str, lora_dir: Optional[str] = None, unet_dir: Optional[str] = None,
                        t_star: int = 999, device: str = "cpu", dtype: str = "auto") -> "OneStepPipeline":
        """`base`: hub id, diffusers folder or tiny://sd; `lora_dir` (LoRA export) or `unet_dir` (full export)."""
        from diffusers import UNet2DConditionModel

        from raydiff.config import ModelSection
        from raydiff.models.loader import load_model

        model = load_model(ModelSection(path=base, dtype=dtype, finetune="full"), device)
        model.unet.requires_grad_(False)
        if unet_dir is not None:
            d = Path(unet_dir)
            d = d / "unet" if (d / "unet" / "config.json").is_file() else d
            model.denoiser = UNet2DConditionModel.from_pretrained(str(d), dtype=model.dtype).to(model.device).requires_grad_(False)
        if lora_dir is not None:
            _load_lora(model, lora_dir)
        model.unet.eval()
        return cls(model, t_star)

    @torch.no_grad()
    def latents(self, prompts: list[str], seed: int = 0, negative_prompt: str = "") -> torch.Tensor:
        """Generator latents x_0 (N, C, h, w): one batched conditional UNet call."""
        g = torch.Generator(device=self.model.device).manual_seed(int(seed))
        z = initial_noise(self.model, len(prompts), g)
        cond = encode_prompts(self.model, list(prompts), negative_prompt)
        return one_step_x0(self.model, z, cond, self.t_star)

    def __call__(self, prompts: list[str], seed: int = 0) -> np.ndarray:
        """uint8 images (N, H, W, 3) for `prompts`; the same seed gives the same images."""
        return decode_images(self.model, self.latents(prompts, seed))


def generate_one_step(base: str, lora_dir: Optional[str], prompts: list[str], seed: int = 0, t_star: int = 999,
                      unet_dir: Optional[str] = None, device: str = "cpu") -> np.ndarray:
    """Load `base` + an exported DI++ generator and return uint8 images (N, H, W, 3), one UNet call per image."""
    return OneStepPipeline.from_pretrained(base, lora_dir=lora_dir, unet_dir=unet_dir, t_star=t_star, device=device)(prompts, seed)
