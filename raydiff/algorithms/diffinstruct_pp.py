r"""Diff-Instruct++: reward alignment of a one-step generator with an integral-KL prior (Luo, arXiv 2410.18881).

Notation (VP diffusion, ε-prediction, latents; d = C·h·w):
    x_0 = g_θ(z, c)      one-step generator, `raydiff.models.one_step.one_step_x0` (policy UNet at t*)
    x_t = √ᾱ_t x_0 + σ_t ε,   σ_t = √(1 − ᾱ_t),   t ~ U{t_min..t_max}
    score  s(x_t, t, c) = ∇ log p_t(x_t | c) = −ε̂(x_t, t, c) / σ_t          (ε-prediction → score)
    s_ref^ω = −ε_ref^ω/σ_t,  ε_ref^ω = ε_ref(x_t, ∅) + ω (ε_ref(x_t, c) − ε_ref(x_t, ∅))   frozen reference, CFG ω
    s_ψ = −ε_ψ(x_t, t, c)/σ_t   online assistant: the diffused generator distribution's score

Alternating updates, per generator update (`assistant_steps` ψ-updates first):
  (1) ψ by denoising score matching on generator samples (no gradient into θ):
        L_DSM(ψ) = E_{z,t,ε} ‖ε_ψ(√ᾱ_t sg(x_0) + σ_t ε, t, c) − ε‖² / d
  (2) θ by
        L(θ) = −α E[r(x_0, c)] + E_{z,t,ε}[ w(t) ⟨sg(s_ψ(x_t) − s_ref^ω(x_t)), x_t⟩ ] / d
                                 − β E[ w(t) ⟨sg(s_ref(x_t|c) − s_ref(x_t|∅)), x_t⟩ ] / d
     The second term is a surrogate: its value is meaningless, its θ-gradient is the integral-KL
     gradient ∇_θ ∫ w(t) KL(p_θ,t ‖ p_ref,t^ω) dt / d (Diff-Instruct; the generator's own score
     term vanishes in expectation, and s_ψ stands in for the intractable ∇ log p_θ,t).
     Sign check: descending moves x_t along s_ref − s_ψ, towards the reference's density and away
     from where the generator already is. In ε terms s_ψ − s_ref^ω = (ε_ref^ω − ε_ψ)/σ_t.
     The third term is the "CFG implicit reward" log p_ref(c | x_t) with gradient s(·|c) − s(·|∅)
     (paper §CFG); since it has the same form as the KL term, β adds to ω exactly: (ω, β) acts as
     (ω + β, 0). It is kept separate because the paper presents it as a reward, with its own metric.

Weighting w(t) (`weighting`), per sample:
    uniform: w = 1            the per-step KL gradient (large at small σ_t)
    sigma:   w = σ_t          gradient (ε_ref^ω − ε_ψ) wrt x_t: Diff-Instruct's practical choice
    sigma2:  w = σ_t²         the ε-matching weight
    dmd:     w = σ_t² / (ᾱ_t · mean|x_0 − x̂_0^ref|)   DMD/DMD2's normalisation: the gradient wrt x_0 is
             (x̂_0^ψ − x̂_0^ref)/mean|x_0 − x̂_0^ref|, x̂_0 the denoised predictions (sg).

The reference is the base UNet: with `model.finetune=lora`, the policy UNet with adapters disabled
(no extra copy); with `full`, a frozen copy taken in `build_modules` before any training or
`generator_path` loading. The assistant ψ is a copy of the reference UNet (frozen base + its own
fresh LoRA with B = 0 under LoRA, all weights under full), returned by `build_modules` as
{"assistant": ...}: its own optimiser group (`assistant_lr`, `assistant_weight_decay`), own
gradient clipping, checkpointed (only its trainable weights). Each update steps only its own
group (`stepper.backward(loss, groups=[...])`). The assistant is conditional (no CFG, no
unconditional training), as DMD2's fake score.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import ClassVar, Literal, Optional

import torch
from pydantic import Field, model_validator

from raydiff.algorithms.base import Algorithm, Needs
from raydiff.config_base import ConfigError, Section
from raydiff.models.one_step import one_step_x0
from raydiff.sampling.conditioning import encode_prompts
from raydiff.sampling.sampler import decode_float, initial_noise, predict_noise
from raydiff.types import Conditioning


class Config(Section):
    step_kinds: ClassVar[tuple[str, ...]] = ("ddim",)  # one-step ε-prediction generator and DDIM scores (sd, sdxl)
    name: Literal["diffinstruct_pp"] = Field("diffinstruct_pp", description="Algorithm name.")
    t_star: int = Field(999, ge=0, description="Generator timestep t*: x_0 = (z − σ_t* ε_θ(z, t*, c))/√ᾱ_t*, z ~ N(0, I). Keep the same value to generate from the export (OneStepPipeline).")
    generator_path: Optional[str] = Field(None, description="The distilled one-step generator to align (the paper's regime): a LoRA export folder or .safetensors (model.finetune=lora) or a diffusers UNet folder (model.finetune=full). Required unless distill_from_reference.")
    distill_from_reference: bool = Field(False, description="Start the generator from the reference UNet at t* instead of generator_path: distillation and alignment at once (the tiny CPU configs), not the paper's setting.")
    reward_weight: float = Field(1.0, ge=0, description="α: weight of −E[r(x_0, c)] (reward = weighted sum of reward.components, all differentiable). Trades reward against the per-dimension IKL.")
    ref_guidance_scale: float = Field(1.0, ge=0, description="ω: CFG scale of the reference score s_ref^ω the IKL pulls towards (1 = conditional only, no extra branch; paper/DMD2 use larger values, e.g. 4.5-8 for SD).")
    cfg_reward_weight: float = Field(0.0, ge=0, description="β: weight of the CFG implicit reward log p_ref(c|x_t); equivalent to adding β to ref_guidance_scale. 0 = off.")
    weighting: Literal["uniform", "sigma", "sigma2", "dmd"] = Field("dmd", description="w(t) of the IKL gradient: 1, σ_t, σ_t², or DMD's σ_t²/(ᾱ_t·mean|x_0 − x̂_0^ref|) (see module docstring).")
    t_min: int = Field(20, ge=0, description="Smallest training timestep for the IKL and DSM noise levels (DMD2: 0.02·T).")
    t_max: int = Field(980, ge=0, description="Largest training timestep (inclusive; DMD2: 0.98·T); < num_train_timesteps.")
    assistant_steps: int = Field(1, ge=1, description="Assistant (ψ) DSM updates before each generator update (DMD2 uses 5: two-time-scale updates).")
    generator_steps: int = Field(1, ge=1, description="Generator updates per prompt batch (each preceded by assistant_steps ψ updates); all use the batch's prompts with fresh noise.")
    assistant_lr: Optional[float] = Field(None, gt=0, description="Assistant learning rate; None = learner.learning_rate.")
    assistant_weight_decay: Optional[float] = Field(None, ge=0, description="Assistant AdamW weight decay; None = learner.weight_decay.")

    @model_validator(mode="after")
    def _generator_source(self) -> "Config":
        if self.generator_path is None and not self.distill_from_reference:
            raise ValueError("algorithm.generator_path is required: Diff-Instruct++ aligns an already distilled one-step "
                             "generator (e.g. a DMD2 LoRA export folder); set algorithm.generator_path=DIR, or "
                             "algorithm.distill_from_reference=true to start from the reference UNet at t* "
                             "(distillation + alignment at once, as the tiny configs do)")
        if self.generator_path is not None and self.distill_from_reference:
            raise ValueError("algorithm.generator_path and algorithm.distill_from_reference=true exclude each other: pick one")
        return self


class AssistantDiffusion(torch.nn.Module):
    """The online assistant ε_ψ: a UNet copy whose state_dict holds only its trainable weights (small checkpoints)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        out = destination if destination is not None else {}
        for n, p in self.named_parameters():
            if p.requires_grad:
                out[prefix + n] = p if keep_vars else p.detach()
        return out

    def load_state_dict(self, state, strict: bool = True, assign: bool = False):
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        if strict and set(params) != set(state):
            raise ValueError(f"assistant weights do not match: {len(set(params) - set(state))} missing, {len(set(state) - set(params))} unknown")
        with torch.no_grad():
            for n, t in state.items():
                if n in params:
                    params[n].copy_(t.to(params[n].device, params[n].dtype))
        return torch.nn.modules.module._IncompatibleKeys([], [])


