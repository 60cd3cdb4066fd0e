"""How much of the on-policy gradient a stale batch's decoupled-PPO gradient carries (tiny DDPO, CPU).

    python bench/stale_signal.py [--staleness 2] [--n 64] [--trials 3]

In one process (a Learner and a RolloutWorker, engine=torch): from the initial weights θ_v,
sample a batch B_stale, then make S real DDPO updates on fresh batches (as training would) to
reach θ_u. At θ_u, without stepping, compute the loss gradient (LoRA parameters) of:
- two independent fresh batches sampled at θ_u (g_fresh_a, g_fresh_b: the on-policy signal);
- B_stale under the decoupled objective (π_prox = θ_u, staleness S, as the learner sees it);
- B_stale treated as fresh (staleness 0: the uncorrected delayed-sample estimator).
cos(g_fresh_a, g_fresh_b) is the ceiling two equally noisy on-policy estimates reach; a stale
estimator with the same signal and noise reaches the same cosine with g_fresh_a.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine  # noqa: E402

import torch  # noqa: E402


class BackwardOnly:
    """Stepper interface: accumulate gradients, never step."""

    def backward(self, loss, groups=None):
        loss.backward()
        return False


def step_gradients(learner, batch, staleness: int) -> list[torch.Tensor]:
    """The decoupled loss's gradient of each denoising step j alone (the train_step loss is their sum)."""
    batch.staleness, batch.max_staleness = torch.full((len(batch),), staleness, dtype=torch.int64), staleness
    algo = learner.algorithm
    params = [p for p in learner.model.unet.parameters() if p.requires_grad]
    prepared = algo.prepare_batch(learner.policy, algo.prepare(batch))
    adv = prepared.advantages.clamp(-algo.config.adv_clip_max, algo.config.adv_clip_max)
    out = []
    for j in range(prepared.log_probs.shape[1]):
        for p in params:
            p.grad = None
        loss, st = algo._per_element_loss(learner.policy, prepared, j, adv, None, prepared.extras.get("prox_is_current"))
        print(f"    step {j}: behaviour_approx_kl {st['behaviour_approx_kl']:.4f}, is_truncated_frac {st['is_truncated_frac']:.4f}")
        loss.backward()
        out.append(torch.cat([p.grad.flatten() for p in params]).clone())
    for p in params:
        p.grad = None
    return out


def gradient(learner, batch, staleness: int) -> torch.Tensor:
    batch.staleness, batch.max_staleness = torch.full((len(batch),), staleness, dtype=torch.int64), staleness
    algo = learner.algorithm
    params = [p for p in learner.model.unet.parameters() if p.requires_grad]
    for p in params:
        p.grad = None
    prepared = algo.prepare_batch(learner.policy, algo.prepare(batch))  # no step follows: the whole batch at once
    algo.train_step(learner.policy, BackwardOnly(), prepared, torch.Generator().manual_seed(0))
    g = torch.cat([p.grad.flatten() for p in params]).clone()
    for p in params:
        p.grad = None
    return g


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny_ddpo_async.yaml")
    p.add_argument("--staleness", type=int, default=2)
    p.add_argument("--n", type=int, default=64, help="samples per batch (each gradient)")
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--first-trial", type=int, default=0)
    p.add_argument("--per-step", action="store_true", help="also: each step's stale gradient, its norm and cosine")
    p.add_argument("--extra", nargs="*", default=[])
    args = p.parse_args(argv)
    from raydiff.config import load_config
    from raydiff.engine.learners.learner import Learner
    from raydiff.engine.rollouts.worker import RolloutWorker
    from raydiff.prompts import load_prompts

    torch.set_num_threads(1)
    cfg = load_config(args.config, ["learner.engine=torch", "learner.num_workers=1", *args.extra])
    per_update = cfg.train.batches_per_epoch * cfg.rollout.num_workers * cfg.sampling.batch_size  # one epoch's samples
    prompts = load_prompts(cfg.prompts.source, cfg.prompts.column, cfg.prompts.limit)
    pick = lambda seed, k=args.n: [prompts[(seed * 7 + i) % len(prompts)] for i in range(k)]
    cos = lambda a, b: float(torch.dot(a, b) / (a.norm() * b.norm() + 1e-30))
    rows = []
    for trial in range(args.first_trial, args.first_trial + args.trials):
        learner = Learner(cfg)
        worker = RolloutWorker(cfg, needs=learner.algorithm.needs)
        worker.set_weights(learner.publish())
        base = 1000 * trial
        stale = worker.generate(pick(base), base)
        for k in range(args.staleness):  # real updates on fresh batches: θ_v -> θ_u
            update = worker.generate(pick(base + 1 + k, per_update), base + 1 + k)
            learner.train(learner.algorithm.prepare(update))
            worker.set_weights(learner.publish())
        fa = gradient(learner, worker.generate(pick(base + 50), base + 50), 0)
        fb = gradient(learner, worker.generate(pick(base + 51), base + 51), 0)
        gs = gradient(learner, stale.index(torch.arange(len(stale))), args.staleness)
        gn = gradient(learner, stale.index(torch.arange(len(stale))), 0)
        row = {"fresh_b": cos(fa, fb), "stale_decoupled": cos(fa, gs), "stale_as_fresh": cos(fa, gn),
               "stale_decoupled_vs_b": cos(fb, gs), "norm_ratio_stale/fresh": float(gs.norm() / fa.norm())}
        if args.per_step:
            fresh_steps = step_gradients(learner, worker.generate(pick(base + 50), base + 50), 0)
            for j, gj in enumerate(step_gradients(learner, stale.index(torch.arange(len(stale))), args.staleness)):
                print(f"    step {j}: |g_stale_j| / |g_fresh| {float(gj.norm() / fa.norm()):.3f}, cos(g_stale_j, g_fresh) "
                      f"{cos(gj, fa):+.3f}, |g_fresh_j| / |g_fresh| {float(fresh_steps[j].norm() / fa.norm()):.3f}", flush=True)
        rows.append(row)
        print(f"  trial {trial}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    result = {"machine": machine(), "staleness": args.staleness, "n": args.n, "trials": args.trials,
              **{f"mean_{k}": round(statistics.fmean(r[k] for r in rows), 3) for k in rows[0]}}
    for k, v in result.items():
        print(f"  {k}: {v}")
    return result


if __name__ == "__main__":
    main()
