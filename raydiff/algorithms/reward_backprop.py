r"""Reward backpropagation through the sampling chain: the base of AlignProp, DRaFT and DRTune.

`RewardBackprop` samples x_0 with gradients (sampling/differentiable.py, DDIM), scores it
with a differentiable reward and steps on −r̃ + regularisers; the three algorithms differ
only in the `GradPlan` (which steps carry gradients) they sample with. Their shared config
fields are `RewardBackpropConfig`. Moved out of alignprop.py so siblings do not import
one another.
"""

from __future__ import annotations

import random
from typing import ClassVar, Optional

import torch
from pydantic import Field

from raydiff.algorithms.base import Algorithm, Needs
from raydiff.config_base import ConfigError, Section
from raydiff.sampling.conditioning import encode_prompts
from raydiff.sampling.differentiable import (
    GradPlan,
    adapters_disabled,
    decode_with_grad,
    random_last_k,
    sample_with_grad,
)


class RewardBackpropConfig(Section):
    """Fields every differentiable-reward (synchronous) algorithm shares."""

    step_kinds: ClassVar[tuple[str, ...]] = ("ddim",)  # the differentiable chain is DDIM on ε-prediction UNets (sd, sdxl)

    eta: Optional[float] = Field(0.0, ge=0, description="DDIM eta of the differentiable chain (AlignProp/DRaFT papers: 0, deterministic); None = sampling.eta.")
    checkpointing: bool = Field(True, description="Recompute each UNet call (and the VAE decode) in backward (torch.utils.checkpoint): memory of one UNet call per trained step instead of all its activations, ~1.3-1.5x step time.")
    reward_clip: Optional[float] = Field(None, description="Reward-hacking guard: train on min(r, reward_clip) (no gradient above it); None = off.")
    reward_target: Optional[float] = Field(None, description="Reward-hacking guard: train on −|r − reward_target| (approach a target instead of maximising); None = off. Overrides reward_clip.")
    ref_eps_weight: float = Field(0.0, ge=0, description="Weight of Σ_t mean (ε̂_θ − ε̂_ref)² over trained UNet calls, ε̂_ref from the base model with LoRA disabled (one extra no-grad UNet call per trained step; needs model.finetune=lora); 0 = off.")
    lora_l2_weight: float = Field(0.0, ge=0, description="Weight of Σ_layers ‖scale·B·A‖² (the LoRA weight update's squared Frobenius norm; needs model.finetune=lora); 0 = off.")
    eval_every: int = Field(0, ge=0, description="Evaluate on the served (non-differentiable) rewards every N policy versions (0 = never); read through `Algorithm.should_evaluate(version)` by the eval harness.")


def lora_delta_l2(unet) -> torch.Tensor:
    """Σ over LoRA layers of ‖scale·B·A‖²_F (conv LoRA flattened to matrices); differentiable."""
    total = None
    for module in unet.modules():
        A, B = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
        if not isinstance(A, torch.nn.ModuleDict) or not A:
            continue
        for name in A.keys():
            if name not in B:
                continue
            a, b = A[name].weight, B[name].weight
            delta = b.flatten(1) @ a.flatten(1)  # (out, r) @ (r, in·k·k); conv kernels flattened
            scaling = getattr(module, "scaling", None)
            scale = scaling.get(name, 1.0) if isinstance(scaling, dict) else 1.0
            term = (scale * delta).pow(2).sum()
            total = term if total is None else total + term
    if total is None:
        raise ValueError("lora_l2_weight > 0 needs model.finetune=lora (no LoRA layers on this UNet)")
    return total


