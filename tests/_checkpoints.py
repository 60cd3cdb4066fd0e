"""Checkpoint helpers for tests: a hand-made trained checkpoint for eval tests (a tiny model whose LoRA B
is perturbed, so the policy differs from its base, saved as the trainer lays out a step: learner.pt,
diffusers export, config.yaml, completion marker), and a run's final weights compared tensor by tensor."""

from __future__ import annotations

from pathlib import Path

import torch

from raydiff.engine import checkpoint as ckpt
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


def final_weights(run) -> dict:
    """The trainable weights of a run's newest complete checkpoint (`run`: a path, storage URI or Storage)."""
    return ckpt.learner_weights(ckpt.latest_checkpoint(run))


def assert_same_weights(got: dict, expected: dict, what: str = "the uninterrupted run's") -> None:
    """Bit-identical weights, tensor by tensor (torch.equal), naming a few that differ."""
    assert got.keys() == expected.keys()
    differ = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ from {what}, e.g. {differ[:3]}"
