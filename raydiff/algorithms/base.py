"""What an algorithm is to the engine: a config, the rollout data it needs, and its update.

The engine never branches on an algorithm's name. It asks the algorithm:
- `needs`: what rollouts must record (e.g. per-step ε̂ for a proximal term),
- `prepare(batch)`: driver-side, stateful processing of scored batches
  (advantages, per-prompt statistics), checkpointed via `state_dict`; it sees
  metadata only (latents, log-probs, conditioning and images are None there:
  they go to the learner ranks directly, engine/datapath.py),
- `build_modules(model)`: learner-side extra trainable networks (e.g. DAG's
  flow net), trained in their own optimiser group and checkpointed with the learner,
- `prepare_batch(policy, batch)`: learner-side, once per received batch before its
  first optimiser step (e.g. the proximal log-probs of decoupled PPO, no grad),
- `minibatches(batch, rng)`: how the learner cuts what it receives (trajectories
  for async algorithms, a `PromptBatch` for sync ones),
- `train_step(policy, optimizer, batch, rng)`: learner-side update on one
  minibatch; it calls `optimizer.backward(loss)` per micro-step and returns metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch

from raydiff.types import PromptBatch, Trajectory


@dataclass(frozen=True)
class Needs:
    """Declared requirements the engine provisions without knowing the algorithm."""

    mode: str = "async"  # "async": rollouts + learners (DDPO, DAG); "sync": the learner samples with gradients (PromptBatch in)
    keep_eps: bool = False  # rollouts store the CFG noise prediction per step (extras['eps'])
    keep_noise: bool = False  # rollouts store each step's realised noise z = (x_{t-1} − μ)/σ (extras['noise'])
    intermediate_rewards: bool = False  # rewards of x̂_0 at every step are requested
    intermediate_rewards_guidance: str = "cfg"  # x̂_0 for those rewards from the CFG ε̂ ("cfg") or the conditional branch alone ("cond")
    reference_model: bool = False  # a frozen copy of the base model on the learner
    final_latents_only: bool = False  # the learner trains on x_0 alone: rollouts send no trajectory, log-probs or extras (engine/datapath.py)
    samples_per_prompt: int = 1  # k: each epoch samples groups of k images per prompt (engine/groups.py); group ids travel with the batch


def shuffled_pieces(batch: Trajectory, size: int, epochs: int, rng: torch.Generator) -> Iterator[Trajectory]:
    """Per epoch: shuffle, then ceil(N/size) near-equal pieces (sizes differ by ≤ 1): no sample dropped.

    The piece count depends only on N, so learner ranks with equal shard lengths make
    equal numbers of optimiser steps.
    """
    pieces = max(1, -(-len(batch) // size))
    for _ in range(epochs):
        perm = torch.randperm(len(batch), generator=rng)
        for idx in torch.tensor_split(perm, pieces):
            yield batch.index(idx)


class Algorithm:
    """Base class; subclasses set `config_cls` and override what they need."""

    config_cls: ClassVar[type]

    def __init__(self, config, sampling, reward=None):
        self.config = config
        self.sampling = sampling
        self.reward = reward  # RewardSection: sync algorithms build differentiable rewards from it

    @property
    def needs(self) -> Needs:
        return Needs()

    def micro_steps_per_update(self, minibatch) -> int:
        """How many `optimizer.backward` calls `train_step` makes on `minibatch` per optimiser step."""
        return 1

    def prepare(self, batch: Trajectory) -> Trajectory:
        return batch

    def build_modules(self, model) -> dict[str, torch.nn.Module]:
        """Extra trainable networks (name -> module) on the learner; each gets its own optimiser group."""
        return {}

    def param_group_options(self, name: str) -> dict:
        """Optimiser options (lr, weight_decay) for the group of module `name`; {} = the learner's."""
        return {}

    def prepare_batch(self, policy, batch):
        """Learner-side, once per received batch (this rank's shard), before its first optimiser step."""
        return batch

    def minibatches(self, batch, rng: torch.Generator) -> Iterator:
        """Default for rollout-based algorithms: `num_inner_epochs` shuffled passes in `train_batch_size` pieces."""
        if isinstance(batch, PromptBatch):
            yield batch
            return
        yield from shuffled_pieces(batch, self.config.train_batch_size, self.config.num_inner_epochs, rng)

    def minibatch_size(self, batch) -> int:
        return min(getattr(self.config, "train_batch_size", len(batch)), len(batch))

    def train_step(self, policy, optimizer, batch: Trajectory, rng) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
