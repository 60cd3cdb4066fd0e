"""Prompt encoding for SD 1.x and SDXL, matching diffusers' pipelines token for token.

SD: last hidden state of the CLIP text encoder. SDXL: penultimate hidden
states of both encoders concatenated, pooled embeds from the second, and
add_time_ids (orig_h, orig_w, crop_top, crop_left, target_h, target_w); an
empty negative prompt gives zero embeddings when the model says
`force_zeros_for_empty_prompt` (as the SDXL pipeline does).
"""

from __future__ import annotations

import torch

from raydiff.types import Conditioning


def _tokens(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids.to(device)


@torch.no_grad()
def _encode_sd(model, prompts: list[str]) -> tuple[torch.Tensor, None]:
    enc = model.text_encoders[0]
    return enc(_tokens(model.tokenizers[0], prompts, model.device))[0], None


@torch.no_grad()
def _encode_sdxl(model, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    hidden, pooled = [], None
    for tok, enc in zip(model.tokenizers, model.text_encoders):
        out = enc(_tokens(tok, prompts, model.device), output_hidden_states=True)
        if out[0].ndim == 2:  # CLIPTextModelWithProjection: text_embeds first
            pooled = out[0]
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), pooled


def encode_prompts(model, prompts: list[str], negative_prompt: str = "") -> Conditioning:
    """Conditioning for each prompt plus the CFG negative branch, on the model's device."""
    encode = _encode_sdxl if model.kind == "sdxl" else _encode_sd
    embeds, pooled = encode(model, list(prompts))
    n = len(prompts)
    if model.kind == "sdxl" and negative_prompt == "" and model.force_zeros_for_empty_prompt:
        neg, neg_pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
    else:
        neg, neg_pooled = encode(model, [negative_prompt] * n)
    time_ids = None
    if model.kind == "sdxl":
        r = model.resolution
        time_ids = torch.tensor([[r, r, 0, 0, r, r]], dtype=embeds.dtype, device=embeds.device).repeat(n, 1)
    return Conditioning(embeds=embeds, neg_embeds=neg, pooled=pooled, neg_pooled=neg_pooled, time_ids=time_ids)
