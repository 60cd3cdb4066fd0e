"""Prompt encoding: the model family encodes (models/sd.py, sd3.py, flux.py match their diffusers pipelines)."""

from __future__ import annotations

from raydiff.types import Conditioning


def encode_prompts(model, prompts: list[str], negative_prompt: str = "") -> Conditioning:
    """Conditioning for each prompt plus the CFG negative branch (if the family has one), on the model's device."""
    return model.family.encode(model, list(prompts), negative_prompt)
