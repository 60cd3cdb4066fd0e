"""A hand-made trained checkpoint for eval tests: a tiny model whose LoRA B is perturbed, so the
policy differs from its base, saved as the trainer lays out a step (learner.pt, diffusers export,
config.yaml, completion marker)."""

from __future__ import annotations

from pathlib import Path

import torch

from raydiff.models.loader import load_model
from raydiff.models.lora import export_weights, trainable_state_dict


def perturbed_lora_checkpoint(run_dir: Path, model_cfg, config_text: str) -> Path:
    """`run_dir`/checkpoints/step_000000 for the model of `model_cfg` (a ModelSection); returns the step dir."""
    torch.manual_seed(0)
    model = load_model(model_cfg)
    with torch.no_grad():
        for n, p in model.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    step = Path(run_dir) / "checkpoints" / "step_000000"
    (step / "learner").mkdir(parents=True)
    torch.save({"weights": trainable_state_dict(model.denoiser), "version": 1}, step / "learner" / "learner.pt")
    export_weights(model, step / "learner" / "export")
    (step / "config.yaml").write_text(config_text)
    (step / "COMPLETE").write_text("0")
    return step
