r"""DAG: Diffusion Alignment with GFlowNets (Zhang et al., arXiv 2406.00633; apple/ml-diffusion-alignment-gflownet).

A DDIM chain x_T → … → x_0 sampled with η = 1 and CFG is a trajectory of a
GFlowNet. Per stored transition x_t → x_{t−1} (index j: x_t = latents[:, j]):

    log F(x_t)     = F_φ(x_t, t, c) + β · r(decode(x̂_0(x_t)), c)          (x_t not terminal)
    log F(x_0)     = β · r(x_0, c)                                          (terminal)
    δ_t            = log F(x_t) + log P_F(x_{t−1}|x_t) − log P_B(x_t|x_{t−1}) − log F(x_{t−1})
    L_DB           = δ_t²

- log P_F: the Gaussian DDIM step of the current policy (CFG ε̂, σ_t from η = 1),
  averaged over C·H·W (`ddim_step`); gradients reach the LoRA weights through it.
- log P_B: the fixed forward kernel q(x_t|x_{t−1}) = N(√(ᾱ_t/ᾱ_prev) x_{t−1}, (1 − ᾱ_t/ᾱ_prev) I),
  mean over C·H·W (`backward_log_prob`), no parameters.
- r(x̂_0(x_t)): reward of the *conditional* (no-CFG) x̂_0, a constant (no gradient).
  Rollouts record it (`Needs.intermediate_rewards_guidance = "cond"`; ε_c comes free with
  the CFG call) and score all N·T images in one batched reward call: see docs/algorithms/dag.md.
- β = β_max · min(1, epoch / β_warmup); the driver stamps it on each batch (`extras['beta']`)
  and checkpoints its epoch counter.
- Proximal term: + λ · mean_CHW (ε̂ − ε̂_old)², ε̂_old = CFG ε̂ stored at sampling (`extras['eps']`).

DAG-KL (`variant: kl`): F_φ trains on δ² with log P_F detached; the policy trains on the
decoupled PPO surrogate of `algorithms/common.py` with advantage A = −δ (detached),
leave-one-out normalised over the micro-batch and clipped to ±A_max, weighted by `klpf`:

    L_KL = (δ|_{log P_F detached})² + klpf · w · max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε)),
    ρ = exp(log P_F − log π_prox),   w = min(exp(log π_prox − log P_old), c̄)

(π_prox = the learner's log-probs when the batch arrives; = P_old at staleness 0.)
Timestep grouping: each micro-batch trains one timestep index j for all its samples, so
the leave-one-out baseline of A compares δ's at the *same* t. The reference
(apple/ml-diffusion-alignment-gflownet) permutes every trajectory's timesteps
independently, so its baseline mixes timesteps. For DB (and DAG-KL's flow term) the
summed gradient is identical; for the KL advantages ours is the per-timestep baseline,
which removes the systematic differences of δ between timesteps from A (documented in
docs/algorithms/dag.md). Trained steps: int(T · timestep_fraction), as the reference.
"""

from __future__ import annotations

import math
from typing import ClassVar, Iterator, Literal

import torch
from pydantic import Field

from raydiff.algorithms.base import Algorithm, Needs, shuffled_pieces
from raydiff.algorithms.common import (
    PROX_KEY,
    AsyncAlgorithmConfig,
    StepAverager,
    attach_proximal_log_probs,
    decoupled_ppo_terms,
    trained_steps,
)
from raydiff.algorithms.flow_net import FlowNet
from raydiff.sampling.steps.ddim import backward_log_prob
from raydiff.types import Trajectory


class Config(AsyncAlgorithmConfig):
    step_kinds: ClassVar[tuple[str, ...]] = ("ddim",)  # DDIM transitions and the DDIM backward kernel log P_B (ε-prediction UNets: sd, sdxl)
    name: Literal["dag"] = Field("dag", description="Algorithm name.")
    variant: Literal["db", "kl"] = Field("db", description="db: detailed balance trains policy and F_φ; kl: DAG-KL (F_φ on δ² with log P_F detached, policy on a PPO term).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches of train_batch_size per optimiser step (reference: 4); one step = this x trained timesteps backward calls.")
    beta_max: float = Field(100.0, ge=0, description="Reward exponent β_max: log F(x_0) = β·r (reference reward_exp 100; β is tuned for log-probs averaged over C·H·W).")
    beta_warmup_epochs: int = Field(50, ge=0, description="β = β_max·min(1, epoch/beta_warmup_epochs); 0 = β_max from the start (reference: half of 100 epochs).")
    proximal_coef: float = Field(1.0, ge=0, description="λ of the proximal term λ·mean_CHW(ε̂ − ε̂_old)² (reference unetreg 1.0); 0 disables it and rollouts stop storing ε̂.")
    klpf: float = Field(1.0, gt=0, description="variant=kl: weight of the PPO-clipped policy term.")
    clip_range: float = Field(1e-4, gt=0, description="variant=kl: PPO clip ε on the per-step ratio (reference 1e-4).")
    adv_clip_max: float = Field(5.0, gt=0, description="variant=kl: leave-one-out advantages are clipped to ±this.")
    flow_learning_rate: float = Field(3e-4, gt=0, description="AdamW learning rate of F_φ (its own optimiser group; reference 3e-4).")
    flow_weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay of F_φ (reference 1e-4).")
    flow_channels: list[int] = Field(default_factory=lambda: [64, 128, 256], min_length=1, description="F_φ conv widths; each level halves the latent side (stride 2), then global average pooling.")
    flow_embed_dim: int = Field(256, ge=8, description="F_φ width of the time + text embedding and of the head.")
    flow_init_seed: int = Field(0, description="Seed of F_φ's initialisation (identical on every learner rank).")

    def validate_sampling(self, sampling) -> None:
        """P_F and P_B are consistent kernels of the same Markov chain only at η = 1 (σ_t² = the posterior variance)."""
        if sampling.eta != 1.0:
            raise ValueError(f"sampling.eta={sampling.eta}: DAG's detailed balance pairs P_F with the forward kernel P_B, "
                             "which holds only for DDIM η = 1; set sampling.eta=1.0")


