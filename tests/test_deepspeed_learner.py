"""DeepSpeed ZeRO-2/3 learners inside Ray Train (CPU: 2 workers, gloo, fp32, tiny LoRA'd UNet).

One TorchTrainer run per ZeRO stage serves every check as a task batch:
rank agreement after a step on different data, accumulation, the gathered
ZeRO-3 state, checkpoint save/load, and (ZeRO-2) restart from the latest
checkpoint after a worker dies.
"""

from __future__ import annotations

import functools
import os
import sys

import pytest
import torch

from raydiff.config import LearnerSection, ModelSection
from raydiff.engine.learners.deepspeed_stepper import DeepSpeedStepper, deepspeed_config

# Ray workers cannot import pytest's test modules by name: ship this module's classes by value.
import ray.cloudpickle  # noqa: E402

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class TinyLearner:
    """Test worker: a tiny LoRA UNet on a DeepSpeedStepper; tasks are small dicts."""

    def __init__(self, rank: int, world_size: int, model_path: str, stage: int, crash_marker: str = ""):
        from raydiff.models.loader import load_model

        self.rank, self.crash_marker = rank, crash_marker
        torch.manual_seed(100 + rank)  # different LoRA init per rank: DeepSpeed must broadcast rank 0's
        self.unet = load_model(ModelSection(path=model_path)).unet
        # Threshold 0: ZeRO-3 partitions even these tiny params (default keeps < 1e5-element params whole).
        overrides = {"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else {}
        cfg = LearnerSection(zero_stage=stage, learning_rate=1e-2, weight_decay=0.0, deepspeed=overrides)
        params = [p for p in self.unet.parameters() if p.requires_grad]
        self.stepper = DeepSpeedStepper(self.unet, params, cfg, accumulation_steps=1)

    def _checksum(self) -> str:
        from raydiff.models.lora import state_checksum

        return state_checksum(self.stepper.gathered_trainable_state())

    def checksum(self) -> str:  # LearnerGroup compares it across ranks before the first task
        return self._checksum()

    def run_task(self, task: dict):
        op = task["op"]
        if op == "step":  # one micro-step on data that differs per rank (seed from the driver)
            g = torch.Generator().manual_seed(task["seed"])
            x, emb = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 16, 32, generator=g)
            loss = (self.unet(x, torch.tensor([10, 500]), emb).sample - 1.0).pow(2).mean()
            stepped = self.stepper.backward(loss)
            return {"stepped": stepped, "checksum": self._checksum(), "global_step": self.stepper.global_step}
        if op == "set_accumulation":
            self.stepper.set_accumulation(task["n"])
            return None
        if op == "state":
            return self._state_report()
        if op == "load":
            self.load(task["dir"])
            return {"checksum": self._checksum(), "global_step": self.stepper.global_step}
        if op == "crash_once":  # kills this worker process the first time only (marker file)
            if self.rank == 1 and not os.path.exists(self.crash_marker):
                open(self.crash_marker, "w").close()
                os._exit(1)
            return {"checksum": self._checksum(), "global_step": self.stepper.global_step}
        raise ValueError(op)

    def _state_report(self) -> dict:
        from deepspeed.utils import safe_get_full_fp32_param

        from raydiff.models.lora import state_checksum

        state = self.stepper.gathered_trainable_state()
        named = dict(self.unet.named_parameters())
        # Independent path to the full weights: DeepSpeed's fp32 master copy in the optimizer.
        master = {n: safe_get_full_fp32_param(named[n]).detach().cpu() for n in state}
        return {
            "checksum": state_checksum(state),
            "shapes": {n: tuple(t.shape) for n, t in state.items()},
            "equals_master": all(torch.equal(state[n], master[n]) for n in state),
            "local_numel": sum(named[n].numel() for n in state),  # 0 under ZeRO-3: really partitioned
            "full_numel": sum(t.numel() for t in state.values()),
        }

    def save(self, d: str) -> None:
        self.stepper.save_checkpoint(d, "ds")

    def load(self, d: str) -> None:
        self.stepper.load_checkpoint(d, "ds")


