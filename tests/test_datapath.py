"""The data path (engine/datapath.py): rollout tensors go to the learner ranks as per-rank ObjectRefs.

The property that keeps training unchanged: the shard a rank assembles from its pieces and its
metadata slice is, bit for bit and dtype for dtype, the shard the old driver-side path built
(`Trajectory.cat(epoch).shard(r, W).pad_to(longest)`), for any batch sizes and rank counts.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from raydiff.engine.datapath import assemble, payload_bytes, split_trajectory
from raydiff.types import Conditioning, Trajectory


def _trajectory(n: int, seed: int, T: int = 3, dtype=torch.bfloat16) -> Trajectory:
    """A scored batch as a bf16 GPU rollout makes it: big per-step tensors and small per-sample metadata."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    cond = Conditioning(embeds=r(n, 5, 8).to(dtype), neg_embeds=r(n, 5, 8).to(dtype), pooled=r(n, 6).to(dtype))
    return Trajectory(
        prompts=[f"p{seed}-{i}" for i in range(n)], latents=r(n, T + 1, 4, 4, 4).to(dtype), timesteps=torch.arange(T, 0, -1) * 100,
        log_probs=r(n, T), cond=cond, images=np.full((n, 8, 8, 3), seed, np.uint8), version=seed % 3, num_steps=T,
        guidance_scale=3.0, eta=1.0, rewards=r(n).numpy(), reward_components={"a": r(n).numpy()},
        extras={"eps": r(n, T, 4, 4, 4).to(dtype), "step_rewards": r(n, T)}, timings={"sample_s": 1.0},
    )


def _prepare(batch: Trajectory) -> Trajectory:
    """What an algorithm's driver-side prepare does: per-sample values from the metadata."""
    r = torch.as_tensor(np.asarray(batch.rewards, np.float64))
    batch.advantages = ((r - r.mean()) / (r.std() + 1e-6)).float()
    batch.extras["beta"] = torch.full((len(batch),), 0.5)
    return batch


