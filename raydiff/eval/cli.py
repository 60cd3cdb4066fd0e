"""`raydiff eval`: score a checkpoint (or a base model) on a prompt set with the served rewards.

    raydiff eval --checkpoint runs/tiny_ddpo --base tiny://sd --prompts parti:Animals \
        --rewards brightness,clip_score:0.5 --num-per-prompt 4 --out runs/tiny_ddpo/eval

Writes eval.json, eval.md, grid_<policy>.png (and compare_grid.png) into --out. With two
policies (--checkpoint + --base, or --checkpoint + --compare DIR2) the report has the paired
delta (first − second) with its 95% CI.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import time

import numpy as np

from raydiff.eval.prompts import resolve_prompt_set
from raydiff.eval.report import geneval_section, write_report
from raydiff.eval.sampling import PolicySpec, base_policy, checkpoint_policy, score_policy
from raydiff.eval.stats import aggregate, paired_delta

log = logging.getLogger("raydiff.eval")


def parse_rewards(text: str) -> list[tuple[str, float]]:
    """`a,b:0.5` -> [("a", 1.0), ("b", 0.5)]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, w = part.partition(":")
        try:
            out.append((name, float(w) if w else 1.0))
        except ValueError:
            raise ValueError(f"--rewards {part!r}: weight must be a number (name or name:weight)") from None
    if not out:
        raise ValueError("--rewards needs at least one reward name")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raydiff eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="run dir (latest checkpoint), step_* dir, or its learner/export folder")
    p.add_argument("--base", help="base model (hub id, diffusers folder, tiny://sd); with --checkpoint it is also compared")
    p.add_argument("--compare", help="a second checkpoint to compare against (delta = first − this)")
    p.add_argument("--prompts", default="simple_animals", help="packaged set (simple_animals, activities, geneval, parti, parti:<Category>) or a file")
    p.add_argument("--category", help="PartiPrompts category (same as --prompts parti:<Category>)")
    p.add_argument("--rewards", default="brightness", help="comma list of served rewards, each name or name:weight")
    p.add_argument("--num-per-prompt", type=int, default=4, help="samples per prompt (K)")
    p.add_argument("--limit", type=int, help="use the first N prompts")
    p.add_argument("--per-tag", type=int, help="GenEval: the first N prompts of each tag (all six tags in a short run)")
    p.add_argument("--steps", type=int, help="Denoising steps (default: the checkpoint's sampling.eval_num_steps, else its num_steps, else 50)")
    p.add_argument("--guidance", type=float, help="CFG scale (default: the checkpoint's, else 5.0)")
    p.add_argument("--eta", type=float, help="DDIM eta (default: the checkpoint's, else 1.0)")
    p.add_argument("--resolution", type=int, help="image side in pixels (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8, help="images per actor call")
    p.add_argument("--workers", type=int, default=1, help="sampling actors per policy")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per sampling actor")
    p.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per sampling actor")
    p.add_argument("--torch-threads", type=int, default=1, help="torch threads per sampling actor (CPU)")
    p.add_argument("--reward-app", default="raydiff-rewards", help="Serve app of the rewards (deployed if absent)")
    p.add_argument("--grid-prompts", type=int, default=8, help="prompts shown in the image grids")
    p.add_argument("--out", default="eval_out", help="output folder")
    p.add_argument("--ray-address", default=None, help="Ray cluster (default: RAY_ADDRESS or a local one)")
    p.add_argument("--verbose", action="store_true", help="show Ray/Serve internals on the console (default: OUT/logs/console.log)")
    return p


def policies(args) -> list[PolicySpec]:
    if not (args.checkpoint or args.base):
        raise ValueError("give --checkpoint DIR or --base MODEL (or both)")
    out = []
    if args.checkpoint:
        out.append(checkpoint_policy(args.checkpoint, args.base, "checkpoint"))
    if args.compare:
        out.append(checkpoint_policy(args.compare, args.base, "compare"))
    if args.base and len(out) < 2:
        res = args.resolution or (out[0].model.get("resolution") if out else None)
        dtype = out[0].model.get("dtype", "auto") if out else "auto"
        out.append(base_policy(args.base, res, dtype))
    if args.resolution:
        for p in out:
            p.model["resolution"] = args.resolution
    return out


def connect(address: str | None, demand: float) -> None:
    """Join `address`/RAY_ADDRESS, else start a local cluster of our own (address="local": never a stray one)."""
    import ray

    from raydiff import console

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = console.ray_init_kwargs()
    if address:
        ray.init(address=address, log_to_driver=not quiet, **quiet)
    else:
        env = console.worker_env(console.is_verbose())
        if os.environ.get("RAYDIFF_CACHE"):
            env["RAYDIFF_CACHE"] = os.environ["RAYDIFF_CACHE"]
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(demand)), include_dashboard=False,
                 runtime_env={"env_vars": env} if env else None, **quiet)
    console.after_ray_init()


