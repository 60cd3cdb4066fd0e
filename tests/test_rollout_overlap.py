"""Rollouts that fit and never idle on scoring.

- DAG's rollout path on the real SDXL architecture (shipped configs, widths / 8, random weights):
  no VAE decode call sees more than rollout.decode_chunk latents.
- A scoring failure re-sends the scores, never re-samples; a permanent one is raised at once.
- Overlap: the group issues `start` of batch i+1 before `finish` of batch i; the time rollouts sit
  blocked on scores (time/reward_wait_s) is lower than without overlap, same config.
- A batch that keeps failing inside its worker (e.g. CUDA OOM) is re-issued, then a clear RolloutFailed in the driver.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from raydiff.algorithms.registry import make_algorithm
from raydiff.config import load_config
from raydiff.engine.rollouts.worker import RolloutWorker

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_SDXL = ROOT / "raydiff" / "models" / "architectures" / "sdxl"


def _narrow_sdxl(out: Path) -> str:
    """SDXL's published architecture (block types, depths [1, 2, 10], text_time conditioning, two text
    encoders) with every width divided by 8, random weights; tokenizers and scheduler from the tiny build."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from raydiff.models.tiny import build_tiny

    build_tiny("sdxl", out)
    load = lambda c: {k: v for k, v in json.loads((SHIPPED_SDXL / c / "config.json").read_text()).items() if not k.startswith("_")}  # noqa: E731
    tiny_te = json.loads((out / "text_encoder" / "config.json").read_text())
    ids = {k: tiny_te[k] for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")}
    te1 = dict(load("text_encoder"), hidden_size=96, intermediate_size=384, num_hidden_layers=2, num_attention_heads=12, projection_dim=96, **ids)
    te2 = dict(load("text_encoder_2"), hidden_size=160, intermediate_size=640, num_hidden_layers=2, num_attention_heads=20, projection_dim=160, **ids)
    unet = dict(load("unet"), block_out_channels=[40, 80, 160], norm_num_groups=8, cross_attention_dim=96 + 160,
                addition_time_embed_dim=32, projection_class_embeddings_input_dim=6 * 32 + 160, sample_size=8)
    vae = dict(load("vae"), block_out_channels=[16, 32, 64, 64], norm_num_groups=8, sample_size=64)
    torch.manual_seed(0)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        shutil.rmtree(out / name)
    UNet2DConditionModel.from_config(unet).save_pretrained(out / "unet")
    AutoencoderKL.from_config(vae).save_pretrained(out / "vae")
    CLIPTextModel(CLIPTextConfig(**te1)).save_pretrained(out / "text_encoder")
    CLIPTextModelWithProjection(CLIPTextConfig(**te2)).save_pretrained(out / "text_encoder_2")
    return str(out)


def _worker(config: str, overrides: list[str]) -> RolloutWorker:
    cfg = load_config(config, overrides)
    return RolloutWorker(cfg, 0, make_algorithm(cfg.algorithm, cfg.sampling).needs)


def test_dag_rollout_on_sdxl_architecture_never_decodes_more_than_the_chunk(tmp_path):
    path = _narrow_sdxl(tmp_path / "sdxl-narrow")
    N, T, chunk = 3, 3, 2
    worker = _worker(str(ROOT / "configs" / "dag_sdxl.yaml"), [
        f"model.path={path}", "model.dtype=float32", "model.resolution=64", "model.gradient_checkpointing=false",
        f"sampling.num_steps={T}", f"sampling.batch_size={N}", f"rollout.decode_chunk={chunk}", "reward.backend=local",
        "reward.components=[{name: brightness}]"])
    unet = worker.model.unet
    assert unet.config.transformer_layers_per_block == [1, 2, 10] and unet.config.addition_embed_type == "text_time"
    calls = []
    worker.model.vae.decoder.register_forward_pre_hook(lambda mod, args: calls.append(args[0].shape[0]))
    traj = worker.generate(["a cat", "a dog", "a red cow"], seed=3)
    assert calls and max(calls) <= chunk, calls
    assert sum(calls) == N + N * T  # final images + x̂_0 at every step, all decoded
    assert traj.extras["step_rewards"].shape == (N, T) and torch.isfinite(traj.extras["step_rewards"]).all()
    assert traj.images.shape == (N, 64, 64, 3)
    assert traj.timings["reward_calls"] == 1 + -(-N * T // chunk)  # 1 final call + one per x̂_0 chunk


class _Flaky:
    """A real reward that fails its first `failures` calls with `error` (a transient outage, or a bad request)."""

    def __init__(self, inner, failures: int, error: Exception):
        self.inner, self.failures, self.error, self.calls = inner, failures, error, 0

    def __call__(self, images, prompts):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return self.inner(images, prompts)


def test_scoring_failure_resends_scores_not_samples(tiny_sd):
    worker = _worker(str(ROOT / "configs" / "tiny_ddpo.yaml"), [f"model.path={tiny_sd}", "sampling.num_steps=3"])
    unet_calls = []
    worker.model.unet.register_forward_pre_hook(lambda *a: unet_calls.append(1))
    real = worker.rewards
    worker.rewards = flaky = _Flaky(real, 1, ConnectionError("replica restarting"))
    traj = worker.finish(worker.start(["a cat", "a dog"], seed=1))
    assert flaky.calls == 2 and traj.timings["reward_resends"] == 1
    assert len(unet_calls) == 3, "sampled once"
    np.testing.assert_allclose(traj.rewards, real(traj.images, traj.prompts)[0])
    worker.rewards = flaky = _Flaky(real, 1, ValueError("images must be uint8"))
    key = worker.start(["a cat"], seed=2)
    with pytest.raises(ValueError, match="uint8"):
        worker.finish(key)
    assert flaky.calls == 1, "a permanent error is not re-sent"


def _wait_and_bound(ray_cluster, cfg, needs, overlap: bool):
    import ray

    from raydiff.engine.rollouts.group import RolloutGroup

    cfg = cfg.model_copy(deep=True)
    cfg.rollout.overlap_scoring = overlap
    group = RolloutGroup(cfg, needs)
    try:
        requests = [(0, ["a cat", "a dog"], s) for s in range(5)]
        group.dispatch(0, requests)
        held = ray.get(group.actors[0].pending.remote())  # runs after every task dispatched so far
        gathered = group.gather(0)
        assert [ray.get(b.images).shape[0] for b in gathered] == [2] * 5  # images stay in the object store until asked for
        batches = [b.meta for b in gathered]
        return sum(b.timings["reward_wait_s"] for b in batches), held, batches
    finally:
        group.shutdown()


def test_overlap_lowers_reward_wait_with_served_rewards(ray_cluster, serve_rewards, tiny_sd):
    cfg = load_config(str(ROOT / "configs" / "tiny_dag.yaml"), [
        f"model.path={tiny_sd}", "sampling.num_steps=4", "reward.backend=serve", f"reward.serve_app={serve_rewards.app_name}",
        "reward.components=[{name: clip}]", "rollout.max_scoring_in_flight=2"])
    needs = make_algorithm(cfg.algorithm, cfg.sampling).needs
    serial, held_serial, a = _wait_and_bound(ray_cluster, cfg, needs, overlap=False)
    overlap, held_overlap, b = _wait_and_bound(ray_cluster, cfg, needs, overlap=True)
    print(f"time/reward_wait_s over 5 batches: overlap_scoring=false {serial:.3f}s, true {overlap:.3f}s")
    assert held_serial == 0 and held_overlap == 1  # bound: lag = max_scoring_in_flight - 1 open batches
    assert overlap < 0.7 * serial  # measured 0.195 s -> 0.032 s; the last batch of each run always waits
    for x, y in zip(a, b):  # same seeds, same scores: only the timing changed
        np.testing.assert_allclose(x.rewards, y.rewards, rtol=1e-5)
        torch.testing.assert_close(x.extras["step_rewards"], y.extras["step_rewards"], rtol=1e-5, atol=1e-6)


def test_failing_rollout_batch_is_a_clear_error_in_the_driver(ray_cluster, tiny_sd):
    from raydiff.engine.rollouts.group import RolloutFailed, RolloutGroup

    class OutOfMemoryWorker(RolloutWorker):
        def start(self, prompts, seed):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 54.00 GiB")

    cfg = load_config(str(ROOT / "configs" / "tiny_ddpo_async.yaml"), [f"model.path={tiny_sd}", "rollout.max_batch_retries=1"])
    group = RolloutGroup(cfg, make_algorithm(cfg.algorithm, cfg.sampling).needs, worker_cls=OutOfMemoryWorker)
    try:
        group.dispatch(0, [(0, ["a cat"], 7)])
        with pytest.raises(RolloutFailed) as info:
            group.gather(0)
        assert group.reissued == 1  # re-issued once (rollout.max_batch_retries=1), then a clear error
    finally:
        group.shutdown()
    msg = str(info.value)
    assert "rollout batch of worker 0 (epoch 0, 1 prompts, seed 7) failed 2 time(s)" in msg
    assert "OutOfMemoryError" in msg and "rollout.decode_chunk" in msg and "raydiff plan" in msg
