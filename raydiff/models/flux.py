"""FLUX.1 family: FluxTransformer2DModel predicting velocity, CLIP pooled + T5 tokens, guidance embedding.

Matches diffusers' `FluxPipeline` (0.42): CLIP's pooled output and T5's last hidden state;
no negative branch (FLUX.1-dev is guidance-distilled: `guidance_scale` feeds the
transformer's guidance embedding, one network call per step, CFG-free). Latents stay
(N, C, h, w) everywhere else in raydiff; this family packs them into 2×2 patches for the
transformer and unpacks its output, exactly as the pipeline's `_pack_latents`.
σ schedule: linspace(1, 1/n, n) shifted by μ from the image token count (the pipeline's).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from raydiff.models.family import load_parts, register_family
from raydiff.models.sd import autocast_for, tokens
from raydiff.types import Conditioning

T5_MAX_SEQUENCE_LENGTH = 512  # the FLUX pipeline's default max_sequence_length


def pack(x: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h/2·w/2, 4C), as FluxPipeline._pack_latents."""
    n, c, h, w = x.shape
    return x.view(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)


def unpack(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(N, h/2·w/2, 4C) -> (N, C, h, w), inverse of `pack`."""
    n, _, ch = x.shape
    return x.view(n, h // 2, w // 2, ch // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, ch // 4, h, w)


def image_ids(h: int, w: int, device, dtype) -> torch.Tensor:
    """(h/2·w/2, 3) positions of the packed latent tokens, as FluxPipeline._prepare_latent_image_ids."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] += torch.arange(h // 2)[:, None]
    ids[..., 2] += torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device, dtype)


class FluxFamily:
    name = "flux"
    step_kind = "flow"
    denoiser_folder = "transformer"
    pipeline_class = "FluxPipeline"

    def matches(self, index: dict) -> bool:
        return (index.get("transformer") or [None, None])[1] == "FluxTransformer2DModel"

    def load_components(self, path: str, dtype: torch.dtype, revision: Optional[str]) -> dict:
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import (
            AutoTokenizer,
            CLIPTextModel,
            CLIPTokenizer,
            T5EncoderModel,
        )

        text = [(CLIPTokenizer, CLIPTextModel, ""), (AutoTokenizer, T5EncoderModel, "_2")]
        return load_parts(path, dtype, revision, FluxTransformer2DModel, "transformer", FlowMatchEulerDiscreteScheduler, text)

    def default_resolution(self, model) -> int:
        """The pipeline's 1024 px; 64 px for tiny random models (inner width < 256), whose config has no size."""
        c = model.denoiser.config
        return 64 if c.num_attention_heads * c.attention_head_dim < 256 else 1024

    @torch.no_grad()
    def encode(self, model, prompts: list[str], negative_prompt: str = "") -> Conditioning:
        prompts = list(prompts)
        pooled = model.text_encoders[0](tokens(model.tokenizers[0], prompts, model.device), output_hidden_states=False).pooler_output
        length = min(T5_MAX_SEQUENCE_LENGTH, model.tokenizers[1].model_max_length)
        embeds = model.text_encoders[1](tokens(model.tokenizers[1], prompts, model.device, length), output_hidden_states=False)[0]
        return Conditioning(embeds=embeds.to(model.dtype), neg_embeds=None, pooled=pooled.to(model.dtype))

    def predict(self, model, x, t, cond: Conditioning, guidance_scale: float, denoiser=None, return_cond: bool = False):
        net = denoiser or model.denoiser
        n, _, h, w = x.shape
        timestep = torch.as_tensor(t, device=x.device).expand(n).to(x.dtype) / 1000
        guidance = torch.full([n], guidance_scale, device=x.device, dtype=torch.float32) if net.config.guidance_embeds else None
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=x.device, dtype=cond.embeds.dtype)
        with autocast_for(model):
            out = net(hidden_states=pack(x), timestep=timestep, guidance=guidance, pooled_projections=cond.pooled,
                      encoder_hidden_states=cond.embeds, txt_ids=txt_ids, img_ids=image_ids(h, w, x.device, x.dtype),
                      return_dict=False)[0]
        out = unpack(out, h, w)
        return (out, out) if return_cond else out

    def set_timesteps(self, model, num_steps: int) -> None:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        c = model.scheduler.config
        sigmas = None if c.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / num_steps, num_steps)
        mu = calculate_shift((model.latent_size // 2) ** 2, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        model.scheduler.set_timesteps(num_steps, device=model.device, sigmas=sigmas, mu=mu)

    def initial_noise(self, model, n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        shape = (n, model.denoiser.config.in_channels // 4, model.latent_size, model.latent_size)
        return randn_tensor(shape, generator=generator, device=model.device, dtype=model.dtype)

    def decode(self, model, latents: torch.Tensor) -> torch.Tensor:
        vae = model.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        img = vae.decode(z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def pipeline(self, model):
        from diffusers import FluxPipeline

        te, tok = model.text_encoders, model.tokenizers
        return FluxPipeline(transformer=model.denoiser, scheduler=model.scheduler, vae=model.vae,
                            text_encoder=te[0], tokenizer=tok[0], text_encoder_2=te[1], tokenizer_2=tok[1])

    def lora_save_kwargs(self, layers: dict, metadata: dict) -> dict:
        return dict(transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata)


register_family(FluxFamily())
