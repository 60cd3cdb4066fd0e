"""The model-family seam: everything that differs between SD, SDXL, SD3 and FLUX lives behind it.

The engine, the sampler and the algorithms call only these methods (through
`DiffusionModel.family`) and the `Policy`; they never test a model's kind. A new
family is one file implementing `ModelFamily`, one entry in `FAMILIES`, a tiny builder
and one `model.kind` config literal (docs/architecture.md).

Shapes: N samples, latents (N, C, h, w) — unpacked even for FLUX, whose family packs
them into 2×2 patches inside `predict` — so trajectories and step maths are shared.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol

import torch

from raydiff.types import Conditioning


class ModelFamily(Protocol):
    name: str  # the `model.kind` literal
    step_kind: str  # "ddim" (ε-prediction, sampling/steps/ddim.py) | "flow" (velocity, sampling/steps/flow_sde.py)
    denoiser_folder: str  # subfolder of the diffusers pipeline holding the trainable network ("unet" | "transformer")
    pipeline_class: str  # diffusers pipeline class that loads the folder and the exported LoRA

    def matches(self, index: dict) -> bool:
        """Does this model_index.json describe this family? (`model.kind: auto`)"""

    def load_components(self, path: str, dtype: torch.dtype, revision: Optional[str]) -> dict[str, Any]:
        """denoiser, vae, text_encoders, tokenizers, scheduler, loaded with diffusers/transformers `from_pretrained`."""

    def default_resolution(self, model) -> int:
        """Image side in pixels when `model.resolution` is not set."""

    def encode(self, model, prompts: list[str], negative_prompt: str) -> Conditioning:
        """Text conditioning for N prompts (and the CFG negative branch, if the family uses one)."""

    def predict(self, model, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance_scale: float,
                denoiser=None, return_cond: bool = False):
        """The network's output for x (N, C, h, w) at scheduler timestep t: ε̂ (ddim) or v̂ (flow), guidance applied.

        `denoiser` overrides `model.denoiser` (an assistant network); `return_cond=True` returns
        (output, conditional-branch output)."""

    def set_timesteps(self, model, num_steps: int) -> None:
        """`scheduler.set_timesteps` as the family's diffusers pipeline calls it (log-probs depend on it)."""

    def initial_noise(self, model, n: int, generator: Optional[torch.Generator]) -> torch.Tensor:
        """x_T (N, C, h, w) drawn as the diffusers pipeline draws it from the same generator."""

    def decode(self, model, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float images (N, 3, H, W) in [0, 1]; keeps the graph."""

    def pipeline(self, model):
        """The diffusers pipeline over the model's own modules (LoRA loading, export)."""

    def lora_save_kwargs(self, layers: dict, metadata: dict) -> dict:
        """Keyword arguments of `pipeline_class.save_lora_weights` for the denoiser's LoRA layers."""


_FAMILIES: dict[str, ModelFamily] = {}


def load_parts(path: str, dtype: torch.dtype, revision: Optional[str], denoiser_cls, denoiser_folder: str,
               scheduler_cls, text: list[tuple[Any, Any, str]]) -> dict:
    """The components every family loads from a diffusers folder: the denoiser, the VAE, the scheduler and
    its text stack, `text` = [(tokenizer class, encoder class, subfolder suffix)] for tokenizer{s}/text_encoder{s}."""
    from diffusers import AutoencoderKL

    kw = dict(revision=revision)
    return dict(
        denoiser=denoiser_cls.from_pretrained(path, subfolder=denoiser_folder, dtype=dtype, **kw),
        vae=AutoencoderKL.from_pretrained(path, subfolder="vae", dtype=dtype, **kw),
        text_encoders=[enc.from_pretrained(path, subfolder=f"text_encoder{s}", dtype=dtype, **kw) for _, enc, s in text],
        tokenizers=[tok.from_pretrained(path, subfolder=f"tokenizer{s}", **kw) for tok, _, s in text],
        scheduler=scheduler_cls.from_pretrained(path, subfolder="scheduler", **kw),
    )


def register_family(family: ModelFamily) -> ModelFamily:
    _FAMILIES[family.name] = family
    return family


def families() -> dict[str, ModelFamily]:
    """All registered families by name (importing their modules registers them)."""
    from raydiff.models import flux, sd, sd3  # noqa: F401  (registration side effect)

    return dict(_FAMILIES)


def get_family(name: str) -> ModelFamily:
    fams = families()
    if name not in fams:
        raise ValueError(f"model.kind={name!r}: unknown model family; use one of {sorted(fams)}")
    return fams[name]


def detect_family(index: dict, path: str) -> ModelFamily:
    """The family whose `matches` accepts this model_index.json (most specific first)."""
    from raydiff.config_base import ConfigError

    for fam in families().values():
        if fam.matches(index):
            return fam
    raise ConfigError(f"model.path {path!r}: pipeline class {index.get('_class_name')!r} is not a known family; "
                      f"set model.kind to one of {sorted(families())}")


def configured_family(model_section) -> Optional[ModelFamily]:
    """The family a `ModelSection` will load, known without loading: model.kind, a tiny:// name, or a local
    folder's model_index.json; None for a hub id (checked when it loads)."""
    import json
    from pathlib import Path

    if model_section.kind != "auto":
        return get_family(model_section.kind)
    path = model_section.path
    if path.startswith("tiny://"):
        name = path[len("tiny://"):].split("/")[0]
        return families().get(name)
    index = Path(path) / "model_index.json"
    if index.is_file():
        try:
            return detect_family(json.loads(index.read_text()), path)
        except Exception:
            return None
    return None
