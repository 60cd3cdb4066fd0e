"""The memory plan: real architectures on the meta device, measured activations, refusals that name the knob.

The must-show: configs/dag_sdxl.yaml with an impossible batch on a 24 GB GPU is refused before
anything starts, naming the knob and a value that fits (and that value then passes).
"""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from raydiff.config import load_config
from raydiff.engine.cluster.architecture import KNOWN_HUB_IDS, meta_modules
from raydiff.engine.cluster.memory_trace import traced_peak
from raydiff.engine.cluster.plan import GiB, MemoryPlanError, auto_decode_chunk, check_memory, plan, vae_decode_cost

ROOT = Path(__file__).resolve().parents[1]
DAG_SDXL = str(ROOT / "configs" / "dag_sdxl.yaml")


def test_shipped_architectures_have_the_published_parameter_counts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    sdxl = meta_modules(load_config(None, ["model.path=stabilityai/stable-diffusion-xl-base-1.0"]).model)
    sd15 = meta_modules(load_config(None, ["model.path=stable-diffusion-v1-5/stable-diffusion-v1-5"]).model)
    assert (sdxl.kind, sd15.kind) == ("sdxl", "sd")
    assert count(sdxl.unet) == 2_567_463_684 and count(sd15.unet) == 859_520_964
    assert count(sdxl.vae) == count(sd15.vae) == 83_653_863
    assert count(sdxl.text_encoders[0]) == count(sd15.text_encoders[0]) == 123_060_480
    assert count(sdxl.text_encoders[1]) == 694_659_840
    assert all(p.device.type == "meta" for p in sdxl.unet.parameters())
    assert sdxl.default_resolution == 1024 and sd15.default_resolution == 512
    assert set(KNOWN_HUB_IDS.values()) == {"sd15", "sdxl"}


