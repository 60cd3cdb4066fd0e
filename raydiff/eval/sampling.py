"""Sample evaluation images with a policy (base model or checkpoint) across Ray actors.

A policy is a `PolicySpec`: the base model section plus, for a checkpoint, where its
trainable weights live. Weights load one of two ways:
  1. `learner/learner.pt` + the checkpoint's `config.yaml`: the exact trainable state
     (LoRA or full UNet) of the run, loaded with `load_trainable_state_dict`;
  2. `learner/export/` (what plain diffusers loads): the LoRA safetensors via
     `denoiser.load_lora_adapter`, or `export/unet/` (`transformer/`) for a full fine-tune, on top of `--base`.

Noise is common between policies: sample i of prompt p is item `p*K + i`; items are
chunked into batches in that order and batch j uses seed `seed + j`, so two policies see
identical initial and step noise for the same item (a paired comparison).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np
import torch

log = logging.getLogger("raydiff.eval")


@dataclass
class PolicySpec:
    label: str  # "base", "checkpoint", ...
    model: dict  # ModelSection fields
    source: str  # what the user named (model path or checkpoint folder)
    learner_pt: Optional[str] = None
    export_dir: Optional[str] = None
    sampling: Optional[dict] = None  # the run's sampling section (default steps/guidance/eta), when known


def find_checkpoint(path: str | Path) -> Path:
    """A run dir (latest complete checkpoint), a step_* dir, or its learner/ or learner/export/ folder."""
    from raydiff.engine.checkpoint import latest_checkpoint

    p = Path(path).expanduser().resolve()
    if not p.exists():
        raise ValueError(f"--checkpoint {str(path)!r} does not exist")
    if (p / "checkpoints").is_dir():
        latest = latest_checkpoint(p)
        if latest is None:
            raise ValueError(f"--checkpoint {str(path)!r}: run dir without a complete checkpoint")
        return latest
    return p


def checkpoint_policy(path: str, base: Optional[str], label: str = "checkpoint") -> PolicySpec:
    """Where the checkpoint's weights live and which base model they go on."""
    import yaml

    p = find_checkpoint(path)
    step = p.parent.parent if p.name == "export" else p.parent if p.name == "learner" else p
    learner = step / "learner"
    export = p if p.name == "export" else learner / "export"
    cfg_file = step / "config.yaml"
    run_cfg = yaml.safe_load(cfg_file.read_text()) if cfg_file.is_file() else {}
    if p.name != "export" and (learner / "learner.pt").is_file() and cfg_file.is_file():  # naming export/ picks it
        model = dict(run_cfg["model"], **({"path": base} if base else {}))
        return PolicySpec(label, model, str(p), learner_pt=str(learner / "learner.pt"), sampling=run_cfg.get("sampling"))
    if export.is_dir():
        if not base and not cfg_file.is_file():
            raise ValueError(f"--checkpoint {path!r} has an export folder but no config.yaml: pass --base MODEL it was trained from")
        model = dict(run_cfg.get("model", {}), finetune="full", **({"path": base} if base else {}))  # the export brings its adapter
        return PolicySpec(label, model, str(p), export_dir=str(export), sampling=run_cfg.get("sampling"))
    raise ValueError(f"--checkpoint {path!r}: no learner/learner.pt (+ config.yaml) and no learner/export folder found")


def base_policy(model_path: str, resolution: Optional[int] = None, dtype: str = "auto", label: str = "base") -> PolicySpec:
    model = {"path": model_path, "finetune": "full", "dtype": dtype}
    if resolution:
        model["resolution"] = resolution
    return PolicySpec(label, model, model_path)


