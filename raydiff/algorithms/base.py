"""What an algorithm is to the engine: a config, the rollout data it needs, and its update.

The engine never branches on an algorithm's name. It asks the algorithm:
- `needs`: what rollouts must record (e.g. per-step ε̂ for a proximal term),
- `prepare(batch)`: driver-side, stateful processing of scored batches
  (advantages, per-prompt statistics), checkpointed via `state_dict`,
- `train_step(policy, optimizer, batch, rng)`: learner-side update on one
  minibatch; it calls `optimizer.backward(loss)` per micro-step and returns metrics.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from raydiff.types import Trajectory


@dataclass(frozen=True)
class Needs:
    """Declared requirements the engine provisions without knowing the algorithm."""

    mode: str = "async"  # "async": rollouts + learners (DDPO, DAG); "sync": learner samples with gradients
    keep_eps: bool = False  # rollouts store the CFG noise prediction per step (extras['eps'])
    intermediate_rewards: bool = False  # rewards of x̂_0 at every step are requested
    reference_model: bool = False  # a frozen copy of the base model on the learner


class Algorithm:
    """Base class; subclasses set `config_cls` and override what they need."""

    config_cls: ClassVar[type]

    def __init__(self, config, sampling):
        self.config = config
        self.sampling = sampling

    @property
    def needs(self) -> Needs:
        return Needs()

    def micro_steps_per_update(self, batch_size: int, num_steps: int) -> int:
        """How many `optimizer.backward` calls make one optimiser step (gradient accumulation)."""
        return 1

    def prepare(self, batch: Trajectory) -> Trajectory:
        return batch

    def train_step(self, policy, optimizer, batch: Trajectory, rng) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