def _load_generator(model, path: str) -> None:
    """Load a distilled one-step generator into the policy UNet (LoRA export or diffusers UNet folder)."""
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"algorithm.generator_path {path!r} does not exist")
    lora_file = p if p.suffix == ".safetensors" else p / "pytorch_lora_weights.safetensors"
    if lora_file.is_file():
        if not getattr(model.unet, "peft_config", None):
            raise ConfigError(f"algorithm.generator_path {path!r} is a LoRA; it needs model.finetune=lora")
        from peft.utils import set_peft_model_state_dict
        from safetensors.torch import load_file

        state = {k.removeprefix("unet."): v for k, v in load_file(str(lora_file)).items() if k.startswith("unet.")}
        result = set_peft_model_state_dict(model.unet, state, adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise ConfigError(f"algorithm.generator_path {path!r}: LoRA keys do not match model.lora (e.g. {result.unexpected_keys[:2]})")
        return
    unet_dir = p / "unet" if (p / "unet" / "config.json").is_file() else p
    if not (unet_dir / "config.json").is_file():
        raise ConfigError(f"algorithm.generator_path {path!r}: neither pytorch_lora_weights.safetensors nor a diffusers UNet folder")
    if getattr(model.unet, "peft_config", None):
        raise ConfigError(f"algorithm.generator_path {path!r} is a full UNet; it needs model.finetune=full (with LoRA the reference is the UNet's base)")
    from diffusers import UNet2DConditionModel

    src = UNet2DConditionModel.from_pretrained(str(unet_dir), dtype=model.dtype)
    model.unet.load_state_dict(src.state_dict())


class DiffInstructPP(Algorithm):
    config_cls = Config

    def __init__(self, config: Config, sampling, reward=None):
        super().__init__(config, sampling, reward)
        if config.t_min > config.t_max:
            raise ConfigError(f"algorithm.t_min={config.t_min} must be <= algorithm.t_max={config.t_max}")
        self._rewards = None
        if reward is not None:
            from raydiff.algorithms.reward_backprop import RewardBackprop

            self._rewards = RewardBackprop.build_rewards(reward)
        self.assistant: Optional[AssistantDiffusion] = None
        self._ref_unet = None  # frozen copy, finetune=full only

    @property
    def needs(self) -> Needs:
        return Needs(mode="sync")

    # --- networks -----------------------------------------------------------------------------
    def build_modules(self, model) -> dict[str, torch.nn.Module]:
        c = self.config
        n_train = model.scheduler.config.num_train_timesteps
        for field in ("t_star", "t_max"):
            if getattr(c, field) >= n_train:
                raise ConfigError(f"algorithm.{field}={getattr(c, field)} must be < the scheduler's num_train_timesteps={n_train}")
        if model.scheduler.config.prediction_type != "epsilon":
            raise ConfigError(f"diffinstruct_pp needs an ε-prediction model; this scheduler predicts {model.scheduler.config.prediction_type!r}")
        lora = bool(getattr(model.unet, "peft_config", None))
        # Both copies are taken before generator_path is loaded: they start at the reference.
        assistant = copy.deepcopy(model.unet)
        if lora:
            with torch.no_grad():
                for n, p in assistant.named_parameters():
                    if "lora_B" in n:
                        p.zero_()  # ε_ψ = ε_ref exactly at init
        else:
            self._ref_unet = copy.deepcopy(model.unet).requires_grad_(False).eval().to(model.device)
        if c.generator_path:
            _load_generator(model, c.generator_path)
        self.assistant = AssistantDiffusion(assistant.eval())
        return {"assistant": self.assistant}

    def param_group_options(self, name: str) -> dict:
        out = {}
        if name == "assistant":
            if self.config.assistant_lr is not None:
                out["lr"] = self.config.assistant_lr
            if self.config.assistant_weight_decay is not None:
                out["weight_decay"] = self.config.assistant_weight_decay
        return out

    def reference(self, model):
        """(unet, context) for the frozen reference ε_ref: the LoRA'd UNet with adapters off, or the frozen copy."""
        if self._ref_unet is not None:
            return self._ref_unet, contextlib.nullcontext()
        from raydiff.sampling.differentiable import adapters_disabled

        return model.unet, adapters_disabled(model.unet)

    # --- pieces -------------------------------------------------------------------------------
    def score(self, images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts = {name: r.score_tensor(images, prompts).float().to(images.device) for name, r, _ in self._rewards}
        return sum(w * parts[name] for name, _, w in self._rewards), parts

    def noise(self, model, x0: torch.Tensor, gen: torch.Generator):
        """x_t = √ᾱ_t x_0 + σ_t ε with t ~ U{t_min..t_max} per sample; returns x_t, t, ε, ᾱ_t (N,1,1,1)."""
        c = self.config
        t = torch.randint(c.t_min, c.t_max + 1, (x0.shape[0],), generator=gen, device=gen.device).to(x0.device)
        eps = torch.randn(x0.shape, generator=gen, device=gen.device, dtype=torch.float32).to(x0.device)
        a = model.scheduler.alphas_cumprod.to(x0.device, torch.float32)[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0.float() + (1 - a).sqrt() * eps
        return x_t.to(x0.dtype), t, eps, a

    @torch.no_grad()
    def reference_eps(self, model, x_t, t, cond: Conditioning) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(ε_ref^ω, ε_ref(c) − ε_ref(∅) or None); one batched call with both branches only when ω ≠ 1 or β > 0."""
        c = self.config
        unet, ctx = self.reference(model)
        with ctx:
            if c.ref_guidance_scale == 1.0 and c.cfg_reward_weight == 0:
                return predict_noise(model, x_t, t, cond, 1.0, unet=unet).float(), None
            both = Conditioning(
                embeds=torch.cat([cond.neg_embeds, cond.embeds]), neg_embeds=None,
                pooled=None if cond.pooled is None else torch.cat([cond.neg_pooled, cond.pooled]),
                time_ids=None if cond.time_ids is None else torch.cat([cond.time_ids, cond.time_ids]),
            )
            eps_u, eps_c = predict_noise(model, torch.cat([x_t, x_t]), torch.cat([t, t]), both, 1.0, unet=unet).float().chunk(2)
        return eps_u + c.ref_guidance_scale * (eps_c - eps_u), eps_c - eps_u

    def weight(self, x0, x_t, eps_ref, a) -> torch.Tensor:
        """w(t) per sample (N,1,1,1), detached."""
        sigma = (1 - a).sqrt()
        kind = self.config.weighting
        if kind == "uniform":
            return torch.ones_like(a)
        if kind == "sigma":
            return sigma
        if kind == "sigma2":
            return sigma ** 2
        x0_ref = (x_t.float() - sigma * eps_ref) / a.sqrt()
        norm = (x0.detach().float() - x0_ref).abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-5)
        return sigma ** 2 / (a * norm)

    def ikl_loss(self, model, x0: torch.Tensor, cond: Conditioning, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """IKL surrogate (+ CFG implicit reward) on generator latents x0 (N,C,h,w) with graph; (loss, stats).

        loss = mean_n Σ_dims w(t)·sg(s_ψ − s_ref^ω − β(s_c − s_∅))·x_t / d; only x_t carries gradient.
        """
        c = self.config
        x_t, t, _, a = self.noise(model, x0, gen)
        sigma = (1 - a).sqrt()
        xs = x_t.detach()
        with torch.no_grad():
            eps_psi = predict_noise(model, xs, t, cond, 1.0, unet=self.assistant.unet).float()
        eps_ref, cfg_dir = self.reference_eps(model, xs, t, cond)
        w = self.weight(x0, xs, eps_ref, a)
        score_diff = (eps_ref - eps_psi) / sigma  # s_ψ − s_ref^ω, since s = −ε/σ
        direction = score_diff
        stats = {}
        if cfg_dir is not None and c.cfg_reward_weight > 0:
            implicit = -cfg_dir / sigma  # s(·|c) − s(·|∅)
            direction = direction - c.cfg_reward_weight * implicit
            stats["dipp/cfg_reward_grad_rms"] = float((w * c.cfg_reward_weight * implicit).pow(2).mean().sqrt())
        g = (w * direction).detach()
        loss = (g * x_t.float()).flatten(1).mean(dim=1).mean()
        stats.update({
            # Bounded IKL indicator: E_t[σ_t² ‖s_ψ − s_ref^ω‖²]/d = mean (ε_ψ − ε_ref^ω)², 0 iff the scores agree.
            "dipp/ikl": float((eps_psi - eps_ref).pow(2).mean()),
            "dipp/kl_grad_rms": float(g.pow(2).mean().sqrt()),
            "dipp/t_mean": float(t.float().mean()),
        })
        return loss, stats

    def dsm_loss(self, model, x0: torch.Tensor, cond: Conditioning, gen: torch.Generator) -> torch.Tensor:
        """Denoising score matching of the assistant on sg(x0): mean (ε_ψ(x_t, t, c) − ε)²."""
        x_t, t, eps, _ = self.noise(model, x0.detach(), gen)
        pred = predict_noise(model, x_t, t, cond, 1.0, unet=self.assistant.unet).float()
        return (pred - eps).pow(2).mean()

    # --- the update ---------------------------------------------------------------------------
    def train_step(self, policy, stepper, batch, rng: torch.Generator) -> dict:
        if self._rewards is None:
            raise RuntimeError("diffinstruct_pp was built without reward components (make_algorithm(..., reward=cfg.reward))")
        if self.assistant is None:
            raise RuntimeError("diffinstruct_pp.build_modules(model) must run before train_step")
        model, c = policy.model, self.config
        n = len(batch.prompts)
        gen = torch.Generator(device=model.device).manual_seed(int(batch.seed))
        cond = encode_prompts(model, batch.prompts, self.sampling.negative_prompt)
        sums: dict[str, float] = {}

        def add(k, v, count):
            sums[k] = sums.get(k, 0.0) + v / count

        for _ in range(c.generator_steps):
            # (1) assistant: DSM on detached generator samples, only the "assistant" group steps.
            for _ in range(c.assistant_steps):
                with torch.no_grad():
                    x0 = one_step_x0(model, initial_noise(model, n, gen), cond, c.t_star)
                dsm = self.dsm_loss(model, x0, cond, gen)
                stepper.backward(dsm, groups=["assistant"])
                add("dipp/dsm_loss", float(dsm.detach()), c.assistant_steps * c.generator_steps)
            # (2) generator: −α r + IKL surrogate, only the "policy" group steps.
            x0 = one_step_x0(model, initial_noise(model, n, gen), cond, c.t_star)
            images = decode_float(model, x0)
            r, parts = self.score(images, list(batch.prompts))
            kl, stats = self.ikl_loss(model, x0, cond, gen)
            loss = -c.reward_weight * r.mean() + kl
            stepper.backward(loss, groups=["policy"])
            for k, v in {"reward/mean": float(r.detach().mean()), "reward/std": float(r.detach().std()) if n > 1 else 0.0,
                         "loss": float(loss.detach()), "dipp/ikl_surrogate": float(kl.detach()),
                         "dipp/latent_std": float(x0.detach().float().std()), **stats,
                         **{f"reward/{name}": float(v.detach().mean()) for name, v in parts.items()}}.items():
                add(k, v, c.generator_steps)
        sums["grad/norm_policy"] = float(stepper.group_grad_norms.get("policy", float("nan")))
        sums["grad/norm_assistant"] = float(stepper.group_grad_norms.get("assistant", float("nan")))
        sums["images"] = (images.detach().permute(0, 2, 3, 1) * 255).round().to(torch.uint8).cpu().numpy()
        return sums


ALGORITHM = DiffInstructPP