def _assert_same(a: Trajectory, b: Trajectory) -> None:
    for name in ("latents", "log_probs", "timesteps", "advantages", "weights", "staleness", "group_ids"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    for name in ("embeds", "neg_embeds", "pooled"):
        x, y = getattr(a.cond, name), getattr(b.cond, name)
        assert x.dtype == y.dtype and torch.equal(x, y), name
    assert sorted(a.extras) == sorted(b.extras)
    for k in a.extras:
        assert a.extras[k].dtype == b.extras[k].dtype and torch.equal(a.extras[k], b.extras[k]), k
    assert a.prompts == b.prompts and np.array_equal(a.rewards, b.rewards) and a.version == b.version


@pytest.mark.parametrize("sizes,world", [([3, 3, 3], 2), ([4, 4], 2), ([5, 2, 4], 3), ([3, 2], 4), ([2, 2], 1)])
def test_shard_from_pieces_equals_driver_side_shard(sizes, world):
    trajs = [_trajectory(n, seed) for seed, n in enumerate(sizes)]
    for t in trajs[1::2]:  # a staleness-gated batch: per-sample staleness and a damped weight
        t.staleness, t.max_staleness, t.weights = torch.full((len(t),), 2), 2, torch.full((len(t),), 0.25)
    for i, t in enumerate(trajs):
        t.group_ids = torch.arange(len(t)) + 100 * i
    offsets = np.cumsum([0] + sizes[:-1]).tolist()
    parts = [split_trajectory(t, off, world) for t, off in zip(trajs, offsets)]
    meta = _prepare(Trajectory.cat([p[0] for p in parts]))  # the driver prepares metadata only
    old = _prepare(Trajectory.cat(trajs))  # the old path: the whole epoch on the driver
    longest = -(-sum(sizes) // world)
    for r in range(world):
        got = assemble(meta.shard(r, world), [p[2 + r] for p in parts]).pad_to(longest)
        _assert_same(got, old.shard(r, world).pad_to(longest))
        assert got.latents.dtype == torch.bfloat16  # the sampling dtype all the way


def test_empty_and_mask_indices_select_samples():
    """An empty index gives an empty batch (a rank with no samples), a bool mask selects as a mask."""
    t = _trajectory(4, 0)
    empty = t.index([])
    assert len(empty) == 0 and empty.latents.shape[0] == 0 and empty.cond.embeds.shape[0] == 0 and empty.rewards.shape == (0,)
    picked = t.index(torch.tensor([True, False, False, True]))
    assert picked.prompts == [t.prompts[0], t.prompts[3]] and torch.equal(picked.log_probs, t.log_probs[[0, 3]])


def test_metadata_carries_no_trajectory_tensors():
    t = _trajectory(8, 0, T=10)
    meta, images, *pieces = split_trajectory(t, 0, 2)
    assert meta.latents is None and meta.log_probs is None and meta.cond is None and meta.images is None
    assert "eps" not in meta.extras and "step_rewards" in meta.extras  # per-step latent-shaped extras go to the ranks
    assert np.array_equal(images, t.images)
    assert payload_bytes(meta) * 5 < sum(payload_bytes(p) for p in pieces)


def test_final_latents_only_sends_x0():
    t = _trajectory(4, 1)
    meta, _, piece = split_trajectory(t, 0, 1, final_only=True)
    assert torch.equal(piece.latents, t.latents[:, -1:]) and piece.log_probs.shape == (4, 0)
    assert piece.extras == {} and meta.extras == {}


ASYNC = "configs/tiny_ddpo_async.yaml"


def _unfetchable(kind: str):
    """A ref a learner rank cannot fetch: "failed" (the task that should have made it raised: a RayTaskError)
    or "never" (not ready within the fetch timeout: GetTimeoutError). Both are RayErrors, as ObjectLostError and
    OwnerDiedError after a node loss are; those need a multi-node cluster and an object in plasma to provoke."""
    import ray

    @ray.remote(num_cpus=0)
    def produce(kind):
        if kind == "failed":
            raise RuntimeError("the node holding this piece is gone")
        time.sleep(3600)

    return produce.remote(kind)


@pytest.mark.slow
def test_ranks_fetch_their_pieces_train_as_the_old_path_and_survive_a_lost_ref(ray_cluster, tiny_sd, tmp_path):
    """Two DeepSpeed ranks in Ray Train fetch their pieces by ref: the weights after one step equal those
    from the old path (the whole batch on the driver, sharded there) bit for bit; the ranks fetched the
    tensors, the driver only metadata; a ref lost before the ranks fetch it is a TrajectoriesLost naming
    the batch, raised on the driver without a hang, nothing trained, and the ranks go on serving."""
    import ray

    from raydiff.algorithms.registry import make_algorithm
    from raydiff.config import load_config
    from raydiff.engine.datapath import EpochBatch, TrajectoriesLost, fetch_whole
    from raydiff.engine.learners.distributed import GroupLearnerHandle
    from raydiff.engine.rollouts.group import RolloutGroup

    cfg = load_config(ASYNC, [f"model.path={tiny_sd}", f"output.run_dir={tmp_path}", "learner.num_workers=2",
                              "rollout.num_workers=1", "sampling.batch_size=3", "sampling.num_steps=2", "algorithm.train_batch_size=2", "learner.learning_rate=0.05"])
    prepare = lambda batch: make_algorithm(cfg.algorithm, cfg.sampling).prepare(batch)  # noqa: E731 (stateless here)
    rollouts = RolloutGroup(cfg, make_algorithm(cfg.algorithm, cfg.sampling).needs)
    learner = GroupLearnerHandle(cfg, str(tmp_path))
    try:
        rollouts.push_weights(learner.publish())
        rollouts.dispatch(0, [(0, ["a cat", "a dog", "a cow"], 7), (0, ["a fox", "a hen", "a pig"], 8)])
        batches = rollouts.gather(0)  # 6 samples, offsets 0 and 3: rank 0 gets 0, 2 | 4, rank 1 gets 1 | 3, 5
        assert [b.offset for b in batches] == [0, 3] and all(len(b.pieces) == 2 for b in batches)
        learner.save(str(tmp_path / "start"))

        meta = prepare(Trajectory.cat([b.meta for b in batches]))
        metrics = learner.train(EpochBatch(meta, batches, 60.0))
        new = learner.checksums()
        piece_bytes = sum(payload_bytes(p) for b in batches for p in ray.get(b.pieces))
        assert metrics["data/bytes_to_learners"] == piece_bytes
        assert sum(payload_bytes(b.meta) for b in batches) * 3 < piece_bytes  # the driver held metadata only

        learner.load(str(tmp_path / "start"))  # the same step again, on the old path
        whole = Trajectory.cat([fetch_whole(b, 60.0) for b in batches])
        assert whole.latents.dtype == torch.float32 and whole.prompts == meta.prompts  # CPU sampling dtype, order kept
        learner.train(prepare(whole))
        old = learner.checksums()
        assert new == old and new[0] == new[1]

        version = learner.version
        for kind, timeout_s in (("failed", 60.0), ("never", 10.0)):
            batches[1].pieces[0] = _unfetchable(kind)  # rank 0's piece of batch 1 (rank 1's are fine)
            t0 = time.monotonic()
            with pytest.raises(TrajectoriesLost) as info:
                learner.train(EpochBatch(meta, batches, timeout_s))
            assert time.monotonic() - t0 < 60  # bounded by the fetch timeout: no hang
            assert info.value.batches == [1] and learner.version == version and learner.checksums() == old  # nothing trained
            assert isinstance(info.value, ray.exceptions.RayError) and "rollout.max_batch_retries" in str(info.value)
        learner.train(EpochBatch(prepare(Trajectory.cat([batches[0].meta])), batches[:1], 60.0))
        assert learner.version == version + 1 and learner.checksums() != old  # the ranks still serve and train
    finally:
        rollouts.shutdown()
        learner.shutdown()


def _final_checksum(run_dir) -> str:
    from _checkpoints import final_weights

    from raydiff.models.lora import state_checksum

    return state_checksum(final_weights(run_dir))


def test_run_moves_tensors_past_the_driver_and_resamples_a_lost_batch(ray_cluster, tiny_sd, tmp_path):
    """A whole run (S = 0, one learner actor): per epoch the driver fetches metadata (plus 16 images on grid
    epochs) and the learner the tensors (data/ metrics); a batch whose tensors cannot be fetched in epoch 1
    is re-sampled and the epoch trained again: the final weights equal a run without the loss, bit for bit."""
    from raydiff.config import load_config
    from raydiff.engine.metrics import read_metrics
    from raydiff.engine.records import read_experience
    from raydiff.engine.trainer import Trainer

    def run(name: str, lose: bool, record_tensors: bool):
        cfg = load_config(ASYNC, [f"model.path={tiny_sd}", f"output.run_dir={tmp_path / name}", "output.progress=false",
                                  "learner.engine=torch", "learner.num_workers=1", "rollout.num_workers=1", "train.max_staleness=0",
                                  "sampling.batch_size=4", "sampling.num_steps=2", "train.num_epochs=3", "output.checkpoint_every=0",
                                  "output.tensorboard=false", "output.image_grid_every=2", f"output.record_tensors={record_tensors}"])
        trainer = Trainer(cfg)
        if lose:
            start_roles = trainer._start_roles

            def start_and_lose():  # once the roles exist: epoch 1's first batch loses its tensors after gather
                start_roles()
                gather = trainer.rollouts.gather

                def gather_and_lose(epoch):
                    batches = gather(epoch)
                    if epoch == 1:
                        batches[0].pieces[0] = _unfetchable("failed")
                    return batches

                trainer.rollouts.gather = gather_and_lose

            trainer._start_roles = start_and_lose
        trainer.run()
        return read_metrics(tmp_path / name), _final_checksum(tmp_path / name), cfg

    rows, lost_weights, cfg = run("lost", lose=True, record_tensors=False)
    assert [r["step"] for r in rows] == [0, 1, 2] and all(r["data/samples_per_epoch"] == 8 for r in rows)
    assert rows[0]["policy/reissued_batches"] == 0 and rows[1]["policy/reissued_batches"] == 1
    assert rows[-1]["policy/staleness_hist_0"] == 6  # 3 epochs x 2 batches trained: the lost one is not counted twice
    for r in rows:
        assert r["data/bytes_to_learners"] > 0
        if r["step"] == 1:  # no grid: metadata only
            assert r["data/bytes_via_driver"] * 20 < r["data/bytes_to_learners"], r
    assert rows[0]["data/bytes_via_driver"] > rows[1]["data/bytes_via_driver"]  # epoch 0 drew an image grid
    assert read_experience(tmp_path / "lost").num_rows == 24

    clean, clean_weights, _ = run("clean", lose=False, record_tensors=True)
    assert lost_weights == clean_weights  # the re-sampled batch (same seed, same weights) trained the same
    records = read_experience(tmp_path / "clean")
    assert records.num_rows == 24 and all(records.column("latents").to_pylist())  # fetched by the driver for the records
    assert clean[1]["data/bytes_via_driver"] > rows[1]["data/bytes_via_driver"]  # and counted
