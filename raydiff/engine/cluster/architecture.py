"""A model's real architecture without its weights: diffusers / transformers modules on the meta device.

The memory plan needs layer shapes, not weights. `meta_modules(cfg.model)` reads the
components' `config.json` from, first found:
  1. a local diffusers folder (`model.path` is a directory, or `tiny://...`),
  2. the published configs shipped in `raydiff/models/architectures/` for well-known hub ids
     (SD 1.x and SDXL base), so `raydiff plan` works offline,
and builds each component under `torch.device("meta")`: full size, zero bytes, no download.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "architectures"
# Hub ids whose published configs are shipped (SHIPPED/README.md names sources and licences).
KNOWN_HUB_IDS = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": "sd15",
    "runwayml/stable-diffusion-v1-5": "sd15",
    "CompVis/stable-diffusion-v1-4": "sd15",
    "stabilityai/stable-diffusion-xl-base-1.0": "sdxl",
}


class UnknownArchitecture(ValueError):
    """No config.json files for this model.path: not a folder, not a known hub id."""


@dataclass
class MetaModel:
    """Components built on the meta device, plus what the plan needs to shape its inputs."""

    kind: str  # "sd" | "sdxl"
    unet: Any
    vae: Any
    text_encoders: list
    source: str  # where the configs came from

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_resolution(self) -> int:
        return self.unet.config.sample_size * self.vae_scale


def architecture_folder(path: str) -> Path:
    """The folder holding `model_index.json` and `<component>/config.json` for `model.path`."""
    from raydiff.models.tiny import resolve_tiny

    local = Path(resolve_tiny(path)).expanduser()
    if local.is_dir():
        return local
    if path in KNOWN_HUB_IDS:
        return SHIPPED / KNOWN_HUB_IDS[path]
    raise UnknownArchitecture(
        f"model.path {path!r}: no architecture to estimate from; give a local diffusers folder or one of "
        f"the known hub ids ({', '.join(sorted(KNOWN_HUB_IDS))})"
    )


def _config(folder: Path, component: str) -> dict:
    f = folder / component / "config.json"
    if not f.is_file():
        raise UnknownArchitecture(f"{folder}: missing {component}/config.json")
    return {k: v for k, v in json.loads(f.read_text()).items() if not k.startswith("_")}


@functools.lru_cache(maxsize=8)
def build_meta(folder: str, dtype: torch.dtype) -> MetaModel:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = Path(folder)
    index = json.loads((root / "model_index.json").read_text()) if (root / "model_index.json").is_file() else {}
    kind = "sdxl" if "text_encoder_2" in index or (root / "text_encoder_2").is_dir() else "sd"
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(_config(root, "unet")).to(dtype)
        vae = AutoencoderKL.from_config(_config(root, "vae")).to(dtype)
        encoders = [CLIPTextModel(CLIPTextConfig(**_config(root, "text_encoder"))).to(dtype)]
        if kind == "sdxl":
            encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**_config(root, "text_encoder_2"))).to(dtype))
    for m in (unet, vae, *encoders):
        m.requires_grad_(False)
        m.eval()
    shipped = root.parent == SHIPPED
    return MetaModel(kind, unet, vae, encoders, f"shipped {root.name} configs" if shipped else str(root))


def meta_modules(model_cfg, dtype: torch.dtype = torch.bfloat16) -> MetaModel:
    """The model of a `ModelSection` on the meta device, components in `dtype`."""
    return build_meta(str(architecture_folder(model_cfg.path)), dtype)


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def lora_param_count(unet, rank: int, target_modules: list[str]) -> int:
    """Parameters peft adds: r x (in + out) per targeted Linear (r x (c_in·k² + c_out) per Conv)."""
    total = 0
    for name, module in unet.named_modules():
        if not any(name == t or name.endswith("." + t) for t in target_modules):
            continue
        if isinstance(module, torch.nn.Linear):
            total += rank * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            total += rank * (module.in_channels * k + module.out_channels)
    return total


def pick_dtype(name: str) -> torch.dtype:
    """The dtype a GPU run uses for frozen weights (model.dtype=auto -> bfloat16 on GPU)."""
    return torch.bfloat16 if name == "auto" else getattr(torch, name)