def test_trace_counts_live_tensors_and_fused_attention_has_no_score_matrix():
    net = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256)).to("meta")
    x = torch.empty(8, 256, device="meta")
    with torch.no_grad():
        # At the ReLU both (8, 1024) fp32 tensors are alive; the Linear's output is freed after.
        assert traced_peak(lambda: net(x)) == 2 * 8 * 1024 * 4
    q = torch.empty(1, 1, 4096, 64, device="meta", dtype=torch.bfloat16)
    with torch.no_grad():
        fused = traced_peak(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert fused == q.numel() * 2  # the output only, like flash / memory-efficient kernels
    assert torch.nn.functional.scaled_dot_product_attention.__name__ == "scaled_dot_product_attention"  # restored


def test_dag_sdxl_plan_fits_80gb_and_decodes_in_chunks():
    cfg = load_config(DAG_SDXL)
    rollout, learner = check_memory(cfg)
    assert rollout.fits and learner.fits
    decode = next(p for p in rollout.phases if p.knob == "rollout.decode_chunk")
    items = cfg.sampling.batch_size * (cfg.sampling.num_steps + 1)
    assert 1 <= decode.units < items, "auto chunk must split the N x (T+1) decodes"
    # Decoding all 204 latents at once would need hundreds of GiB (1024px SDXL VAE ~1.5 GiB per image in bf16).
    assert decode.fixed + decode.per_unit * items > 200 * GiB
    assert 0.5 * GiB < decode.per_unit < 4 * GiB
    # What a GPU rollout worker traces from its loaded VAE to pick the chunk at run time: the same cost.
    vae = meta_modules(cfg.model).vae
    assert vae_decode_cost(vae.config, torch.bfloat16, 128) == (decode.fixed, decode.per_unit)
    assert auto_decode_chunk(40 * GiB, decode.fixed, decode.per_unit) == int((20 * GiB - decode.fixed) // decode.per_unit)


def test_estimator_refuses_dag_sdxl_impossible_batch_on_24gb_naming_the_knob():
    cfg = load_config(DAG_SDXL, ["rollout.gpu_memory_gb=24", "sampling.batch_size=64"])
    with pytest.raises(MemoryPlanError) as info:
        check_memory(cfg)
    msg = str(info.value)
    assert msg.startswith("rollout: predicted peak GPU memory") and "rollout.gpu_memory_gb=24" in msg
    most = int(re.search(r"set sampling\.batch_size <= (\d+) \(now 64\)", msg).group(1))
    # The suggested value passes.
    check_memory(load_config(DAG_SDXL, ["rollout.gpu_memory_gb=24", f"sampling.batch_size={most}"]))
    # A fixed VAE chunk too large for 24 GB names rollout.decode_chunk.
    with pytest.raises(MemoryPlanError, match=r"set rollout\.decode_chunk <= \d+ \(now 64\)"):
        check_memory(load_config(DAG_SDXL, ["rollout.gpu_memory_gb=24", "rollout.decode_chunk=64"]))
    # Learner: a large micro-batch without gradient checkpointing names algorithm.train_batch_size.
    with pytest.raises(MemoryPlanError, match=r"^learner: .*set algorithm\.train_batch_size <= \d+ \(now 16\)"):
        check_memory(load_config(DAG_SDXL, ["learner.gpu_memory_gb=24", "algorithm.train_batch_size=16",
                                            "model.gradient_checkpointing=false"]))


def test_full_finetune_names_zero_stage_and_cpu_roles_are_not_checked():
    cfg = load_config(DAG_SDXL, ["model.finetune=full", "learner.zero_stage=0", "learner.gpu_memory_gb=40"])
    with pytest.raises(MemoryPlanError, match="learner.zero_stage"):
        check_memory(cfg)
    zero3 = plan(load_config(DAG_SDXL, ["model.finetune=full", "learner.zero_stage=3", "learner.num_workers=8"]))[1]
    zero0 = plan(cfg)[1]
    assert zero3.resident[1][1] * 7 < zero0.resident[1][1]  # optimiser state sharded over 8 workers
    cpu = load_config(DAG_SDXL, ["rollout.num_gpus=0", "learner.use_gpu=false", "sampling.batch_size=512"])
    assert check_memory(cpu) == []


def test_trainer_refuses_before_starting_anything(tmp_path, tiny_sd):
    from raydiff.engine.trainer import Trainer

    cfg = load_config(str(ROOT / "configs" / "tiny_ddpo_async.yaml"),
                      [f"model.path={tiny_sd}", f"output.run_dir={tmp_path}", "rollout.num_gpus=1", "rollout.gpu_memory_gb=0.5"])
    with pytest.raises(MemoryPlanError, match=r"rollout: .*rollout\.gpu_memory_gb=0\.5"):
        Trainer(cfg).run()


def test_plan_cli_prints_each_role_and_accepts_a_local_folder(tiny_sdxl):
    from raydiff.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        rc = main(["plan", DAG_SDXL, "rollout.gpu_memory_gb=24", "sampling.batch_size=64"])
    text = out.getvalue()
    assert rc == 1 and "rollout: peak" in text and "DOES NOT FIT" in text and "fix: " in text and "learner: peak" in text
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["plan", DAG_SDXL, f"model.path={tiny_sdxl}", "model.resolution=null"]) == 0
    assert f"architecture from {tiny_sdxl}" in out.getvalue()


def test_docs_show_the_current_plan_of_dag_sdxl():
    from raydiff.cli import main

    out = io.StringIO()
    with redirect_stdout(out):
        main(["plan", DAG_SDXL])
    doc = (ROOT / "docs" / "memory.md").read_text()
    assert out.getvalue().strip() in doc, "docs/memory.md is stale: paste the output of `raydiff plan configs/dag_sdxl.yaml`"


def test_timesteps_per_forward_scales_the_learner_activation_phase():
    """k steps per learner call: k× the rows of the UNet forward+backward peak (the knob's memory price)."""
    ddpo = str(ROOT / "configs" / "ddpo_sd15.yaml")
    one, four = (next(ph for ph in plan(load_config(ddpo, [f"algorithm.timesteps_per_forward={k}"]))[1].phases
                      if ph.name.startswith("UNet forward+backward")) for k in (1, 4))
    assert "8 rows per trajectory" in four.name and "2 rows per trajectory" in one.name
    assert four.per_unit > 3.5 * one.per_unit
