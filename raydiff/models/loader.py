"""Load SD 1.x / SDXL components from a hub id, a local diffusers folder or `tiny://`.

One path for real and tiny models: tests build tiny folders and load them here.
Frozen parts (VAE, text encoders) get `model.dtype`; the UNet gets LoRA (peft)
or is fully trainable, per `model.finetune`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from raydiff.config_base import ConfigError
from raydiff.models.weights import resolve_weights


@dataclass
class DiffusionModel:
    """Everything needed to sample and train: modules, tokenizers, scheduler, kind."""

    kind: str  # "sd" | "sdxl"
    unet: Any
    vae: Any
    text_encoders: list
    tokenizers: list
    scheduler: Any  # DDIMScheduler
    resolution: int
    device: torch.device
    dtype: torch.dtype
    source: str
    force_zeros_for_empty_prompt: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def read_model_index(path: str, revision: Optional[str] = None) -> dict:
    """Read model_index.json from a folder or the hub; a clear error if neither works."""
    local = Path(path)
    if local.is_dir():
        f = local / "model_index.json"
        if not f.is_file():
            raise ConfigError(f"model.path {path!r} is a folder without model_index.json; point it at a diffusers pipeline folder (e.g. one saved by save_pretrained or `raydiff make-tiny`)")
        return json.loads(f.read_text())
    if path.startswith(("/", "./", "../", "~")) or local.suffix:
        raise ConfigError(f"model.path {path!r} does not exist; give an existing diffusers folder, a hub id, or tiny://sd")
    try:
        from diffusers import DiffusionPipeline

        return dict(DiffusionPipeline.load_config(path, revision=revision))
    except Exception as e:  # hub unreachable, unknown repo, ...
        raise ConfigError(f"model.path {path!r}: not a local folder and could not be read from the hub ({type(e).__name__}: {str(e)[:200]}); download it and pass the local folder") from None


def load_model(cfg, device: str | torch.device = "cpu") -> DiffusionModel:
    """Build a DiffusionModel from a `ModelSection`; the UNet is made trainable per `cfg.finetune`."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    device = torch.device(device)
    path = resolve_weights(cfg.path, "model.path")
    index = read_model_index(path, cfg.revision)
    kind = cfg.kind if cfg.kind != "auto" else ("sdxl" if "text_encoder_2" in index else "sd")
    dtype = resolve_dtype(cfg.dtype, device)
    kw = dict(revision=cfg.revision)
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw)]
    text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **kw)]
    if kind == "sdxl":
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **kw))
        text_encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype, **kw))
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=dtype, **kw)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", dtype=dtype, **kw)
    scheduler = DDIMScheduler.from_pretrained(path, subfolder="scheduler", **kw)
    for m in [vae, unet, *text_encoders]:
        m.requires_grad_(False)
        m.eval()
        m.to(device)
    if cfg.attention == "sdpa":
        from diffusers.models.attention_processor import AttnProcessor2_0

        unet.set_attn_processor(AttnProcessor2_0())
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    resolution = cfg.resolution or unet.config.sample_size * vae_scale
    if resolution % vae_scale:
        raise ConfigError(f"model.resolution={resolution} must be a multiple of the VAE scale factor {vae_scale}")
    model = DiffusionModel(
        kind=kind, unet=unet, vae=vae, text_encoders=text_encoders, tokenizers=tokenizers,
        scheduler=scheduler, resolution=resolution, device=device, dtype=dtype, source=path,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", kind == "sdxl")),
    )
    from raydiff.models.lora import make_trainable

    make_trainable(model, cfg)
    from raydiff.engine.compile import apply_speedups

    apply_speedups(model, cfg)  # model.channels_last / model.compile
    return model
