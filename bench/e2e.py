"""End-to-end DDPO samples/s (rollout + reward + learning): raydiff's engine vs a single-process loop.

    python bench/e2e.py [--epochs 4] [--repeats 3] [--batch 8] [--batches-per-epoch 2] [--threads 1]
    python bench/e2e.py --sd15-shapes --device cuda --steps 50 --batch 16   # real SD1.5 shapes, random weights (GPU)

The baseline is what a user would write instead, in the style of ddpo-pytorch's `scripts/train.py`:
one process samples a batch with per-step log-probs, decodes and scores it, normalises the
advantages, and runs the clipped PPO update over the stored transitions, then repeats. It uses
the same model folder, LoRA, DDIM step with log-prob (ddpo-pytorch's `ddim_step_with_logprob`),
reward, optimiser and clipping as the engine, so both sides do the same arithmetic.

raydiff runs the real engine on a local Ray cluster: one rollout actor, one learner actor
(`learner.engine=torch`), train.max_staleness=0 (synchronous: the same algorithm as the baseline),
in-process reward in the rollout worker. Equal thread budget: the baseline gets `--threads` torch
threads; each raydiff role gets `--threads` too, and at staleness 0 the two roles never compute at
the same time. Start-up is outside the timed part for both sides: epoch 0 is a warm-up and the
time is from the end of epoch 0 to the end of the last epoch (raydiff: its metrics time stamps).
Runs alternate (engine, single, engine_k1, engine_k1, single, engine, ...); min / median / max over repeats are printed.

raydiff's learner scores `--timesteps-per-forward` K denoising steps per network call
(`algorithm.timesteps_per_forward`; same gradient, K× the activations; default all steps on CPU,
1 on GPU); the baseline, as ddpo-pytorch, makes one call per step. With K > 1 a third side,
`engine_k1`, runs raydiff with its default 1, so the engine's own cost is shown apart from the lever:
`RATIO e2e_vs_single_process_timesteps_per_forward_1 X` is printed before the last line,
`RATIO e2e_vs_single_process X` (median engine samples/s / median single-process samples/s).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import device as pick_device  # noqa: E402
from _common import machine, spread  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def overrides(args, model_path: str) -> list[str]:
    """One config for both sides (the baseline reads the same fields)."""
    gpu = args.device == "cuda"
    return [
        f"model.path={model_path}", f"sampling.num_steps={args.steps}", f"sampling.batch_size={args.batch}",
        f"sampling.guidance_scale={args.guidance}", f"train.num_epochs={args.epochs}",
        f"train.batches_per_epoch={args.batches_per_epoch}", "train.max_staleness=0", "train.seed=0",
        f"algorithm.train_batch_size={args.batch}", "algorithm.clip_range=0.2", "algorithm.per_prompt_stat_tracking=false",
        "rollout.num_workers=1", f"rollout.torch_threads={args.threads}", f"learner.torch_threads={args.threads}",
        "learner.engine=torch", "learner.num_workers=1", "learner.learning_rate=0.01", "reward.backend=local",
        "output.checkpoint_every=0", "output.progress=false", "output.tensorboard=false", "output.image_grid_every=0",
        "output.experience_records=false",
        *([f"model.resolution={args.resolution}"] if args.resolution else []),
        *(["rollout.num_gpus=1", "learner.use_gpu=true", "model.dtype=bfloat16"] if gpu else []), *args.extra,
    ]


def load_cfg(ovr: list[str], run_dir: str):
    from raydiff.config import load_config

    return load_config(str(ROOT / "configs" / "tiny_ddpo.yaml"), [*ovr, f"output.run_dir={run_dir}"])


# --- raydiff -------------------------------------------------------------------------------
def run_engine(ovr: list[str]) -> dict:
    """One Trainer run; timed from epoch 0's metrics line to the last one (start-up and final save excluded)."""
    from raydiff.engine.trainer import Trainer

    run_dir = tempfile.mkdtemp(prefix="bench-e2e-")
    cfg = load_cfg(ovr, run_dir)
    Trainer(cfg).run()
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if x.strip()]
    per_epoch = cfg.sampling.batch_size * cfg.train.batches_per_epoch
    wall = rows[-1]["time"] - rows[0]["time"]
    phases = {k: statistics.fmean(r.get(k, 0.0) for r in rows[1:]) for k in
              ("time/epoch_s", "time/rollout_wait_s", "time/sample_s", "time/reward_s", "time/learner_step_s",
               "time/learner_prepare_s", "time/sync_s")}
    return {"samples_per_s": per_epoch * (len(rows) - 1) / wall, "wall": wall, "phases": phases,
            "reward": [r["reward/mean"] for r in rows], "t": [r["time"] - rows[0]["time"] for r in rows]}


