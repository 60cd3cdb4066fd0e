"""Tiny random-weight SD3 and FLUX pipelines in diffusers format, built offline.

Same idea as `tiny.py` for SD / SDXL: seeded weights, byte-level tokenizers built
from code (the hub is not reachable), saved so plain `StableDiffusion3Pipeline` /
`FluxPipeline.from_pretrained(folder)` load them. SD3: two CLIP encoders with
projection + a tiny T5; FLUX: CLIP + T5 and a guidance-embedding transformer.
Latents have 4 channels (the real models have 16); the VAE keeps scale factor 8.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from raydiff.models.tiny import save_on_any_rank

T5_DIM = 64  # tiny T5 d_model = the transformers' joint_attention_dim
T5_MAX_LENGTH = 16


def _t5_vocab() -> list[tuple[str, float]]:
    """A Unigram vocabulary of single characters: every printable ASCII char and its ▁-prefixed form."""
    chars = [chr(c) for c in range(33, 127)]
    return [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -1.0) for c in chars] + [("▁" + c, -1.5) for c in chars]


def save_t5_tokenizer(folder: Path, max_length: int = T5_MAX_LENGTH) -> int:
    """Save a T5 tokenizer built from `_t5_vocab`; returns its vocabulary size."""
    from transformers import T5TokenizerFast

    tok = T5TokenizerFast(vocab=_t5_vocab(), extra_ids=0, model_max_length=max_length)
    tok.save_pretrained(str(folder))
    return len(tok)


def t5_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(
        vocab_size=vocab_size, d_model=T5_DIM, d_kv=16, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )
    return T5EncoderModel(cfg)


def flow_vae(shift: float, scale: float):
    """4-block VAE (scale factor 8), 4 latent channels, with the SD3/FLUX shift and scaling factors."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1, norm_num_groups=4, sample_size=64, shift_factor=shift, scaling_factor=scale,
        use_quant_conv=False, use_post_quant_conv=False,
    )
    with torch.no_grad():  # as tiny.py: make image statistics depend visibly on the latents
        vae.decoder.conv_out.weight.mul_(6.0)
    return vae


def build_sd3(tmp: Path, save_clip_tokenizer, clip_encoder, clip_vocab_size: int, eos: int, max_length: int) -> dict:
    """Write the SD3 components into `tmp`; returns model_index.json."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    for i, sub in enumerate(["", "_2"]):
        save_clip_tokenizer(tmp / f"tokenizer{sub}", max_length)
        save_on_any_rank(clip_encoder(32, 32, clip_vocab_size, max_length, eos), tmp / f"text_encoder{sub}")
    t5_vocab = save_t5_tokenizer(tmp / "tokenizer_3")
    save_on_any_rank(t5_encoder(t5_vocab), tmp / "text_encoder_3")
    SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=T5_DIM, caption_projection_dim=16, pooled_projection_dim=64,
        pos_embed_max_size=16,
    ).save_pretrained(tmp / "transformer")
    flow_vae(0.0609, 1.5035).save_pretrained(tmp / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(tmp / "scheduler")
    clip = ["transformers", "CLIPTextModelWithProjection"]
    return {
        "_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": clip, "text_encoder_2": clip, "text_encoder_3": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "tokenizer_3": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None], "feature_extractor": [None, None],
    }


def build_flux(tmp: Path, save_clip_tokenizer, clip_encoder, clip_vocab_size: int, eos: int, max_length: int) -> dict:
    """Write the FLUX components into `tmp` (guidance-distilled, like FLUX.1-dev); returns model_index.json."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    save_clip_tokenizer(tmp / "tokenizer", max_length)
    save_on_any_rank(clip_encoder(32, None, clip_vocab_size, max_length, eos), tmp / "text_encoder")
    t5_vocab = save_t5_tokenizer(tmp / "tokenizer_2")
    save_on_any_rank(t5_encoder(t5_vocab), tmp / "text_encoder_2")
    FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=T5_DIM, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8),
    ).save_pretrained(tmp / "transformer")
    flow_vae(0.1159, 0.3611).save_pretrained(tmp / "vae")
    FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    ).save_pretrained(tmp / "scheduler")
    return {
        "_class_name": "FluxPipeline", "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "T5TokenizerFast"],
        "transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": [None, None], "feature_extractor": [None, None],
    }


def write_index(tmp: Path, index: dict) -> None:
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