class TwoNetLearner:
    """Two linear "networks" in two optimiser groups (policy, flow) on one DeepSpeedStepper.

    loss = w_policy·x + w_flow·(s·x): each group's averaged grad is known in closed form.
    """

    def __init__(self, rank: int, world_size: int, stage: int):
        torch.manual_seed(0)
        self.net = torch.nn.ModuleDict({"policy": torch.nn.Linear(64, 1, bias=False), "flow": torch.nn.Linear(64, 1, bias=False)})
        cfg = LearnerSection(zero_stage=stage, learning_rate=1e-2, weight_decay=0.1, max_grad_norm=1.0,
                             deepspeed={"zero_optimization": {"stage3_param_persistence_threshold": 0}} if stage == 3 else {})
        groups = [{"name": k, "params": list(m.parameters())} for k, m in self.net.items()]
        self.stepper = DeepSpeedStepper(self.net, groups, cfg, accumulation_steps=1)

    def run_task(self, task: dict):
        from raydiff.engine.learners.deepspeed_stepper import _inner_torch_optimizer

        x = torch.as_tensor(task["x"])
        loss = (self.net["policy"](x) + self.net["flow"](task["scale"] * x)).sum()
        self.stepper.backward(loss, groups=task.get("groups"))
        out = {"norms": dict(self.stepper.group_grad_norms), "last": self.stepper.last_grad_norm}
        zero, inner = self.stepper.optimizer, _inner_torch_optimizer(self.stepper.optimizer)
        flats = getattr(zero, "single_partition_of_fp32_groups", None) or zero.fp32_partitioned_groups_flat
        for i, k in enumerate(self.net):  # this rank's partition of each group: master weights and Adam state
            state = inner.state[flats[i]]
            out[k] = {"weight": flats[i].detach().clone(), "step": float(state["step"]),
                      "exp_avg": state["exp_avg"].clone(), "exp_avg_sq": state["exp_avg_sq"].clone()}
        return out


@pytest.mark.parametrize("stage", [2, 3])
def test_per_group_clipping_and_idle_group_untouched(ray_cluster, tmp_path, stage):
    """Each group is clipped by its own norm (DeepSpeed's is one global norm); a step of one group leaves
    the other's weights and Adam moments bit-identical; no NaN norm."""
    from raydiff.engine.learners.group import LearnerGroup

    group = LearnerGroup(functools.partial(TwoNetLearner, stage=stage), LearnerSection(num_workers=2, num_cpus=1),
                         storage_path=str(tmp_path), name=f"twonet{stage}", max_failures=0).start()
    try:
        xs = [torch.randn(1, 64, generator=torch.Generator().manual_seed(r)) * 0.05 for r in range(2)]
        g = (xs[0] + xs[1])[0] / 2  # the rank-averaged grad of w_policy; w_flow's is 40·g
        a = group.run([{"x": xs[r], "scale": 40.0} for r in range(2)])
        norm = float(g.norm())
        assert norm < 1.0 < 40 * norm  # policy is under max_grad_norm = 1, flow over it
        for r in a:
            assert r["norms"]["policy"] == pytest.approx(norm, rel=1e-4)
            assert r["norms"]["flow"] == pytest.approx(40 * norm, rel=1e-4)
            assert r["last"] == pytest.approx(norm, rel=1e-4)
        full = {k: torch.cat([r[k]["exp_avg"].reshape(-1) for r in a])[:64] for k in ("policy", "flow")}  # rank partitions in order
        torch.testing.assert_close(full["policy"], 0.1 * g, rtol=1e-4, atol=1e-8)  # under max norm: not clipped
        torch.testing.assert_close(full["flow"], 0.1 * 40 * g / (40 * norm + 1e-6), rtol=1e-4, atol=1e-8)  # clipped to norm 1
        b = group.run([{"x": xs[r], "scale": 40.0, "groups": ["flow"]} for r in range(2)])
        for before, after in zip(a, b):
            for key in ("exp_avg", "exp_avg_sq", "weight", "step"):
                assert torch.equal(torch.as_tensor(after["policy"][key]), torch.as_tensor(before["policy"][key])), key  # idle: untouched
            assert after["flow"]["step"] == before["flow"]["step"] + 1
            assert not torch.equal(after["flow"]["weight"], before["flow"]["weight"]) or after["flow"]["weight"].abs().sum() == 0
            assert all(v == v for v in after["norms"].values())  # no NaN
    finally:
        group.shutdown()