# --- the single-process baseline (ddpo-pytorch style) --------------------------------------
def run_single(ovr: list[str]) -> dict:
    """Sample -> score -> advantages -> PPO over stored transitions, in one process; same timing window."""
    import numpy as np
    import torch

    from raydiff.models.loader import load_model
    from raydiff.prompts import load_prompts
    from raydiff.rewards.base import WeightedRewards, make_reward
    from raydiff.sampling.conditioning import encode_prompts
    from raydiff.sampling.ddim import ddim_step
    from raydiff.sampling.sampler import decode_images, initial_noise, predict_noise
    from raydiff.types import Conditioning

    cfg = load_cfg(ovr, tempfile.mkdtemp(prefix="bench-e2e-single-"))
    s, a, l, tr = cfg.sampling, cfg.algorithm, cfg.learner, cfg.train
    torch.set_num_threads(l.torch_threads)
    dev = "cuda" if l.use_gpu and torch.cuda.is_available() else "cpu"
    torch.manual_seed(tr.seed)
    model = load_model(cfg.model, dev)
    params = model.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=l.learning_rate, betas=(l.adam_beta1, l.adam_beta2), eps=l.adam_eps,
                            weight_decay=l.weight_decay)
    reward_fn = WeightedRewards([(make_reward(c.registry_name, **c.args), c.weight) for c in cfg.reward.components])
    prompts_all = load_prompts(cfg.prompts.source, cfg.prompts.column, cfg.prompts.limit)
    sched, rng = model.scheduler, torch.Generator().manual_seed(tr.seed * 1009)
    ends, rewards, t_sample, t_learn = [], [], [], []
    for epoch in range(tr.num_epochs):
        t0 = time.perf_counter()
        # sampling: a batch with per-step log-probs (ddpo-pytorch: pipeline_with_logprob)
        model.unet.eval()
        samples = []
        prng = np.random.default_rng([tr.seed, epoch])
        for _ in range(tr.batches_per_epoch):
            prompts = [prompts_all[i] for i in prng.integers(0, len(prompts_all), s.batch_size)]
            gen = torch.Generator(device=model.device).manual_seed(int(prng.integers(0, 2**31 - 1)))
            with torch.no_grad():
                cond = encode_prompts(model, prompts, s.negative_prompt)
                sched.set_timesteps(s.num_steps, device=model.device)
                x = initial_noise(model, len(prompts), gen)
                xs, lps = [x], []
                for t in sched.timesteps:
                    eps = predict_noise(model, sched.scale_model_input(x, t), t, cond, s.guidance_scale)
                    out = ddim_step(sched, eps, int(t), x, s.eta, generator=gen)
                    x = out.prev_sample.to(model.dtype)
                    xs.append(x)
                    lps.append(out.log_prob)
                images = decode_images(model, x)
            total, _ = reward_fn(images, prompts)  # scoring
            samples.append({"cond": cond, "latents": torch.stack(xs, 1), "log_probs": torch.stack(lps, 1),
                            "rewards": torch.as_tensor(total, dtype=torch.float32)})
        cat = lambda k: torch.cat([b[k] for b in samples])  # noqa: E731
        cond_all = Conditioning(embeds=torch.cat([b["cond"].embeds for b in samples]),
                                neg_embeds=torch.cat([b["cond"].neg_embeds for b in samples]))
        latents, old_lp, r = cat("latents"), cat("log_probs"), cat("rewards")
        rewards.append(float(r.mean()))
        t1 = time.perf_counter()
        adv = ((r - r.mean()) / (r.std(unbiased=False) + 1e-6)).clamp(-a.adv_clip_max, a.adv_clip_max).to(model.device)
        # training: shuffled minibatches, all T steps accumulated into one optimiser step each
        model.unet.train()
        n, T = len(r), s.num_steps
        perm = torch.randperm(n, generator=rng)
        for idx in perm.split(a.train_batch_size):
            sub_cond = cond_all.index(idx)
            for j in torch.randperm(T, generator=rng).tolist():
                t = sched.timesteps[j]
                x_t, x_prev = latents[idx, j], latents[idx, j + 1]
                eps = predict_noise(model, x_t, t, sub_cond, s.guidance_scale)
                lp = ddim_step(sched, eps, int(t), x_t, s.eta, prev_sample=x_prev).log_prob
                ratio = torch.exp(lp - old_lp[idx, j])
                loss = torch.maximum(-adv[idx] * ratio, -adv[idx] * ratio.clamp(1 - a.clip_range, 1 + a.clip_range)).mean()
                (loss / T).backward()
            torch.nn.utils.clip_grad_norm_(params, l.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
        if dev == "cuda":
            torch.cuda.synchronize()
        ends.append(time.time())
        t_sample.append(t1 - t0)
        t_learn.append(time.perf_counter() - t1)
    wall = ends[-1] - ends[0]
    per_epoch = s.batch_size * tr.batches_per_epoch
    phases = {"time/sample_and_score_s": statistics.fmean(t_sample[1:]), "time/learn_s": statistics.fmean(t_learn[1:])}
    return {"samples_per_s": per_epoch * (tr.num_epochs - 1) / wall, "wall": wall, "reward": rewards, "phases": phases,
            "t": [t - ends[0] for t in ends]}


# --- real SD1.5 shapes ----------------------------------------------------------------------
def sd15_folder(dtype: str = "float16") -> str:
    """A diffusers folder with the SD1.5 UNet / VAE / CLIP-L text encoder shapes and random weights (no hub)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from gpu._models import SD15_UNET, VAE
    from raydiff.models.weights import resolve_weights

    out = Path(tempfile.gettempdir()) / "raydiff-bench-sd15-shapes"
    if (out / "model_index.json").is_file():
        return str(out)
    tiny = Path(resolve_weights("tiny://sd"))
    tmp = out.with_suffix(".tmp")
    torch.manual_seed(0)
    dt = getattr(torch, dtype)
    UNet2DConditionModel(**SD15_UNET).to(dt).save_pretrained(tmp / "unet")
    AutoencoderKL(**VAE, scaling_factor=0.18215).to(dt).save_pretrained(tmp / "vae")
    tok = CLIPTokenizer.from_pretrained(tiny / "tokenizer")
    tok.save_pretrained(tmp / "tokenizer")
    CLIPTextModel(CLIPTextConfig(vocab_size=max(len(tok), 49408), hidden_size=768, intermediate_size=3072,
                                 num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                 projection_dim=768)).to(dt).save_pretrained(tmp / "text_encoder")
    import shutil

    shutil.copytree(tiny / "scheduler", tmp / "scheduler")
    shutil.copy(tiny / "model_index.json", tmp / "model_index.json")
    tmp.rename(out)
    return str(out)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny://sd")
    p.add_argument("--sd15-shapes", action="store_true", help="random weights of the real SD1.5 shapes at 512² (GPU)")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8, help="images per rollout batch (= PPO minibatch)")
    p.add_argument("--batches-per-epoch", type=int, default=2)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--epochs", type=int, default=4, help="epochs per run; epoch 0 is the untimed warm-up")
    p.add_argument("--repeats", type=int, default=3, help="runs per side, interleaved")
    p.add_argument("--threads", type=int, default=1, help="torch threads: the baseline's, and each raydiff role's")
    p.add_argument("--timesteps-per-forward", type=int, default=None,
                   help="raydiff's algorithm.timesteps_per_forward (default: all steps on CPU, 1 on GPU); "
                        "with K > 1 a third side runs raydiff with its default 1")
    p.add_argument("--device", default="cpu")
    p.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for both sides")
    p.add_argument("--json", action="store_true", help="also print the result as one `JSON {...}` line (bench/gpu/suite.py reads it)")
    p.add_argument("--plot", default=None, help="write reward vs wall-clock (from the end of epoch 0) of every run here (PNG)")
    args = p.parse_args(argv)
    args.device = pick_device(args.device)
    if args.epochs < 2:
        p.error("--epochs must be ≥ 2 (epoch 0 is the warm-up)")
    model_path = sd15_folder() if args.sd15_shapes else args.model
    ovr = overrides(args, model_path)
    per_call = args.timesteps_per_forward or (args.steps if args.device == "cpu" else 1)
    sides = {"engine": run_engine, "single": run_single}  # the engine with algorithm.timesteps_per_forward=k
    if per_call > 1:
        sides["engine_k1"] = run_engine  # raydiff's defaults: one learner call per step, as the baseline
    import ray

    ray.init(address="local", num_cpus=max(4, 2 * args.threads), num_gpus=1 if args.device == "cuda" else 0,
             include_dashboard=False, log_to_driver=False)
    runs = {side: [] for side in sides}
    for rep in range(args.repeats):
        order = list(sides) if rep % 2 == 0 else list(sides)[::-1]
        for side in order:
            r = sides[side]([*ovr, f"algorithm.timesteps_per_forward={per_call if side == 'engine' else 1}"])
            runs[side].append(r)
            extra = "  " + " ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in r["phases"].items()) if "phases" in r else ""
            print(f"  run {side:9s} rep={rep}: {r['samples_per_s']:.3f} samples/s (timed {r['wall']:.1f} s){extra}", flush=True)
    ray.shutdown()
    engine, single = runs["engine"], runs["single"]
    rate = {side: [r["samples_per_s"] for r in rs] for side, rs in runs.items()}
    s = rate["single"]

    def against_single(side: str) -> tuple[str, str, float]:
        """(samples/s spread, paired-ratio spread, ratio of medians) of an engine side against the baseline."""
        xs = rate[side]
        return spread(xs), spread([x / y for x, y in zip(xs, s)]), statistics.median(xs) / statistics.median(s)

    e_spread, paired, ratio = against_single("engine")
    result = {
        "machine": machine(), "model": model_path, "device": args.device, "steps": args.steps, "batch": args.batch,
        "batches_per_epoch": args.batches_per_epoch, "timed_epochs": args.epochs - 1, "threads": args.threads,
        "timesteps_per_forward": per_call, "engine_samples_per_s": e_spread, "single_process_samples_per_s": spread(s),
        "paired_ratios": paired, "final_reward_engine": round(engine[0]["reward"][-1], 4),
        "final_reward_single": round(single[0]["reward"][-1], 4),
    }
    if "engine_k1" in runs:
        k1_spread, k1_paired, k1_ratio = against_single("engine_k1")
        result.update(engine_k1_samples_per_s=k1_spread, paired_ratios_k1=k1_paired, ratio_k1=round(k1_ratio, 4),
                      final_reward_engine_k1=round(runs["engine_k1"][0]["reward"][-1], 4))
    for k, v in result.items():
        print(f"  {k}: {v}")
    if args.plot:
        from _plot import line_plot

        series = {f"{name} #{i}": (r["t"], r["reward"]) for name, runs in (("raydiff", engine), ("single-process", single))
                  for i, r in enumerate(runs)}
        line_plot(series, args.plot, f"DDPO reward vs wall-clock, {args.batch * args.batches_per_epoch} samples/epoch",
                  "wall-clock since the end of epoch 0 [s]", "reward/mean")
        result["plot"] = args.plot
    print(f"  plot: {args.plot}")
    if args.json:
        import json

        print("JSON " + json.dumps({**result, "ratio": round(ratio, 4)}, default=str))
    if "ratio_k1" in result:
        print(f"RATIO e2e_vs_single_process_timesteps_per_forward_1 {result['ratio_k1']:.3f}")
    print(f"RATIO e2e_vs_single_process {ratio:.3f}")
    return {**result, "ratio": ratio}


if __name__ == "__main__":
    main()