class EvalWorker:
    """Holds one policy's model; `generate(prompts, seed)` -> uint8 images (N, H, W, 3)."""

    def __init__(self, spec: PolicySpec, num_steps: int, guidance_scale: float, eta: float = 1.0,
                 negative_prompt: str = "", torch_threads: int = 1, use_gpu: bool = False, noise_level: float = 0.0):
        from raydiff.config import ModelSection
        from raydiff.models.loader import load_model

        torch.set_num_threads(torch_threads)
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        torch.manual_seed(0)
        self.model = load_model(ModelSection(**spec.model), device)
        self.model.denoiser.eval()
        load_policy_weights(self.model, spec)
        self.num_steps, self.guidance_scale, self.eta, self.negative_prompt = num_steps, guidance_scale, eta, negative_prompt
        self.noise_level = noise_level  # flow families: 0 = the deterministic ODE sampler (Flow-GRPO evaluates so)

    def ready(self) -> bool:
        return True

    def generate(self, prompts: list[str], seed: int) -> np.ndarray:
        from raydiff.sampling.conditioning import encode_prompts
        from raydiff.sampling.sampler import sample

        gen = torch.Generator(device=self.model.device).manual_seed(seed)
        cond = encode_prompts(self.model, prompts, self.negative_prompt)
        return sample(self.model, cond, prompts, self.num_steps, self.guidance_scale, self.eta, gen,
                      noise_level=self.noise_level).images


def load_policy_weights(model, spec: PolicySpec) -> None:
    if spec.learner_pt:
        from raydiff.models.lora import load_trainable_state_dict

        state = torch.load(spec.learner_pt, map_location="cpu", weights_only=False)["weights"]
        load_trainable_state_dict(model.denoiser, state)
    elif spec.export_dir:
        export, folder = Path(spec.export_dir), model.family.denoiser_folder
        if (export / folder).is_dir():  # full fine-tune: a diffusers unet/ or transformer/ folder
            full = type(model.denoiser).from_pretrained(str(export / folder), dtype=model.dtype).to(model.device)
            model.denoiser.load_state_dict(full.state_dict(), strict=False)
        else:
            weight = "pytorch_lora_weights.safetensors" if (export / "pytorch_lora_weights.safetensors").is_file() else None
            model.denoiser.load_lora_adapter(str(export), weight_name=weight, prefix=folder, adapter_name="checkpoint")


def batches(num_prompts: int, per_prompt: int, batch_size: int, seed: int) -> list[tuple[list[int], int]]:
    """[(item indices, seed)]; item = prompt * per_prompt + sample."""
    items = list(range(num_prompts * per_prompt))
    return [(items[i:i + batch_size], seed + j) for j, i in enumerate(range(0, len(items), batch_size))]


def sample_policy(spec: PolicySpec, prompts: list[str], per_prompt: int, batch_size: int, seed: int,
                  num_workers: int, worker_kwargs: dict, num_cpus: float = 1.0, num_gpus: float = 0.0,
                  ) -> Iterator[tuple[list[int], np.ndarray]]:
    """Yield (item indices, images) per batch as actors finish; the actors are killed afterwards."""
    import ray

    jobs = batches(len(prompts), per_prompt, batch_size, seed)
    workers = [ray.remote(EvalWorker).options(num_cpus=num_cpus, num_gpus=num_gpus, name=None)
               .remote(spec, use_gpu=num_gpus > 0, **worker_kwargs) for _ in range(max(1, min(num_workers, len(jobs))))]
    try:
        ray.get([w.ready.remote() for w in workers])
        pending = {}
        for j, (items, s) in enumerate(jobs):
            ref = workers[j % len(workers)].generate.remote([prompts[i // per_prompt] for i in items], s)
            pending[ref] = items
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            items = pending.pop(done[0])
            yield items, ray.get(done[0])
    finally:
        for w in workers:
            ray.kill(w, no_restart=True)


def score_policy(spec: PolicySpec, prompts: list[str], per_prompt: int, rewards: Callable, keep_prompts: int,
                 **kwargs) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Sample and score every item: ({'total'|component: (P, K)} scores, kept images (keep_prompts*K, H, W, 3))."""
    P, K = len(prompts), per_prompt
    scores: dict[str, np.ndarray] = {}
    kept: dict[int, np.ndarray] = {}
    for items, images in sample_policy(spec, prompts, per_prompt, **kwargs):
        total, parts = rewards(images, [prompts[i // K] for i in items])
        for name, vals in {"total": total, **parts}.items():
            scores.setdefault(name, np.full(P * K, np.nan, np.float64))[items] = np.asarray(vals, np.float64)
        for i, img in zip(items, images):
            if i < keep_prompts * K:
                kept[i] = img
    grid = np.stack([kept[i] for i in sorted(kept)]) if kept else np.zeros((0, 1, 1, 3), np.uint8)
    return {n: v.reshape(P, K) for n, v in scores.items()}, grid