class RewardBackprop(Algorithm):
    """Synchronous learner: sample with gradients, score with a differentiable reward, step on −r̃ + reg."""

    config_cls = RewardBackpropConfig

    def __init__(self, config, sampling, reward=None):
        super().__init__(config, sampling, reward)
        self._rewards = None
        self._plan_rng = None
        if reward is not None:
            self._rewards = self.build_rewards(reward)

    @property
    def needs(self) -> Needs:
        return Needs(mode="sync")

    # --- rewards ------------------------------------------------------------------------------
    @staticmethod
    def build_rewards(reward_section) -> list:
        """(name, reward, weight) for each component; every one must be differentiable."""
        from raydiff.rewards.base import make_reward

        if not reward_section.components:
            raise ConfigError("reward.components is empty; a differentiable-reward algorithm needs one, e.g. {name: brightness}")
        out = []
        for i, comp in enumerate(reward_section.components):
            r = make_reward(comp.registry_name, **comp.args)
            if not getattr(r, "differentiable", False):
                raise ConfigError(
                    f"reward.components[{i}].name={comp.name!r} is not differentiable; reward-backprop algorithms "
                    "need score_tensor (brightness, color_target, aesthetic, clip_score, pickscore, hps). "
                    "Non-differentiable rewards can only evaluate these runs (see algorithm.eval_every)."
                )
            out.append((comp.name, r, comp.weight))
        return out

    def score(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Weighted reward (N,) with graph, and each component (N,)."""
        parts = {name: r.score_tensor(images, prompts).float().to(images.device) for name, r, _ in self._rewards}
        total = sum(w * parts[name] for name, _, w in self._rewards)
        return total, parts

    def objective(self, r: torch.Tensor) -> torch.Tensor:
        """r̃: the reward actually maximised (target form or clip guards)."""
        c = self.config
        if c.reward_target is not None:
            return -(r - c.reward_target).abs()
        if c.reward_clip is not None:
            return r.clamp(max=c.reward_clip)
        return r

    # --- truncation plan (what the three algorithms differ in) ---------------------------------
    def plan(self, num_steps: int, rng: random.Random) -> GradPlan:
        return random_last_k(num_steps, self.config.k_min, self.config.k_max, rng)

    def should_evaluate(self, version: int) -> bool:
        """Hook for the eval harness: evaluate policy `version` on the served rewards now?"""
        every = self.config.eval_every
        return bool(every) and version > 0 and version % every == 0

    # --- the update ---------------------------------------------------------------------------
    def train_step(self, policy, stepper, batch, rng: torch.Generator) -> dict:
        if self._rewards is None:
            raise RuntimeError("this algorithm was built without reward components (make_algorithm(..., reward=cfg.reward))")
        model, cfg, s = policy.model, self.config, self.sampling
        # Per-batch streams from the batch seed: every rank gets its own seed from PromptBatch.shard,
        # and a re-run of the same batch repeats the same noise and truncation.
        gen = torch.Generator(device=model.device).manual_seed(int(batch.seed))
        plan = self.plan(s.num_steps, random.Random(int(batch.seed) * 7919 + 1))
        cond = encode_prompts(model, batch.prompts, s.negative_prompt)
        eta = s.eta if cfg.eta is None else cfg.eta
        reference = (lambda: adapters_disabled(model.denoiser)) if cfg.ref_eps_weight > 0 else None
        out = sample_with_grad(model, cond, plan, s.guidance_scale, eta, gen, checkpointing=cfg.checkpointing, reference=reference)

        n = len(batch.prompts)
        lat = torch.cat([out.latents, *out.lv_latents]) if out.lv_latents else out.latents
        images = decode_with_grad(model, lat, cfg.checkpointing)
        prompts = list(batch.prompts) * (1 + len(out.lv_latents))
        r, parts = self.score(images, prompts)
        r_obj = self.objective(r)
        # DRaFT-LV: mean over the n re-noised copies only (the chain's own x_0 carries no gradient).
        loss = -(r_obj[n:] if out.lv_latents else r_obj).mean()
        metrics = {}
        if out.reg is not None:
            loss = loss + cfg.ref_eps_weight * out.reg
            metrics["reg/ref_eps"] = float(out.reg.detach())
        if cfg.lora_l2_weight > 0:
            l2 = lora_delta_l2(model.denoiser)
            loss = loss + cfg.lora_l2_weight * l2
            metrics["reg/lora_l2"] = float(l2.detach())
        stepper.backward(loss)

        r0 = r[:n].detach().double().cpu().numpy()
        metrics.update({
            "reward/mean": float(r0.mean()), "reward/std": float(r0.std()),
            "reward/min": float(r0.min()), "reward/max": float(r0.max()),
            "reward/objective": float(r_obj[:n].detach().mean()),
            "loss": float(loss.detach()),
            "grad/norm": float(getattr(stepper, "last_grad_norm", float("nan"))),
            "grad/trained_steps": float(len(plan.grad_steps)),
            "grad/first_trained_step": float(min(plan.grad_steps)) if plan.grad_steps else float("nan"),
            "grad/unet_calls_with_grad": float(out.unet_calls_with_grad),
            "sample/steps_run": float(plan.last_step + 1),
        })
        for name, v in parts.items():
            metrics[f"reward/{name}"] = float(v[:n].detach().mean())
        if out.lv_latents:
            metrics["reward/lv_mean"] = float(r[n:].detach().mean())
        metrics["images"] = (images[:n].detach().permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return metrics
