"""DiffusionNFT's loss against a hand computation, its old-policy schedule, and its forward process."""

import numpy as np
import pytest
import torch

from raydiff.algorithms.nft import ForwardProcess, nft_loss, old_decay


def test_nft_loss_by_hand():
    x0 = torch.tensor([[[[1.0, 2.0]]]])
    x0_theta = torch.tensor([[[[2.0, 2.0]]]], requires_grad=True)
    x0_old = torch.tensor([[[[1.0, 3.0]]]])
    per, stats = nft_loss(x0, x0_theta, x0_old, torch.tensor([2.5]), beta=1.0, adv_clip_max=5.0)
    # r = 2.5/5/2 + 0.5 = 0.75; v+ = x̂θ: err [1, 0], w+ = 0.5 -> 1; v- = 2 x̂old − x̂θ = [0, 4]: err [−1, 2], w- = 1.5 -> 5/3
    np.testing.assert_allclose(per.detach().numpy(), [(0.75 * 1.0 + 0.25 * 5 / 3) * 5.0], rtol=1e-6)
    assert stats["r_mean"] == pytest.approx(0.75)
    per.sum().backward()
    # d/dx̂θ: r·2(x̂θ−x0)/w+/2 + (1−r)·2(neg−x0)·(−1)/w-/2, times M (mean over 2 elements → /2)
    expected = 5.0 * (0.75 * np.array([1.0, 0.0]) / 0.5 - 0.25 * np.array([-1.0, 2.0]) / 1.5)
    np.testing.assert_allclose(x0_theta.grad.flatten().numpy(), expected, rtol=1e-6)


def test_nft_loss_beta_and_advantage_clip():
    x0 = torch.zeros(1, 1, 1, 2)
    th = torch.tensor([[[[1.0, -1.0]]]])
    old = torch.tensor([[[[0.5, 0.5]]]])
    per, _ = nft_loss(x0, th, old, torch.tensor([-9.0]), beta=0.5, adv_clip_max=5.0)  # A clipped to −5: r = 0
    neg = 1.5 * old - 0.5 * th  # [0.25, 1.25]
    w = neg.abs().mean()
    np.testing.assert_allclose(per.numpy(), [((neg**2).mean() / w / 0.5 * 5.0).item()], rtol=1e-6)


def test_old_decay_matches_the_reference_schedules():
    assert [old_decay(s, 0, 0.001, 0.5) for s in (0, 100, 499, 5000)] == pytest.approx([0.0, 0.1, 0.499, 0.5])  # decay_type 1
    assert [old_decay(s, 75, 0.0075, 0.999) for s in (10, 75, 175, 10_000)] == pytest.approx([0.0, 0.0, 0.75, 0.999])  # type 2


def test_forward_process_round_trips_x0():
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    x0, eps = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    flow = ForwardProcess(FlowMatchEulerDiscreteScheduler(shift=3.0))
    t = torch.tensor([1000.0, 500.0, 10.0])
    x_t = flow.noise(x0, eps, t)
    torch.testing.assert_close(x_t[1], 0.5 * x0[1] + 0.5 * eps[1])
    torch.testing.assert_close(flow.x0_from(eps - x0, x_t, t), x0, atol=1e-5, rtol=1e-5)  # v* = ε − x_0
    ddpm = ForwardProcess(DDIMScheduler())
    t = torch.tensor([999, 500, 1])
    torch.testing.assert_close(ddpm.x0_from(eps, ddpm.noise(x0, eps, t), t), x0, atol=1e-4, rtol=1e-4)
