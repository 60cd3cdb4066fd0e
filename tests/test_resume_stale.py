"""Resume at S > 0: batches in flight at the checkpoint are sampled again from the resumed weights, never
mixed with pre-crash ones, and a resume is deterministic (docs/storage.md, "Resume semantics")."""

import shutil

import pytest
from _checkpoints import assert_same_weights, final_weights
from conftest import train_config

from raydiff.config import load_config
from raydiff.engine import checkpoint as ckpt
from raydiff.engine.metrics import read_metrics
from raydiff.engine.trainer import Trainer

EPOCHS = 4
OVERRIDES = ["learner.engine=torch", "train.max_staleness=1", "output.checkpoint_every=1", "sampling.batch_size=4",
             "sampling.num_steps=3", "algorithm.train_batch_size=4", "train.batches_per_epoch=1", "rollout.num_workers=1",
             "output.tensorboard=false", "output.image_grid_every=0", f"train.num_epochs={EPOCHS}"]


class InjectedCrash(RuntimeError):
    pass


@pytest.mark.slow
def test_resume_at_staleness_1_resamples_in_flight_batches_deterministically(ray_cluster, tmp_path):
    crashed = tmp_path / "crashed"
    cfg = load_config("configs/tiny_ddpo.yaml", [f"output.run_dir={crashed}", "output.progress=false", *OVERRIDES])
    trainer = Trainer(cfg)
    train_epoch = trainer.train_epoch

    def crash_at_2(epoch: int):
        if epoch == 2:  # epoch 1 is checkpointed; epoch 2's batch was dispatched during epoch 1 (S = 1): in flight
            assert 2 in trainer.rollouts.pending, "epoch 2's batch should be in flight at the crash"
            raise InjectedCrash("crash with epoch 2's batch in flight")
        return train_epoch(epoch)

    trainer.train_epoch = crash_at_2
    with pytest.raises(InjectedCrash):
        trainer.run()
    before = read_metrics(crashed)
    assert [r["step"] for r in before] == [0, 1] and before[1]["policy/staleness"] == 1  # epoch 1 trained a stale batch
    assert ckpt.latest_checkpoint(crashed).name == ckpt.step_name(1).rsplit("/", 1)[-1]

    # Two resumes from the same checkpoint (copies of the crashed run's storage).
    runs = [tmp_path / "resume_a", tmp_path / "resume_b"]
    for run in runs:
        shutil.copytree(crashed, run)
        train_config("configs/tiny_ddpo.yaml", run, "output.resume=auto", *OVERRIDES)
    rows = read_metrics(runs[0])
    assert [r["step"] for r in rows] == list(range(EPOCHS)) and rows[:2] == before
    # Epoch 2's batch was sampled again from the resumed weights (version 2): staleness 0, not the in-flight
    # batch of version 1; from epoch 3 on the pipeline is S = 1 again.
    assert rows[2]["policy/staleness"] == 0 and rows[3]["policy/staleness"] == 1
    assert [r["policy/version"] for r in rows] == [1, 2, 3, 4]
    timing = {"time"} | {k for r in rows for k in r if k.startswith(("time/", "throughput/"))}
    other = read_metrics(runs[1])
    assert [{k: v for k, v in r.items() if k not in timing} for r in other] == [{k: v for k, v in r.items() if k not in timing} for r in rows]
    assert_same_weights(final_weights(runs[1]), final_weights(runs[0]), "the first resume's (S=1 resume not deterministic)")
