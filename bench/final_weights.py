"""Final-weight checksum of a small fixed async DDPO run: compare it across code changes that must not change training.

    python bench/final_weights.py OUT_DIR deepspeed   # 2 DeepSpeed ranks (odd epoch batch: padding)
    python bench/final_weights.py OUT_DIR torch       # one plain-AdamW learner actor

3 epochs, S = 0, 2 rollout workers with batches of 3, 2 steps, CPU. Prints `CHECKSUM <engine> <sha256>` of
the last checkpoint's trainable weights. Measured on the data-path change (per-rank ObjectRefs, issue #14
point 5), same before and after: deepspeed 3e9030bf2f4c…, torch 306af82032ca…
"""

from __future__ import annotations

import sys

import ray

from raydiff.config import load_config
from raydiff.engine import checkpoint as ckpt
from raydiff.engine.trainer import Trainer
from raydiff.models.lora import state_checksum


def main(out: str, engine: str) -> None:
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    world = 2 if engine == "deepspeed" else 1
    cfg = load_config("configs/tiny_ddpo.yaml", [
        f"output.run_dir={out}", "output.progress=false", f"learner.engine={engine}", f"learner.num_workers={world}",
        "rollout.num_workers=2", "sampling.batch_size=3", "sampling.num_steps=2", "train.batches_per_epoch=1", "train.num_epochs=3",
        "algorithm.train_batch_size=2", "output.tensorboard=false", "output.image_grid_every=0", "output.checkpoint_every=0"])
    Trainer(cfg).run()
    weights = ckpt.learner_weights(ckpt.latest_checkpoint(out))
    print("CHECKSUM", engine, state_checksum(weights))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
