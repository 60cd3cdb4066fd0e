"""RolloutWorker: samples scored trajectories with the current policy version.

A plain class; the engine makes it a restartable Ray actor. It holds its own
copy of the model and swaps in new trainable weights between batches, only
after verifying version order and checksum.
"""

from __future__ import annotations

import logging
import time

import torch

from raydiff.models.loader import load_model
from raydiff.models.lora import load_trainable_state_dict, state_checksum, trainable_state_dict
from raydiff.sampling.conditioning import encode_prompts
from raydiff.sampling.sampler import decode_images, sample
from raydiff.types import Trajectory

log = logging.getLogger("raydiff.rollout")


class WeightUpdateRejected(RuntimeError):
    pass


def build_reward_fn(reward_cfg):
    """The reward mix from config: in-process rewards, or Serve handles (backend=serve)."""
    if reward_cfg.backend == "serve":
        from raydiff.rewards.client import HandleRewards

        return HandleRewards(reward_cfg.serve_app, [(c.name, c.weight) for c in reward_cfg.components])
    from raydiff.rewards.base import WeightedRewards, make_reward

    return WeightedRewards([(make_reward(c.registry_name, **c.args), c.weight) for c in reward_cfg.components])


class RolloutWorker:
    def __init__(self, cfg, rank: int = 0, needs=None):
        from raydiff.algorithms.base import Needs

        needs = needs or Needs()
        torch.set_num_threads(cfg.rollout.torch_threads)
        device = "cuda" if cfg.rollout.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        self.cfg, self.rank, self.needs = cfg, rank, needs
        torch.manual_seed(cfg.train.seed)  # same LoRA init as the learner
        self.model = load_model(cfg.model, device)
        self.model.unet.eval()
        self.rewards = build_reward_fn(cfg.reward)
        self.version = 0
        self.checksum = state_checksum(trainable_state_dict(self.model.unet))

    def ready(self) -> int:
        return self.rank

    def set_weights(self, update: dict) -> bool:
        """Load {version, state, checksum} if it is newer and intact; otherwise log and keep the current weights."""
        version, state, checksum = update["version"], update["state"], update["checksum"]
        if version <= self.version and self.version > 0:
            log.error("rollout %d: rejected weight update v%d (have v%d): out of order", self.rank, version, self.version)
            return False
        actual = state_checksum(state)
        if actual != checksum:
            log.error("rollout %d: rejected weight update v%d: checksum mismatch (%s != %s)", self.rank, version, actual[:12], checksum[:12])
            return False
        load_trainable_state_dict(self.model.unet, state)
        self.version, self.checksum = version, checksum
        return True

    def weights_checksum(self) -> tuple[int, str]:
        return self.version, state_checksum(trainable_state_dict(self.model.unet))

    def generate(self, prompts: list[str], seed: int) -> Trajectory:
        """Sample and score one batch for `prompts` with noise seeded by `seed`."""
        s = self.cfg.sampling
        t0 = time.perf_counter()
        gen = torch.Generator(device=self.model.device).manual_seed(seed)
        cond = encode_prompts(self.model, prompts, s.negative_prompt)
        traj = sample(self.model, cond, prompts, s.num_steps, s.guidance_scale, s.eta, gen, self.version,
                      keep_eps=self.needs.keep_eps, keep_x0=self.needs.intermediate_rewards,
                      keep_noise=self.needs.keep_noise,
                      x0_guidance=self.needs.intermediate_rewards_guidance)
        t1 = time.perf_counter()
        total, parts = self.rewards(traj.images, prompts)
        traj.rewards, traj.reward_components = total, parts
        calls = 1
        if self.needs.intermediate_rewards:
            traj.extras["step_rewards"] = self.intermediate_rewards(traj)
            calls += 1
        traj.timings = {"sample_s": t1 - t0, "reward_s": time.perf_counter() - t1, "reward_calls": calls}
        return traj

    def intermediate_rewards(self, traj: Trajectory) -> torch.Tensor:
        """Rewards of decode(x̂_0) at every step, (N, T), scored in ONE batched reward call."""
        x0 = traj.extras.pop("x0_pred")  # (N, T, C, h, w); not shipped to the learner
        n, T = x0.shape[:2]
        images = decode_images(self.model, x0.flatten(0, 1).to(self.model.device, self.model.dtype))
        total, _ = self.rewards(images, [p for p in traj.prompts for _ in range(T)])
        return torch.as_tensor(total, dtype=torch.float32).view(n, T)
