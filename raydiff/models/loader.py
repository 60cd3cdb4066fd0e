"""Load a model of any family (SD, SDXL, SD3, FLUX) from a hub id, a local diffusers folder or `tiny://`.

One path for real and tiny models: tests build tiny folders and load them here.
The family (models/family.py) says which components to load and how to use them;
frozen parts (VAE, text encoders) get `model.dtype`; the denoiser (UNet or
transformer) gets LoRA (peft) or is fully trainable, per `model.finetune`.
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
    """Everything needed to sample and train: modules, tokenizers, scheduler, and the family that uses them."""

    kind: str  # the family's name: "sd" | "sdxl" | "sd3" | "flux"
    denoiser: Any  # the trainable network: UNet2DConditionModel, SD3Transformer2DModel, FluxTransformer2DModel
    vae: Any
    text_encoders: list
    tokenizers: list
    scheduler: Any  # DDIMScheduler | FlowMatchEulerDiscreteScheduler
    resolution: int
    device: torch.device
    dtype: torch.dtype
    source: str
    force_zeros_for_empty_prompt: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def family(self):
        """The `ModelFamily` behind `kind`: encode, predict, noise, decode, export."""
        from raydiff.models.family import get_family

        return get_family(self.kind)

    @property
    def unet(self):
        """The denoiser under its SD name, for UNet-specific code (DDIM-only algorithms, older callers)."""
        return self.denoiser

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_size(self) -> int:
        return self.resolution // self.vae_scale_factor

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.denoiser.parameters() if p.requires_grad]


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
        raise ConfigError(f"model.path {path!r} does not exist; give an existing diffusers folder, a hub id, or tiny://sd (sdxl, sd3, flux)")
    try:
        from diffusers import DiffusionPipeline

        return dict(DiffusionPipeline.load_config(path, revision=revision))
    except Exception as e:  # hub unreachable, unknown repo, ...
        raise ConfigError(f"model.path {path!r}: not a local folder and could not be read from the hub ({type(e).__name__}: {str(e)[:200]}); download it and pass the local folder") from None


def load_model(cfg, device: str | torch.device = "cpu") -> DiffusionModel:
    """Build a DiffusionModel from a `ModelSection`; the denoiser is made trainable per `cfg.finetune`."""
    from raydiff.models.family import detect_family, get_family

    device = torch.device(device)
    path = resolve_weights(cfg.path, "model.path")
    index = read_model_index(path, cfg.revision)
    family = get_family(cfg.kind) if cfg.kind != "auto" else detect_family(index, cfg.path)
    dtype = resolve_dtype(cfg.dtype, device)
    parts = family.load_components(path, dtype, cfg.revision)
    for m in [parts["vae"], parts["denoiser"], *parts["text_encoders"]]:
        m.requires_grad_(False)
        m.eval()
        m.to(device)
    if cfg.attention == "sdpa" and family.denoiser_folder == "unet":  # transformers already use SDPA processors
        from diffusers.models.attention_processor import AttnProcessor2_0

        parts["denoiser"].set_attn_processor(AttnProcessor2_0())
    model = DiffusionModel(
        kind=family.name, resolution=0, device=device, dtype=dtype, source=path,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", family.name == "sdxl")), **parts,
    )
    vae_scale = model.vae_scale_factor
    model.resolution = cfg.resolution or family.default_resolution(model)
    step = vae_scale * (2 if family.step_kind == "flow" else 1)  # flow transformers patchify latents by 2
    if model.resolution % step:
        raise ConfigError(f"model.resolution={model.resolution} must be a multiple of {step} for model.kind={family.name} (VAE scale factor {vae_scale})")
    from raydiff.models.lora import make_trainable

    make_trainable(model, cfg)
    from raydiff.engine.compile import apply_speedups

    apply_speedups(model, cfg)  # model.channels_last / model.compile
    return model