def _clean(x):
    """NaN -> None so eval.json is strict JSON."""
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def evaluate(args) -> dict:
    from raydiff.rewards.client import ensure_reward_service

    rewards = parse_rewards(args.rewards)
    pset = resolve_prompt_set(args.prompts, args.category, args.limit, args.per_tag)
    specs = policies(args)
    sampling = next((p.sampling for p in specs if p.sampling), None) or {}
    steps = args.steps or sampling.get("eval_num_steps") or sampling.get("num_steps", 50)
    guidance = args.guidance if args.guidance is not None else sampling.get("guidance_scale", 5.0)
    eta = args.eta if args.eta is not None else sampling.get("eta", 1.0)
    K = args.num_per_prompt
    if K < 1:
        raise ValueError("--num-per-prompt must be >= 1")
    connect(args.ray_address, args.workers * args.num_cpus + 1)
    score = ensure_reward_service(rewards, app_name=args.reward_app, reuse="by_name")  # served as configured there
    result = {"prompt_set": pset.name, "prompts": pset.prompts, "metadata": pset.metadata,
              "num_prompts": len(pset.prompts), "num_per_prompt": K, "steps": steps, "guidance_scale": guidance,
              "eta": eta, "seed": args.seed, "rewards": rewards, "reward_app": args.reward_app, "policies": {}}
    raw, grids = {}, {}
    worker_kwargs = dict(num_steps=steps, guidance_scale=guidance, eta=eta, torch_threads=args.torch_threads)
    for spec in specs:
        t0 = time.perf_counter()
        scores, grids[spec.label] = score_policy(
            spec, pset.prompts, K, score, keep_prompts=args.grid_prompts, batch_size=args.batch_size, seed=args.seed,
            num_workers=args.workers, worker_kwargs=worker_kwargs, num_cpus=args.num_cpus, num_gpus=args.num_gpus)
        raw[spec.label] = scores
        result["policies"][spec.label] = {
            "source": spec.source, "model": spec.model.get("path"),
            "weights": "learner.pt" if spec.learner_pt else "export" if spec.export_dir else "none",
            "wall_s": round(time.perf_counter() - t0, 3),
            "aggregate": {n: aggregate(s) for n, s in scores.items()},
            "per_prompt": [{n: {"mean": float(np.nanmean(s[i])), "std": float(np.nanstd(s[i], ddof=1)) if K > 1 else None}
                            for n, s in scores.items()} for i in range(len(pset.prompts))],
            "scores": {n: s.tolist() for n, s in scores.items()},
        }
    if any("tag" in m for m in pset.metadata):  # GenEval prompts: the benchmark's per-tag table
        name = next((n for n, _ in rewards if n == "geneval" or n.startswith("geneval")), None)
        version = score.handles[name].info.remote().result().get("version") if name else None
        result["geneval"] = geneval_section(pset.metadata, raw, name, version)
    if len(specs) == 2:
        a, b = (s.label for s in specs)
        result["comparison"] = {"a": a, "b": b, "delta": {n: paired_delta(raw[a][n], raw[b][n]) for n in raw[a]}}
    captions = [p for p in pset.prompts for _ in range(K)]
    result = _clean(result)
    result["files"] = write_report(result, args.out, grids, captions)
    return result


def summary_table(result: dict) -> str:
    """Reward means with 95% CIs per policy (and the paired delta), 4 significant digits."""
    from raydiff.console import fmt

    rows = [("policy", "reward", "mean", "95% CI", "n")]
    for label, pol in result["policies"].items():
        for name, s in pol["aggregate"].items():
            rows.append((label, name, fmt(s["mean"]), f"[{fmt(s['ci_low'])}, {fmt(s['ci_high'])}]", f"{s['n']} {s['unit']}s"))
    if "comparison" in result:
        c = result["comparison"]
        for name, d in c["delta"].items():
            rows.append((f"{c['a']} − {c['b']}", name, fmt(d["mean"]), f"[{fmt(d['ci_low'])}, {fmt(d['ci_high'])}]", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: list[str] | None = None) -> int:
    import ray

    from raydiff import console

    args = build_parser().parse_args(argv)
    if not ray.is_initialized():  # a CLI process: its own console; inside a caller's Ray session leave logging alone
        console.setup(args.out, args.verbose)
    try:
        result = evaluate(args)
    except ValueError as e:
        print(f"raydiff eval: error: {e}")
        return 2
    print(summary_table(result))

    def num(x):  # NaN was written as null
        return "n/a" if x is None else f"{x:.3f}"

    for label, table in (result.get("geneval") or {}).get("policies", {}).items():
        tags = ", ".join(f"{t} {num(r['accuracy'])}" for t, r in table["tags"].items())
        print(f"{label}: GenEval overall {num(table['overall'])} ({tags})")
    print(f"wrote {result['files']['json']}")
    return 0
