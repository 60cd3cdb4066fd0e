"""RolloutWorker: samples scored trajectories with the current policy version.

A plain class; the engine makes it a restartable Ray actor. It holds its own
copy of the model and swaps in new trainable weights between batches, only
after verifying version order and checksum.

A batch is two calls, so scoring never idles the GPU: `start(prompts, seed)` samples,
decodes (at most `decode_chunk` latents per VAE call) and sends the images to scoring,
returning a key; `finish(key)` waits for the scores. The group issues `start` of batch
i+1 before `finish` of batch i (rollout.overlap_scoring), and actor tasks run in
submission order, so weight updates still land exactly between samplings.
`generate` = `finish(start(...))`, the serial form.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from raydiff.engine.cluster.plan import runtime_decode_chunk
from raydiff.engine.datapath import split_trajectory
from raydiff.engine.rollouts.scoring import ScoringJob, scoring_pool
from raydiff.engine.weight_sync import verdict
from raydiff.models.loader import load_model
from raydiff.models.lora import state_checksum
from raydiff.models.lora_fuse import RolloutWeights
from raydiff.sampling.conditioning import encode_prompts
from raydiff.sampling.flow_sampler import draw_window
from raydiff.sampling.sampler import decode_images, sample
from raydiff.types import Trajectory

log = logging.getLogger("raydiff.rollout")


class BatchLost(RuntimeError):
    """`finish` for a batch this worker does not hold (it restarted after `start`): sample it again."""


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
        self.model.denoiser.eval()
        self.weights = RolloutWeights(self.model.denoiser, fuse=cfg.rollout.fuse_lora)  # LoRA merged once per version
        self.rewards = build_reward_fn(cfg.reward)
        self.version = 0
        self.checksum = self._own_checksum()
        self.decode_chunk = runtime_decode_chunk(self.model, cfg.rollout.decode_chunk)
        self._pool = scoring_pool(cfg.rollout.max_scoring_in_flight)
        self._pending: dict[int, tuple] = {}
        self._next_key = 0

    def ready(self) -> int:
        return self.rank

    def set_weights(self, update: dict, rewind: bool = False) -> bool:
        """Load {version, state, checksum} if it is newer (or `rewind`: the learner restarted from a
        checkpoint) and intact; True if held already; otherwise log and keep the current weights."""
        why = verdict(update, self.version, self.checksum, rewind)
        if why == "held":
            return True
        if why is not None:
            log.error("rollout %d: rejected weight update: %s", self.rank, why)
            return False
        self.weights.load(update["state"])
        self.version, self.checksum = update["version"], update["checksum"]
        return True

    def _own_checksum(self) -> str:
        """Checksum of the trainable weights as held (CPU fp32: hashed in place, no copy)."""
        return state_checksum({n: p.detach() for n, p in self.model.denoiser.named_parameters() if p.requires_grad})

    def weights_checksum(self) -> tuple[int, str]:
        return self.version, self._own_checksum()

    def start(self, prompts: list[str], seed: int) -> int:
        """Sample one batch for `prompts` (noise seeded by `seed`), send its images to scoring; returns the key for `finish`."""
        s = self.cfg.sampling
        t0 = time.perf_counter()
        gen = torch.Generator(device=self.model.device).manual_seed(seed)
        cond = encode_prompts(self.model, prompts, s.negative_prompt)
        window = draw_window(s.num_steps, s.sde_window_size, s.sde_window_max_start, torch.Generator().manual_seed(seed))
        traj = sample(self.model, cond, prompts, s.num_steps, s.guidance_scale, s.eta, gen, self.version,
                      keep_eps=self.needs.keep_eps, keep_x0=self.needs.intermediate_rewards,
                      keep_noise=self.needs.keep_noise,
                      x0_guidance=self.needs.intermediate_rewards_guidance, decode_chunk=self.decode_chunk,
                      noise_level=s.noise_level, sde_window=window)
        jobs = [ScoringJob(self._pool, self.rewards, traj.images, prompts)]
        if self.needs.intermediate_rewards:
            jobs += self._intermediate_jobs(traj)
        key, self._next_key = self._next_key, self._next_key + 1
        self._pending[key] = (traj, jobs, time.perf_counter() - t0)
        return key

    def _intermediate_jobs(self, traj: Trajectory) -> list[ScoringJob]:
        """decode(x̂_0) at every step, `decode_chunk` latents per VAE call, each chunk scored as soon as it is decoded.

        Never N×T latents through the VAE at once (dag_sdxl: 4×50 at 1024px would need ~300 GiB).
        """
        x0 = traj.extras.pop("x0_pred")  # (N, T, C, h, w); not shipped to the learner
        flat = x0.flatten(0, 1)
        prompts = [p for p in traj.prompts for _ in range(x0.shape[1])]
        jobs = []
        for i in range(0, len(flat), self.decode_chunk):
            images = decode_images(self.model, flat[i:i + self.decode_chunk].to(self.model.device, self.model.dtype))
            jobs.append(ScoringJob(self._pool, self.rewards, images, prompts[i:i + self.decode_chunk]))
        return jobs

    def finish(self, key: int) -> Trajectory:
        """Wait for the scores of batch `key` (re-sending failed requests, never re-sampling); the scored trajectory."""
        if key not in self._pending:
            raise BatchLost(f"rollout {self.rank}: batch {key} is not held here (worker restarted after sampling it)")
        traj, jobs, sample_s = self._pending.pop(key)
        t0 = time.perf_counter()
        results = [job.result() for job in jobs]
        wait = time.perf_counter() - t0
        (total, parts), rest = results[0], results[1:]
        traj.rewards, traj.reward_components = total, parts
        if self.needs.intermediate_rewards:
            n, T = len(traj), traj.num_steps
            traj.extras["step_rewards"] = torch.as_tensor(np.concatenate([r[0] for r in rest]), dtype=torch.float32).view(n, T)
        traj.timings = {"sample_s": sample_s, "reward_s": max(j.done_at for j in jobs) - jobs[0].submitted_at,
                        "reward_wait_s": wait, "reward_calls": len(jobs), "rollout_batches": 1,
                        "reward_resends": sum(j.attempts - 1 for j in jobs)}
        return traj

    def finish_parts(self, key: int, offset: int, world: int) -> tuple:
        """`finish`, split for the data path (engine/datapath.py): (metadata, images, one tensor piece per
        learner rank); the caller asks for num_returns = 2 + world, so it owns every part."""
        return split_trajectory(self.finish(key), offset, world, self.needs.final_latents_only)

    def generate_parts(self, prompts: list[str], seed: int, offset: int, world: int) -> tuple:
        """`generate`, split as `finish_parts` (a re-issued or re-sampled batch)."""
        return self.finish_parts(self.start(prompts, seed), offset, world)

    def generate(self, prompts: list[str], seed: int) -> Trajectory:
        """Sample and score one batch, waiting for its scores (serial: no overlap)."""
        return self.finish(self.start(prompts, seed))

    def pending(self) -> int:
        """Batches sampled and not yet finished (bounded by the group's in-flight limit)."""
        return len(self._pending)