def beta_at(cfg: Config, epoch: int) -> float:
    """β = β_max · min(1, epoch / warmup) (the reference's linear anneal)."""
    if cfg.beta_warmup_epochs == 0:
        return cfg.beta_max
    return cfg.beta_max * min(1.0, epoch / cfg.beta_warmup_epochs)


def db_residual(log_f: torch.Tensor, log_pf: torch.Tensor, log_pb: torch.Tensor, log_f_next: torch.Tensor) -> torch.Tensor:
    """δ = log F(x_t) + log P_F(x_{t−1}|x_t) − log P_B(x_t|x_{t−1}) − log F(x_{t−1}); all (N,)."""
    return log_f + log_pf - log_pb - log_f_next


def rloo_advantages(reward: torch.Tensor, clip: float, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Leave-one-out normalised advantages over the batch, clipped to ±clip; reward (N,), no grad.

    `valid` (N,) bool leaves padding out of every baseline (their advantage is 0). With fewer
    than 2 valid samples there is no leave-one-out baseline: advantages are 0 (no PPO signal
    from that micro-batch; its flow term still trains).
    """
    if valid is not None and not bool(valid.all()):
        out = torch.zeros_like(reward)
        if int(valid.sum()) >= 2:
            out[valid] = rloo_advantages(reward[valid], clip)
        return out
    n = reward.shape[0]
    if n < 2:
        return torch.zeros_like(reward)
    baseline = (reward.sum() - reward) / (n - 1)
    sq = (reward - baseline) ** 2
    var = (sq.sum() - sq) / (n - 1)
    return ((reward - baseline) / (var.sqrt() + 1e-8)).clamp(-clip, clip)


class DAG(Algorithm):
    config_cls = Config

    def __init__(self, config: Config, sampling, reward=None):
        super().__init__(config, sampling, reward)
        self.epoch = 0  # driver side: epochs prepared (β schedule), checkpointed via state_dict
        self.flow: FlowNet | None = None  # learner side: built by build_modules

    @property
    def needs(self) -> Needs:
        return Needs(mode="async", keep_eps=self.config.proximal_coef > 0, intermediate_rewards=True,
                     intermediate_rewards_guidance="cond")

    # --- driver ------------------------------------------------------------
    def prepare(self, batch: Trajectory) -> Trajectory:
        if "step_rewards" not in batch.extras:
            raise RuntimeError("DAG needs extras['step_rewards'] from the rollouts (Needs.intermediate_rewards)")
        batch.extras["beta"] = torch.full((len(batch),), beta_at(self.config, self.epoch), dtype=torch.float32)
        self.epoch += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state.get("epoch", 0))

    # --- learner -----------------------------------------------------------
    def build_modules(self, model) -> dict[str, torch.nn.Module]:
        uc = model.denoiser.config
        pooled_dim = None
        if getattr(uc, "addition_embed_type", None) == "text_time":
            pooled_dim = uc.projection_class_embeddings_input_dim - 6 * uc.addition_time_embed_dim
        self.flow = FlowNet(uc.in_channels, uc.cross_attention_dim, pooled_dim, self.config.flow_channels,
                            self.config.flow_embed_dim, seed=self.config.flow_init_seed)
        return {"flow": self.flow}

    def param_group_options(self, name: str) -> dict:
        if name == "flow":
            return {"lr": self.config.flow_learning_rate, "weight_decay": self.config.flow_weight_decay}
        return {}

    def trained_steps(self, num_steps: int) -> int:
        return trained_steps(num_steps, self.config.timestep_fraction)

    def _chunks(self, minibatch: Trajectory) -> int:
        return math.ceil(len(minibatch) / self.config.train_batch_size)

    def prepare_batch(self, policy, batch: Trajectory) -> Trajectory:
        """DAG-KL: log π_prox for the decoupled PPO term (DB needs no ratio)."""
        return attach_proximal_log_probs(policy, batch) if self.config.variant == "kl" else batch

    def minibatches(self, batch, rng: torch.Generator) -> Iterator:
        """Per inner epoch: shuffle, then ceil(N / (train_batch_size × gradient_accumulation_steps)) near-equal
        pieces (one optimiser step each; no sample dropped, counts depend only on N)."""
        yield from shuffled_pieces(batch, self.config.train_batch_size * self.config.gradient_accumulation_steps,
                                   self.config.num_inner_epochs, rng)

    def micro_steps_per_update(self, minibatch: Trajectory) -> int:
        return self._chunks(minibatch) * self.trained_steps(minibatch.log_probs.shape[1])

    def transition_loss(self, policy, batch: Trajectory, j: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss (scalar) of stored transition j for the micro-batch `batch`, and its detached parts (N,)."""
        cfg, flow, dev = self.config, self.flow, policy.device
        T = batch.log_probs.shape[1]
        out, eps = policy.step(batch, j)  # log P_F with gradients to the policy, ε̂ (CFG)
        log_pf = out.log_prob
        t, x_t, x_prev = batch.timesteps[j], batch.latents[:, j].to(dev, torch.float32), batch.latents[:, j + 1].to(dev, torch.float32)
        log_pb = backward_log_prob(policy.model.scheduler, t, x_t, x_prev)
        cond = batch.cond.to(dev)
        beta = batch.extras["beta"].to(dev).float()
        step_r = batch.extras["step_rewards"].to(dev).float()
        log_f = flow(x_t, t.to(dev), cond.embeds, cond.pooled) + beta * step_r[:, j]
        if j == T - 1:
            log_f_next = beta * torch.as_tensor(batch.rewards, dtype=torch.float32, device=dev)
        else:
            log_f_next = flow(x_prev, batch.timesteps[j + 1].to(dev), cond.embeds, cond.pooled) + beta * step_r[:, j + 1]
        delta = db_residual(log_f, log_pf, log_pb, log_f_next)
        parts = {"db_loss": delta.detach() ** 2, "log_pf": log_pf.detach(), "log_pb": log_pb.detach(),
                 "log_flow": log_f.detach(), "step_reward": step_r[:, j]}
        w = batch.weights.to(dev) if batch.weights is not None else None
        if cfg.variant == "db":
            per = delta**2
        else:
            per_flow = db_residual(log_f, log_pf.detach(), log_pb, log_f_next) ** 2
            adv = rloo_advantages(-delta.detach(), cfg.adv_clip_max, None if w is None else w > 0)
            behaviour = batch.log_probs[:, j].to(dev)
            prox = batch.extras[PROX_KEY][:, j].to(dev) if PROX_KEY in batch.extras else behaviour
            ppo, stats = decoupled_ppo_terms(log_pf, prox, behaviour, adv, cfg.clip_range, cfg.is_clip, cfg.is_mode)
            per = per_flow + cfg.klpf * ppo
            parts.update(loss_klpf=ppo.detach(), **{k: torch.as_tensor(v) for k, v in stats.items()})
        if cfg.proximal_coef > 0:
            eps_old = batch.extras["eps"][:, j].to(dev, eps.dtype)
            prox = ((eps - eps_old) ** 2).float().mean(dim=(1, 2, 3))
            per = per + cfg.proximal_coef * prox
            parts["proximal"] = prox.detach()
        loss = (per * w).mean() if w is not None else per.mean()
        return loss, parts

    def train_step(self, policy, optimizer, batch: Trajectory, rng: torch.Generator) -> dict[str, float]:
        if self.flow is None:
            raise RuntimeError("DAG.train_step before build_modules: the learner builds F_φ first")
        self.flow.train()
        T = batch.log_probs.shape[1]
        steps = torch.randperm(T, generator=rng)[: self.trained_steps(T)].tolist()
        bs = self.config.train_batch_size
        starts = range(0, len(batch), bs)
        stats = StepAverager(len(starts) * len(steps))  # summed on the device: one host copy, not one per step
        for start in starts:
            micro = batch.index(list(range(start, min(start + bs, len(batch)))))
            for j in steps:
                loss, parts = self.transition_loss(policy, micro, j)
                optimizer.backward(loss)
                stats.add({"loss": loss.detach(), **{k: v.float().max() if k.endswith("max_dev") else v.float().mean()
                                                     for k, v in parts.items()}})
        metrics = stats.result()
        metrics["beta"] = float(batch.extras["beta"][0])
        # Reward round trips behind this batch: per rollout batch 1 (final) + ceil(N·T / rollout.decode_chunk)
        # (all T intermediate x̂_0, decoded and scored chunk by chunk), versus T + 1 scoring one timestep per call.
        calls = float(batch.timings.get("reward_calls", 0))
        metrics["reward_round_trips"] = calls
        metrics["reward_round_trips_per_timestep_equiv"] = float(batch.timings.get("rollout_batches", calls / 2)) * (T + 1)
        return metrics


ALGORITHM = DAG
