"""SD3 and FLUX through the model-family seam: tiny models load in plain diffusers, our sampler
reproduces the pipelines, the learner re-scores sampled log-probs exactly, and LoRA exports load
with `load_lora_weights`."""

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline

from raydiff.config import ModelSection, load_config
from raydiff.config_base import ConfigError
from raydiff.models.loader import load_model
from raydiff.models.lora import export_weights
from raydiff.sampling.conditioning import encode_prompts
from raydiff.sampling.flow_sampler import draw_window
from raydiff.sampling.policy import Policy
from raydiff.sampling.sampler import sample

PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}
PROMPTS = ["a red cat", "a blue dog"]


@pytest.fixture(scope="module")
def tiny_flow() -> dict:
    from raydiff.models.tiny import resolve_tiny

    return {k: resolve_tiny(f"tiny://{k}") for k in PIPELINES}


def _pipeline_latents(kind, path_or_pipe, steps=3, guidance=4.5, seed=0):
    pipe = path_or_pipe if not isinstance(path_or_pipe, str) else PIPELINES[kind].from_pretrained(path_or_pipe)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPTS, num_inference_steps=steps, guidance_scale=guidance, height=64, width=64,
               generator=torch.Generator().manual_seed(seed), output_type="latent", max_sequence_length=16).images
    if kind == "flux":  # FluxPipeline returns packed latents for output_type="latent"
        from raydiff.models.flux import unpack

        out = unpack(out, 8, 8)
    return out


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_ode_sampler_reproduces_the_diffusers_pipeline(kind, tiny_flow):
    """noise_level 0 = the pipeline's Euler sampler: same noise, same conditioning, same latents."""
    model = load_model(ModelSection(path=f"tiny://{kind}"))
    assert model.kind == kind and model.family.step_kind == "flow" and model.resolution == 64
    ours = sample(model, encode_prompts(model, PROMPTS), PROMPTS, 3, 4.5, 1.0, torch.Generator().manual_seed(0), noise_level=0.0)
    assert torch.isnan(ours.log_probs).all()  # deterministic steps have no density
    torch.testing.assert_close(ours.latents[:, -1], _pipeline_latents(kind, tiny_flow[kind]).float(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind,dtype", [("sd3", "float32"), ("flux", "float32"), ("sd3", "bfloat16")])
def test_learner_rescores_sampled_log_probs_exactly(kind, dtype):
    """Policy.step (the learner's path) gives the sampler's log-probs bit for bit, inside the SDE window only;
    in bf16 too, because the stored latents are the bf16-rounded ones the next step consumed."""
    model = load_model(ModelSection(path=f"tiny://{kind}", dtype=dtype))
    window = draw_window(4, 2, 2, torch.Generator().manual_seed(5))
    traj = sample(model, encode_prompts(model, PROMPTS), PROMPTS, 4, 3.0, 1.0, torch.Generator().manual_seed(1),
                  noise_level=0.7, sde_window=window, keep_noise=True)
    inside = list(range(*window))
    policy = Policy(model)
    assert policy.stochastic_steps(traj) == inside
    for j in range(4):
        lp = policy.log_prob(traj, j)
        if j in inside:
            assert torch.isfinite(traj.log_probs[:, j]).all()
            assert torch.equal(lp, traj.log_probs[:, j])
            lp_el, std = policy.element_log_prob(traj, j)
            z = traj.extras["noise"][:, j]  # realised noise gives the same per-element density
            want = -z**2 / 2 - torch.log(std) - 0.5 * torch.log(torch.tensor(2 * torch.pi))
            torch.testing.assert_close(lp_el, want, atol=2e-4, rtol=1e-4)
            assert traj.latents.dtype == model.dtype  # stored in the sampling dtype: what the next step consumed
        else:  # outside the window: the stored step is the deterministic Euler step the learner recomputes
            assert torch.isnan(traj.log_probs[:, j]).all() and torch.isnan(lp).all()
            mean = policy.step(traj, j)[0].mean.to(model.dtype).float()  # rounded as the sampler stored it
            torch.testing.assert_close(mean, traj.latents[:, j + 1].float(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_lora_export_loads_in_plain_diffusers(kind, tiny_flow, tmp_path):
    model = load_model(ModelSection(path=f"tiny://{kind}", lora={"rank": 4, "alpha": 8}))  # alpha != rank
    with torch.no_grad():
        for n, p in model.denoiser.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    export_weights(model, tmp_path / "lora")
    pipe = PIPELINES[kind].from_pretrained(tiny_flow[kind])
    base = _pipeline_latents(kind, pipe)
    pipe.load_lora_weights(str(tmp_path / "lora"))
    tuned = _pipeline_latents(kind, pipe)
    assert (tuned - base).abs().max() > 1e-2, "the LoRA did not change the pipeline's output"
    ours = sample(model, encode_prompts(model, PROMPTS), PROMPTS, 3, 4.5, 1.0, torch.Generator().manual_seed(0), noise_level=0.0)
    torch.testing.assert_close(tuned.float(), ours.latents[:, -1], atol=1e-4, rtol=1e-4)


def test_ddim_only_algorithms_refuse_flow_models():
    with pytest.raises(ConfigError, match=r"algorithm.name='ddpo' needs a model with ddim steps.*model.path='tiny://sd3'"):
        load_config("configs/tiny_ddpo.yaml", ["model.path=tiny://sd3"])
    with pytest.raises(ConfigError, match=r"model.kind='flux'"):
        load_config("configs/tiny_dag.yaml", ["model.kind=flux"])
    assert load_config("configs/tiny_ddpo.yaml").model.path == "tiny://sd"


def test_sde_window_is_checked():
    with pytest.raises(ValueError, match="sde_window_size=3 \\+ sde_window_max_start=2 exceeds sampling.num_steps=4"):
        draw_window(4, 3, 2, torch.Generator())
    assert draw_window(4, 0, 0, torch.Generator()) is None
    starts = {draw_window(10, 2, 3, torch.Generator().manual_seed(s))[0] for s in range(40)}
    assert starts == {0, 1, 2, 3}


def _sd3_checkpoint(run_dir):
    """A run dir with one tiny-SD3 checkpoint (LoRA B perturbed): learner.pt, the diffusers export, config.yaml."""
    import yaml
    from _checkpoints import perturbed_lora_checkpoint

    from raydiff.config import SamplingSection

    model_cfg = ModelSection(path="tiny://sd3", lora={"rank": 4, "alpha": 4})
    sampling = SamplingSection(num_steps=2, eval_num_steps=4, guidance_scale=3.0)
    return perturbed_lora_checkpoint(run_dir, model_cfg, yaml.safe_dump({"model": model_cfg.model_dump(mode="json"),
                                                                          "sampling": sampling.model_dump(mode="json")}))


def test_eval_sd3_export_matches_learner_pt(ray_cluster, serve_rewards, tmp_path):
    """`raydiff eval` on a tiny-SD3 run: the diffusers export and learner.pt give the same scores, with
    sampling.eval_num_steps (more steps than training)."""
    import json

    import numpy as np

    from raydiff.cli import main

    ckpt = _sd3_checkpoint(tmp_path / "run")
    out = tmp_path / "eval"
    rc = main(["eval", "--checkpoint", str(ckpt / "learner" / "export"), "--compare", str(ckpt),
               "--prompts", "simple_animals", "--limit", "2", "--num-per-prompt", "1", "--rewards", "brightness",
               "--num-cpus", "0.5", "--reward-app", serve_rewards.app_name, "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "eval.json").read_text())
    assert res["steps"] == 4 and res["guidance_scale"] == 3.0
    assert res["policies"]["checkpoint"]["weights"] == "export" and res["policies"]["compare"]["weights"] == "learner.pt"
    np.testing.assert_allclose(res["policies"]["checkpoint"]["scores"]["total"],
                               res["policies"]["compare"]["scores"]["total"], atol=1e-3)


def test_sd3_without_t5_matches_the_pipeline(tiny_flow, tmp_path):
    """SD3 runs without its T5 encoder as diffusers allows (zero T5 tokens); the family loads and samples it."""
    import json
    import shutil

    folder = tmp_path / "sd3-no-t5"
    shutil.copytree(tiny_flow["sd3"], folder, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    index = json.loads((folder / "model_index.json").read_text())
    index.update(text_encoder_3=[None, None], tokenizer_3=[None, None])
    (folder / "model_index.json").write_text(json.dumps(index))
    model = load_model(ModelSection(path=str(folder)))
    assert model.kind == "sd3" and len(model.text_encoders) == 2
    ours = sample(model, encode_prompts(model, PROMPTS), PROMPTS, 3, 4.5, 1.0, torch.Generator().manual_seed(0), noise_level=0.0)
    pipe = StableDiffusion3Pipeline.from_pretrained(str(folder), text_encoder_3=None, tokenizer_3=None)  # as diffusers documents
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(PROMPTS, num_inference_steps=3, guidance_scale=4.5, height=64, width=64,
               generator=torch.Generator().manual_seed(0), output_type="latent").images
    torch.testing.assert_close(ours.latents[:, -1], ref.float(), atol=1e-4, rtol=1e-4)
