"""A training driver for multi-node fault tests: `python tests/_fault_driver.py OUT CONFIG [key=value ...]`.

Joins the cluster in RAY_ADDRESS, trains, and writes under OUT (a folder the test reads):
  roles.json   once the first epoch is logged: the node id of every rollout worker and learner rank,
  result.json  at the end: metrics rows, learner restarts, checkpoints rewound to, final weights' checksum;
  final_weights.pt  at the end: the last checkpoint's learner weights (for tensor-by-tensor comparisons).
The test stops nodes in between (by process group). Once roles.json is out, the next epoch waits until
the test writes OUT/go (after its fault), so a fast machine cannot finish the run before the fault lands.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import ray
import torch

from raydiff.config import load_config
from raydiff.engine import checkpoint as ckpt
from raydiff.engine.metrics import read_metrics
from raydiff.engine.trainer import Trainer
from raydiff.models.lora import state_checksum


def _node(actor) -> str:
    return ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()), timeout=60)


def _watch(trainer: Trainer, out: Path) -> None:
    while not read_metrics(trainer.run_dir):
        time.sleep(0.2)
    status = ray.get(trainer.learner.group.coordinator.status.remote(), timeout=60)
    roles = {"rollout": [_node(a) for a in trainer.rollouts.actors],
             "learner": [status["restored"][r]["node_id"] for r in sorted(status["restored"])],
             "driver": ray.get_runtime_context().get_node_id()}
    (out / "roles.json.tmp").write_text(json.dumps(roles))
    (out / "roles.json.tmp").rename(out / "roles.json")


def _hold_after_roles(trainer: Trainer, out: Path, timeout_s: float = 600) -> None:
    """Epochs after roles.json wait for OUT/go: the fault always lands mid-run, whatever the machine's speed."""
    epoch_fn = trainer.train_epoch

    def held(epoch: int):
        if (out / "roles.json").is_file():
            deadline = time.time() + timeout_s
            while not (out / "go").is_file():
                if time.time() > deadline:
                    raise TimeoutError(f"the test wrote no {out / 'go'} within {timeout_s} s")
                time.sleep(0.2)
        return epoch_fn(epoch)

    trainer.train_epoch = held


def main() -> None:
    out, config, overrides = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    out.mkdir(parents=True, exist_ok=True)
    ray.init()
    trainer = Trainer(load_config(config, overrides))
    threading.Thread(target=_watch, args=(trainer, out), daemon=True).start()
    _hold_after_roles(trainer, out)
    trainer.run()
    weights = ckpt.learner_weights(ckpt.latest_checkpoint(trainer.run_dir))
    result = {"rows": read_metrics(trainer.run_dir), "learner_restarts": trainer.learner_restarts,
              "rewinds": [str(p) for p in trainer.rewinds], "final_checksum": state_checksum(weights),
              "reissued": trainer.rollouts.reissued, "restored_checksums": sorted(map(str, trainer.restored_checksums))}
    torch.save(weights, out / "final_weights.pt")
    (out / "result.json").write_text(json.dumps(result, default=float))


if __name__ == "__main__":
    main()
