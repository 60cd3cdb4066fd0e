"""Group sampling (engine/groups.py) and group-relative advantages (algorithms/grpo_common.py)."""

import numpy as np
import pytest
import torch

from raydiff.algorithms.grpo_common import group_advantages, require_groups, step_mean_kl
from raydiff.engine.groups import check_group_layout, plan_epoch

PROMPTS = [f"p{i}" for i in range(20)]


def test_groups_are_whole_contiguous_and_span_workers():
    plan = plan_epoch(PROMPTS, seed=3, epoch=5, batches_per_epoch=2, num_workers=3, batch_size=4, k=6)
    prompts = [p for _, ps, _ in plan.requests for p in ps]
    ids = np.concatenate(plan.group_ids)
    assert len(prompts) == 24 and [w for w, _, _ in plan.requests] == [0, 1, 2, 0, 1, 2]
    assert sorted(set(ids.tolist())) == list(range(5 * 4, 5 * 4 + 4))  # id = epoch·G + g, unique over the run
    for g in set(ids.tolist()):
        members = np.flatnonzero(ids == g)
        assert len(members) == 6 and len({prompts[i] for i in members}) == 1
    assert len(set(prompts)) == 4  # distinct prompts while G ≤ |prompts|
    # group 0 = slots 0..5: batch 0 on worker 0 (4) and batch 1 on worker 1 (2): a group spans workers
    assert set(plan.group_ids[0].tolist()) | set(plan.group_ids[1][:2].tolist()) == {20}


def test_plan_is_a_pure_function_of_seed_and_epoch():
    a = plan_epoch(PROMPTS, 1, 7, 2, 2, 4, k=4)
    b = plan_epoch(PROMPTS, 1, 7, 2, 2, 4, k=4)
    assert a.requests == b.requests and all((x == y).all() for x, y in zip(a.group_ids, b.group_ids))
    assert plan_epoch(PROMPTS, 1, 8, 2, 2, 4, k=4).requests != a.requests
    assert len({s for _, _, s in a.requests}) == 4  # one noise seed per batch


def test_k1_keeps_the_iid_draw():
    rng = np.random.default_rng([0, 2])
    expected = []
    for _ in range(2):
        for w in range(2):
            ps = [PROMPTS[i] for i in rng.integers(0, len(PROMPTS), 3)]
            expected.append((w, ps, int(rng.integers(0, 2**31 - 1))))
    assert plan_epoch(PROMPTS, 0, 2, 2, 2, 3, k=1).requests == expected


def test_layout_errors_name_the_fields():
    with pytest.raises(ValueError, match=r"sampling.batch_size.*rollout.num_workers.*train.batches_per_epoch.*group_size.*batches_per_epoch=3"):
        check_group_layout(3, 4, 2, 1, [])
    with pytest.raises(ValueError, match=r"group-wise rewards \['win'\].*sampling.batch_size a multiple of 4"):
        check_group_layout(4, 2, 2, 1, ["win"])
    check_group_layout(4, 4, 1, 1, ["win"])


def test_group_advantages_by_hand():
    r = [1.0, 2.0, 3.0, 10.0, 10.0, 4.0, 0.0]
    ids = [7, 7, 7, 9, 9, 3, 3]
    adv = group_advantages(r, ids, std_eps=1e-4)
    s0 = np.sqrt(((1 - 2) ** 2 + 0 + (3 - 2) ** 2) / 3)  # population std of group 7
    np.testing.assert_allclose(adv[:3], [-1 / (s0 + 1e-4), 0, 1 / (s0 + 1e-4)])
    np.testing.assert_array_equal(adv[3:5], [0.0, 0.0])  # equal rewards: the ε guard gives exactly 0
    np.testing.assert_allclose(adv[5:], [2 / (2 + 1e-4), -2 / (2 + 1e-4)])
    glob = group_advantages(r, ids, std_eps=1e-4, global_std=True)
    np.testing.assert_allclose(glob[5:], np.array([2, -2]) / (np.std(r) + 1e-4))


def test_broken_groups_are_refused():
    class B:
        prompts = ["a", "a", "b", "b"]
        group_ids = torch.tensor([0, 0, 1, 1])

    assert (require_groups(B, 2, "x") == [0, 0, 1, 1]).all()
    B.group_ids = torch.tensor([0, 0, 0, 1])
    with pytest.raises(RuntimeError, match="group 0 arrived with 3 of 2"):
        require_groups(B, 2, "x")


def test_step_mean_kl_by_hand():
    mean = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 0.0]]]])
    ref = torch.zeros_like(mean)
    std = torch.tensor([0.5, 2.0])
    np.testing.assert_allclose(step_mean_kl(mean, ref, std).numpy(), [(1 + 4) / 2 / (2 * 0.25), 0.0])
