"""SD3 / SD3.5 family: SD3Transformer2DModel predicting velocity, FlowMatchEulerDiscreteScheduler.

Matches diffusers' `StableDiffusion3Pipeline` (0.42) call for call: CLIP-L and CLIP-G
penultimate hidden states concatenated and zero-padded to the T5 width, then the T5
tokens appended along the sequence (zeros when the folder has no T5, as diffusers does);
pooled = both CLIP projections concatenated. CFG batches [negative; positive]. The step
maths is rectified flow (sampling/steps/flow_sde.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from diffusers.utils.torch_utils import randn_tensor

from raydiff.models.family import load_parts, register_family
from raydiff.models.sd import autocast_for, cfg_combine, tokens
from raydiff.types import Conditioning

T5_MAX_SEQUENCE_LENGTH = 256  # the SD3 pipeline's default max_sequence_length


class SD3Family:
    name = "sd3"
    step_kind = "flow"
    denoiser_folder = "transformer"
    pipeline_class = "StableDiffusion3Pipeline"

    def matches(self, index: dict) -> bool:
        return (index.get("transformer") or [None, None])[1] == "SD3Transformer2DModel"

    def load_components(self, path: str, dtype: torch.dtype, revision: Optional[str]) -> dict:
        from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import (
            AutoTokenizer,
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            T5EncoderModel,
        )

        from raydiff.models.loader import read_model_index

        text = [(CLIPTokenizer, CLIPTextModelWithProjection, s) for s in ("", "_2")]
        if (read_model_index(path, revision).get("text_encoder_3") or [None])[0]:  # optional T5
            text.append((AutoTokenizer, T5EncoderModel, "_3"))
        return load_parts(path, dtype, revision, SD3Transformer2DModel, "transformer", FlowMatchEulerDiscreteScheduler, text)

    def default_resolution(self, model) -> int:
        return model.denoiser.config.sample_size * model.vae_scale_factor

    @torch.no_grad()
    def _encode(self, model, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, pooled = [], []
        for tok, enc in zip(model.tokenizers[:2], model.text_encoders[:2]):
            out = enc(tokens(tok, prompts, model.device), output_hidden_states=True)
            pooled.append(out[0])
            hidden.append(out.hidden_states[-2])
        clip = torch.cat(hidden, dim=-1)
        width = model.denoiser.config.joint_attention_dim
        if len(model.text_encoders) > 2:
            length = min(T5_MAX_SEQUENCE_LENGTH, model.tokenizers[2].model_max_length)
            t5 = model.text_encoders[2](tokens(model.tokenizers[2], prompts, model.device, length))[0]
        else:
            t5 = torch.zeros(len(prompts), T5_MAX_SEQUENCE_LENGTH, width, device=model.device, dtype=clip.dtype)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)

    def encode(self, model, prompts: list[str], negative_prompt: str = "") -> Conditioning:
        embeds, pooled = self._encode(model, list(prompts))
        neg, neg_pooled = self._encode(model, [negative_prompt] * len(prompts))
        return Conditioning(embeds=embeds, neg_embeds=neg, pooled=pooled, neg_pooled=neg_pooled)

    def predict(self, model, x, t, cond: Conditioning, guidance_scale: float, denoiser=None, return_cond: bool = False):
        net = denoiser or model.denoiser
        cfg = guidance_scale > 1.0
        x_in = torch.cat([x, x]) if cfg else x
        embeds = torch.cat([cond.neg_embeds, cond.embeds]) if cfg else cond.embeds
        pooled = torch.cat([cond.neg_pooled, cond.pooled]) if cfg else cond.pooled
        timestep = torch.as_tensor(t, device=x.device).expand(x_in.shape[0])
        with autocast_for(model):
            out = net(hidden_states=x_in, timestep=timestep, encoder_hidden_states=embeds,
                      pooled_projections=pooled, return_dict=False)[0]
        if not cfg:
            return (out, out) if return_cond else out
        return cfg_combine(out, guidance_scale, return_cond)

    def set_timesteps(self, model, num_steps: int) -> None:
        kwargs = {}
        c = model.scheduler.config
        if c.get("use_dynamic_shifting", None):  # as the SD3 pipeline: shift from the image token count
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
                calculate_shift,
            )

            p = model.denoiser.config.patch_size
            seq = (model.latent_size // p) ** 2
            kwargs["mu"] = calculate_shift(seq, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                                           c.get("base_shift", 0.5), c.get("max_shift", 1.16))
        model.scheduler.set_timesteps(num_steps, device=model.device, **kwargs)

    def initial_noise(self, model, n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        shape = (n, model.denoiser.config.in_channels, model.latent_size, model.latent_size)
        return randn_tensor(shape, generator=generator, device=model.device, dtype=model.dtype)

    def decode(self, model, latents: torch.Tensor) -> torch.Tensor:
        vae = model.vae
        z = latents.to(vae.dtype) / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
        img = vae.decode(z, return_dict=False)[0]
        return (img.float() / 2 + 0.5).clamp(0, 1)

    def pipeline(self, model):
        from diffusers import StableDiffusion3Pipeline

        te, tok = model.text_encoders, model.tokenizers
        return StableDiffusion3Pipeline(
            transformer=model.denoiser, scheduler=model.scheduler, vae=model.vae,
            text_encoder=te[0], tokenizer=tok[0], text_encoder_2=te[1], tokenizer_2=tok[1],
            text_encoder_3=te[2] if len(te) > 2 else None, tokenizer_3=tok[2] if len(tok) > 2 else None,
        )

    def lora_save_kwargs(self, layers: dict, metadata: dict) -> dict:
        return dict(transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata)


register_family(SD3Family())