def test_deepspeed_config_merges_overrides():
    cfg = LearnerSection(zero_stage=3, max_grad_norm=0.5, deepspeed={"zero_optimization": {"overlap_comm": True}, "bf16": {"enabled": False}})
    ds = deepspeed_config(cfg, accumulation_steps=4, use_gpu=True)
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 0.0  # per-group clipping is ours
    with pytest.raises(ValueError, match="learner.max_grad_norm"):
        deepspeed_config(LearnerSection(deepspeed={"gradient_clipping": 1.0}), 1, use_gpu=False)
    assert ds["bf16"] == {"enabled": False}  # override wins over use_gpu's bf16
    assert ds["optimizer"]["params"]["lr"] == cfg.learning_rate and ds["optimizer"]["params"]["torch_adam"]
    assert deepspeed_config(LearnerSection(), 1, use_gpu=False)["bf16"] == {"enabled": False}


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_learner_in_ray_train(ray_cluster, tiny_sd, tmp_path, stage):
    from raydiff.engine.learners.group import LearnerGroup, LearnerRestarted
    from raydiff.models.loader import load_model
    from raydiff.models.lora import trainable_state_dict

    marker = str(tmp_path / "crashed")
    group = LearnerGroup(
        functools.partial(TinyLearner, model_path=tiny_sd, stage=stage, crash_marker=marker),
        LearnerSection(num_workers=2, num_cpus=1), storage_path=str(tmp_path / "learner"),
        name=f"zero{stage}", max_failures=1 if stage == 2 else 0,
    ).start()
    try:
        s0 = group.run([{"op": "state"}] * 2)
        assert s0[0]["checksum"] == s0[1]["checksum"], "rank 0's initial weights were not broadcast"

        # (a) one step with different data per rank: identical weights after, and they moved.
        a = group.run([{"op": "step", "seed": r} for r in range(2)])
        assert all(x["stepped"] and x["global_step"] == 1 for x in a)
        assert a[0]["checksum"] == a[1]["checksum"] != s0[0]["checksum"]

        # (b) accumulation 3: no change after backward 1 and 2; the 3rd steps, ranks agree.
        group.run([{"op": "set_accumulation", "n": 3}] * 2)
        prev = a[0]["checksum"]
        for i in range(3):
            b = group.run([{"op": "step", "seed": 10 + 2 * i + r} for r in range(2)])
            assert [x["stepped"] for x in b] == [i == 2] * 2
            assert b[0]["checksum"] == b[1]["checksum"]
            assert (b[0]["checksum"] == prev) == (i < 2)
            assert b[0]["global_step"] == (1 if i < 2 else 2)

        # (c) gathered state: full weights (== fp32 master), names/shapes of trainable_state_dict.
        c = group.run([{"op": "state"}] * 2)
        ref = {n: tuple(t.shape) for n, t in trainable_state_dict(load_model(ModelSection(path=tiny_sd)).unet).items()}
        for x in c:
            assert x["shapes"] == ref and x["equals_master"] and x["checksum"] == b[0]["checksum"]
            assert x["full_numel"] == sum(torch.Size(s).numel() for s in ref.values())
            assert (x["local_numel"] == 0) == (stage == 3)

        # (d) checkpoint (both ranks' shards merged by Ray Train), step on, load: bit-identical.
        path = group.checkpoint("ckpt_000002")
        files = os.listdir(os.path.join(path, "ds"))
        assert any("zero_pp_rank_1" in f for f in files) and any("zero_pp_rank_0" in f for f in files), files
        group.run([{"op": "set_accumulation", "n": 1}] * 2)
        moved = group.run([{"op": "step", "seed": 50 + r} for r in range(2)])
        assert moved[0]["checksum"] != c[0]["checksum"] and moved[0]["global_step"] == 3
        d = group.run([{"op": "load", "dir": path}] * 2)
        assert [x["checksum"] for x in d] == [c[0]["checksum"]] * 2 and d[0]["global_step"] == 2

        if stage == 2:
            # Fault tolerance: rank 1 dies mid-batch; Ray Train restarts both workers,
            # they restore the latest checkpoint and re-run the pending batch.
            group.run([{"op": "set_accumulation", "n": 1}] * 2)  # load restored the saved 3
            moved = group.run([{"op": "step", "seed": 60 + r} for r in range(2)])
            assert moved[0]["checksum"] != c[0]["checksum"]
            # The batch in flight is dropped, not re-run on rolled-back weights: the driver hears of the
            # restart (LearnerRestarted) and what the ranks restored, which they agreed on by checksum.
            with pytest.raises(LearnerRestarted) as info:
                group.run([{"op": "crash_once"}] * 2)
            assert os.path.exists(marker)
            import ray as _r
            open("/tmp/faults_diag.txt", "w").write(repr((info.value.generation, info.value.restored, s0[0]["checksum"], c[0]["checksum"], moved[0]["checksum"], _r.get(group.coordinator.status.remote()))))
            assert {v["checksum"] for v in info.value.restored.values()} == {c[0]["checksum"]}, (
                info.value.restored, s0[0]["checksum"], c[0]["checksum"], moved[0]["checksum"])
            assert all(v["restored"].endswith("ckpt_000002") for v in info.value.restored.values())
            e = group.run([{"op": "load", "dir": path}] * 2)  # serves tasks again, on the restored weights
            assert [x["checksum"] for x in e] == [c[0]["checksum"]] * 2 and e[0]["global_step"] == 2
    finally:
        group.shutdown()


