"""Learner: runs an algorithm's updates on trajectory batches and publishes weights.

A plain class, hosted as a Ray actor (one worker) or inside Ray Train workers
(data parallel, with a DeepSpeed stepper). It never looks at the algorithm's
name: it shuffles, cuts minibatches and hands them to `algorithm.train_step`.
"""

from __future__ import annotations

import io
import time
from collections import defaultdict

import torch

from raydiff.algorithms.registry import make_algorithm
from raydiff.engine.datapath import ShardRefs, receive
from raydiff.engine.learners.optim import TorchStepper
from raydiff.engine.storage import Scratch, Storage
from raydiff.engine.weight_sync import make_update
from raydiff.models.loader import load_model
from raydiff.models.lora import (
    export_weights,
    load_trainable_state_dict,
    trainable_state_dict,
)
from raydiff.sampling.policy import Policy
from raydiff.types import PromptBatch, Trajectory


class Learner:
    def __init__(self, cfg, rank: int = 0, world_size: int = 1, stepper_factory=None):
        torch.set_num_threads(cfg.learner.torch_threads)
        device = "cuda" if cfg.learner.use_gpu and torch.cuda.is_available() else "cpu"
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        torch.manual_seed(cfg.train.seed)  # identical LoRA init on every rank and in every rollout worker
        self.model = load_model(cfg.model, device)
        self.algorithm = make_algorithm(cfg.algorithm, cfg.sampling, cfg.reward)
        self.policy = Policy(self.model)
        self.modules = {k: m.to(self.model.device) for k, m in self.algorithm.build_modules(self.model).items()}
        groups = [{"name": "policy", "params": self.model.trainable_parameters()}] + [
            {"name": k, "params": [p for p in m.parameters() if p.requires_grad], **self.algorithm.param_group_options(k)}
            for k, m in self.modules.items()
        ]
        factory = stepper_factory or (lambda groups, cfg_l, acc: TorchStepper(groups, cfg_l, acc))
        self.stepper = factory(groups, cfg.learner, 1)
        if rank:  # after the identical init: each rank its own dropout masks / training noise (rank 0's stream unchanged)
            torch.manual_seed(cfg.train.seed * 1000003 + rank)
        self.version = 0
        self.rng = torch.Generator().manual_seed(cfg.train.seed * 1009 + rank)

    def ready(self) -> int:
        return self.rank

    def rng_state(self) -> dict:
        """Every random stream a train step draws from: the minibatch/timestep generator and torch's
        global generators (LoRA dropout). A checkpoint without the global ones resumes with other
        dropout masks than the uninterrupted run (S = 0 would not be bit-exact)."""
        state = {"learner": self.rng.get_state(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def set_rng_state(self, state) -> None:
        """Restore `rng_state()` (a bare tensor: a checkpoint from before it held the global streams)."""
        if isinstance(state, torch.Tensor):
            self.rng.set_state(state)
            return
        self.rng.set_state(state["learner"])
        torch.set_rng_state(state["torch"])
        for device, cuda_state in enumerate(state.get("cuda", [])[:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)

    def train(self, batch: Trajectory | PromptBatch) -> dict:
        """One update round on `batch` (this worker's shard), as the algorithm cuts it; bumps the policy version once.

        Metric values are averaged over minibatches; an `images` entry (uint8 samples a
        sync algorithm made) is passed through for the driver's image grid.
        """
        t0 = time.perf_counter()
        received = {}
        if isinstance(batch, ShardRefs):  # the data path: fetch this rank's pieces itself (engine/datapath.py)
            batch, received = receive(batch, self.world_size)
            if batch is None:  # pieces lost on some rank: no rank trains, the driver re-samples them
                return received
            received["time/learner_fetch_s"] = time.perf_counter() - t0
        sums: dict[str, float] = defaultdict(float)
        extra: dict = {}
        maxes: dict[str, float] = {}
        count = 0
        self.model.denoiser.train()
        t_prep = time.perf_counter()
        batch = self.algorithm.prepare_batch(self.policy, batch)  # once, before the first optimiser step on it
        t_prep = time.perf_counter() - t_prep
        for minibatch in self.algorithm.minibatches(batch, self.rng):
            self.stepper.set_accumulation(self.algorithm.micro_steps_per_update(minibatch))
            metrics = self.algorithm.train_step(self.policy, self.stepper, minibatch, self.rng)
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    if k.endswith("max_dev"):  # worst case over minibatches, not their mean
                        maxes[k] = max(maxes.get(k, v), v)
                    else:
                        sums[k] += v
                else:
                    extra[k] = v
            count += 1
        self.model.denoiser.eval()
        self.version += 1
        # Bare names go under train/; names an algorithm already namespaced (reward/mean, grad/norm) stay as they are.
        out = {(k if "/" in k else f"train/{k}"): v / max(count, 1) for k, v in sums.items()}
        out.update({(k if "/" in k else f"train/{k}"): v for k, v in maxes.items()})
        out.update({"train/grad_norm": self.stepper.last_grad_norm, "train/optimizer_steps": self.stepper.global_step,
                    "time/learner_step_s": time.perf_counter() - t0, "time/learner_prepare_s": t_prep})
        out.update({f"train/grad_norm_{k}": v for k, v in self.stepper.group_grad_norms.items() if k != "policy"})
        out.update(extra)
        out.update(received)
        return out

    def publish(self) -> dict:
        """{version, state, checksum} of the trainable weights, for rollout workers."""
        return make_update(self.version, trainable_state_dict(self.model.denoiser))

    def save(self, directory: str) -> dict:
        """Write learner.pt and the diffusers export to node-local scratch, then upload them to
        `directory` (a path or storage URI); returns the uploaded files for the checkpoint manifest."""
        with Scratch("raydiff-learner-") as d:
            torch.save({
                "weights": trainable_state_dict(self.model.denoiser),
                "modules": {k: m.state_dict() for k, m in self.modules.items()},
                "stepper": self.stepper.state_dict(),
                "version": self.version,
                "rng": self.rng_state(),
            }, d / "learner.pt")
            export_weights(self.model, d / "export")
            return Storage(directory).upload_dir(d, "")

    def load(self, directory: str) -> None:
        state = torch.load(io.BytesIO(Storage(directory).read_bytes("learner.pt")), weights_only=False)
        load_trainable_state_dict(self.model.denoiser, state["weights"])
        for k, m in self.modules.items():
            m.load_state_dict(state["modules"][k], strict=False)
        if "stepper" in state:  # absent in DeepSpeed checkpoints (optimiser state under deepspeed/)
            self.stepper.load_state_dict(state["stepper"])
        self.version = state["version"]
        self.set_rng_state(state["rng"])
