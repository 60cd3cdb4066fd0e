"""Groups stay whole on a real local Ray cluster: a rollout actor is killed mid-run, then the run resumes."""

import pytest
import ray

from raydiff.config import load_config
from raydiff.engine.metrics import read_metrics
from raydiff.engine.records import read_experience
from raydiff.engine.rollouts.group import RolloutGroup
from raydiff.engine.trainer import Trainer

# 2 workers × batch 4 × 3 batches = 24 images = 4 groups of 6: every group spans two batches on two workers.
OVERRIDES = ["output.progress=false", "learner.engine=torch", "sampling.batch_size=4", "sampling.num_steps=3",
             "algorithm.group_size=6", "algorithm.train_batch_size=12", "train.batches_per_epoch=3", "train.max_staleness=1",
             "output.image_grid_every=0"]


def _kill_rollout_when_epoch_dispatched(monkeypatch, epoch: int, killed: list) -> None:
    """Kill rollout worker 0 (Ray restarts it) right after `epoch`'s batches are queued on it: the kill always
    lands on batches in flight, however fast the machine (a watcher thread polling metrics could miss them)."""
    dispatch = RolloutGroup.dispatch

    def dispatch_then_kill(group, at: int, requests):
        dispatch(group, at, requests)
        if at == epoch and not killed:
            ray.kill(group.actors[0], no_restart=False)
            killed.append(at)

    monkeypatch.setattr(RolloutGroup, "dispatch", dispatch_then_kill)


@pytest.mark.slow
def test_groups_survive_actor_kill_and_resume(ray_cluster, tmp_path, monkeypatch):
    cfg = load_config("configs/tiny_flow_grpo.yaml", [f"output.run_dir={tmp_path}", "train.num_epochs=3", *OVERRIDES])
    killed = []
    _kill_rollout_when_epoch_dispatched(monkeypatch, 2, killed)
    Trainer(cfg).run()
    monkeypatch.undo()
    assert killed, "run ended before a rollout actor could be killed"
    first = read_metrics(tmp_path)
    assert first[-1]["policy/reissued_batches"] >= 1

    resumed = load_config("configs/tiny_flow_grpo.yaml", [f"output.run_dir={tmp_path}", "train.num_epochs=5", "output.resume=auto", *OVERRIDES])
    trainer = Trainer(resumed)
    trainer.run()
    rows = read_experience(tmp_path).to_pandas()
    assert sorted(rows.step.unique()) == [0, 1, 2, 3, 4]
    for step, part in rows.groupby("step"):
        plan = trainer.epoch_plan(int(step))  # a pure function of (seed, epoch): what was dispatched, re-issued and resumed
        planned = {int(g): p for ids, (_, ps, _) in zip(plan.group_ids, plan.requests) for g, p in zip(ids, ps)}
        assert len(part) == 24
        for g, members in part.groupby("group"):
            assert len(members) == 6 and set(members.prompt) == {planned[int(g)]}, (step, g, members.prompt.tolist())
        assert part.groupby("group").advantage.sum().abs().max() < 1e-3  # group-relative: each group centred
    assert max(r["policy/staleness"] for r in read_metrics(tmp_path)) >= 1