def test_restart_voids_every_pre_restart_result(ray_cluster):
    """After a group restart, a slow rank's pre-restart result never completes a batch with a fast rank's
    post-restart one (the race that made rank 0 report rolled-forward weights under load): the batch in
    flight is dropped, the driver is told, and a stale result never overwrites a fresh one."""
    import ray

    from raydiff.engine.learners.group import Coordinator

    c = Coordinator.remote(2)
    try:
        ray.get([c.register.remote(0, "old0"), c.register.remote(1, "old1")])
        seq = ray.get(c.put_task.remote(["t", "t"]))
        ray.get(c.put_result.remote(0, seq, "stale", "old0"))  # rank 0 finished before rank 1 died
        ray.get(c.register.remote(1, "new1", {"restored": "ck"}))  # restart: the fast new rank 1 is back first
        ray.get(c.put_result.remote(1, seq, "fresh1", "new1"))
        assert ray.get(c.get_results.remote(seq, 0.5)) == ("aborted", 1, None)  # dropped, never completed
        assert ray.get(c.get_task.remote(0, -1, 0.2)) is None  # nothing re-run on restored weights
        assert not ray.get(c.status.remote())["ready"]  # rank 0 of the new generation is not back yet
        ray.get(c.register.remote(0, "new0", {"restored": "ck"}))
        status = ray.get(c.status.remote())
        assert status["generation"] == 1 and status["ready"]
        assert status["restored"] == {0: {"restored": "ck", "generation": 1}, 1: {"restored": "ck", "generation": 1}}
        seq = ray.get(c.put_task.remote(["u", "u"]))
        ray.get(c.put_result.remote(0, seq, "fresh0", "new0"))
        ray.get(c.put_result.remote(0, seq, "stale0", "old0"))  # a late pre-restart result: ignored
        ray.get(c.put_result.remote(1, seq, "fresh1", "new1"))
        assert ray.get(c.get_results.remote(seq, 2.0)) == ("done", 1, ["fresh0", "fresh1"])
    finally:
        ray.kill(c)
