"""SD 1.x and SDXL families: UNet2DConditionModel, ε-prediction, DDIM (sampling/steps/ddim.py).

Prompt encoding matches diffusers' pipelines token for token. SD: last hidden state of the
CLIP text encoder. SDXL: penultimate hidden states of both encoders concatenated, pooled
embeds from the second, and add_time_ids (orig_h, orig_w, crop_top, crop_left, target_h,
target_w); an empty negative prompt gives zero embeddings when the model says
`force_zeros_for_empty_prompt` (as the SDXL pipeline does). CFG runs both branches in one
batched UNet call (negative first, as diffusers does).
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from diffusers.utils.torch_utils import randn_tensor

from raydiff.models.family import load_parts, register_family
from raydiff.types import Conditioning


def autocast_for(model):
    """bf16/fp16 autocast on GPU when the frozen weights are half precision; nothing on CPU fp32."""
    if model.device.type == "cuda" and model.dtype != torch.float32:
        return torch.autocast("cuda", dtype=model.dtype)
    return contextlib.nullcontext()


def tokens(tokenizer, prompts: list[str], device, max_length: Optional[int] = None) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=max_length or tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def cfg_combine(out: torch.Tensor, guidance_scale: float, return_cond: bool):
    """ε_u + w (ε_c − ε_u) from a [negative; positive] batched output."""
    u, c = out.chunk(2)
    g = u + guidance_scale * (c - u)
    return (g, c) if return_cond else g


class SDFamily:
    name = "sd"
    step_kind = "ddim"
    denoiser_folder = "unet"
    pipeline_class = "StableDiffusionPipeline"
    two_encoders = False

    def matches(self, index: dict) -> bool:
        return "unet" in index and ("text_encoder_2" in index) == self.two_encoders

    def load_components(self, path: str, dtype: torch.dtype, revision: Optional[str]) -> dict:
        from diffusers import DDIMScheduler, UNet2DConditionModel
        from transformers import (
            CLIPTextModel,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
        )

        text = [(CLIPTokenizer, CLIPTextModel, "")] + ([(CLIPTokenizer, CLIPTextModelWithProjection, "_2")] if self.two_encoders else [])
        return load_parts(path, dtype, revision, UNet2DConditionModel, "unet", DDIMScheduler, text)

    def default_resolution(self, model) -> int:
        return model.denoiser.config.sample_size * model.vae_scale_factor

    @torch.no_grad()
    def _encode(self, model, prompts: list[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        return model.text_encoders[0](tokens(model.tokenizers[0], prompts, model.device))[0], None

    def encode(self, model, prompts: list[str], negative_prompt: str = "") -> Conditioning:
        embeds, pooled = self._encode(model, list(prompts))
        neg, neg_pooled = self._encode(model, [negative_prompt] * len(prompts))
        return Conditioning(embeds=embeds, neg_embeds=neg, pooled=pooled, neg_pooled=neg_pooled)

    def _added_cond(self, cond: Conditioning, cfg: bool) -> Optional[dict]:
        return None

    def predict(self, model, x, t, cond: Conditioning, guidance_scale: float, denoiser=None, return_cond: bool = False):
        unet = denoiser or model.denoiser
        cfg = guidance_scale > 1.0
        x_in = torch.cat([x, x]) if cfg else x
        embeds = torch.cat([cond.neg_embeds, cond.embeds]) if cfg else cond.embeds
        if cfg and torch.is_tensor(t) and t.numel() > 1:  # one timestep per row (Policy.steps): both branches
            t = torch.cat([t, t])
        with autocast_for(model):
            out = unet(x_in, t, encoder_hidden_states=embeds, added_cond_kwargs=self._added_cond(cond, cfg), return_dict=False)[0]
        if not cfg:
            return (out, out) if return_cond else out
        return cfg_combine(out, guidance_scale, return_cond)

    def set_timesteps(self, model, num_steps: int) -> None:
        model.scheduler.set_timesteps(num_steps, device=model.device)

    def initial_noise(self, model, n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        shape = (n, model.denoiser.config.in_channels, model.latent_size, model.latent_size)
        x = randn_tensor(shape, generator=generator, device=model.device, dtype=model.dtype)
        return x * model.scheduler.init_noise_sigma

    def decode(self, model, latents: torch.Tensor) -> torch.Tensor:
        vae = model.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor
        img = vae.decode(z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def pipeline(self, model):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=model.vae, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0], unet=model.denoiser,
            scheduler=model.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )

    def lora_save_kwargs(self, layers: dict, metadata: dict) -> dict:
        return dict(unet_lora_layers=layers, unet_lora_adapter_metadata=metadata)


class SDXLFamily(SDFamily):
    name = "sdxl"
    pipeline_class = "StableDiffusionXLPipeline"
    two_encoders = True

    @torch.no_grad()
    def _encode(self, model, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = [], None
        for tok, enc in zip(model.tokenizers, model.text_encoders):
            out = enc(tokens(tok, prompts, model.device), output_hidden_states=True)
            if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return torch.cat(hidden, dim=-1), pooled

    def encode(self, model, prompts: list[str], negative_prompt: str = "") -> Conditioning:
        embeds, pooled = self._encode(model, list(prompts))
        n = len(prompts)
        if negative_prompt == "" and model.force_zeros_for_empty_prompt:
            neg, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        else:
            neg, neg_pooled = self._encode(model, [negative_prompt] * n)
        r = model.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=embeds.dtype, device=embeds.device).repeat(n, 1)
        return Conditioning(embeds=embeds, neg_embeds=neg, pooled=pooled, neg_pooled=neg_pooled, time_ids=time_ids)

    def _added_cond(self, cond: Conditioning, cfg: bool) -> Optional[dict]:
        pooled = torch.cat([cond.neg_pooled, cond.pooled]) if cfg else cond.pooled
        time_ids = torch.cat([cond.time_ids, cond.time_ids]) if cfg else cond.time_ids
        return {"text_embeds": pooled, "time_ids": time_ids}

    def pipeline(self, model):
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline(
            vae=model.vae, text_encoder=model.text_encoders[0], text_encoder_2=model.text_encoders[1],
            tokenizer=model.tokenizers[0], tokenizer_2=model.tokenizers[1], unet=model.denoiser, scheduler=model.scheduler,
        )


register_family(SDFamily())
register_family(SDXLFamily())
