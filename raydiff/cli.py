"""`raydiff` console script: train, make-tiny, serve-rewards, plan, eval, doctor."""

from __future__ import annotations

import argparse
import sys


def _make_tiny(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="raydiff make-tiny", description="Build a tiny random-weight model (diffusers SD/SDXL/SD3/FLUX or CLIP reward), offline.")
    p.add_argument("--kind", choices=["sd", "sdxl", "sd3", "flux", "clip"], default="sd")
    p.add_argument("dir", help="output folder")
    args = p.parse_args(argv)
    if args.kind == "clip":
        from raydiff.models.tiny_clip import build_tiny_clip

        print(build_tiny_clip(args.dir))
        return 0
    from raydiff.models.tiny import build_tiny

    print(build_tiny(args.kind, args.dir))
    return 0


def _serve_rewards(argv: list[str]) -> int:
    from raydiff.rewards.serve import main as serve_main

    return serve_main(argv) or 0


def _plan(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="raydiff plan", description="Predicted peak GPU memory per role, from the model's architecture (no weights, no GPU).")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for train")
    args = p.parse_args(argv)
    from raydiff.config import load_config
    from raydiff.engine.cluster.plan import format_plan, plan

    cfg = load_config(args.config, args.overrides)
    estimates = plan(cfg)
    print(format_plan(cfg, estimates))
    return 0 if all(e.fits for e in estimates) else 1


COMMANDS = {
    "train": lambda argv: __import__("raydiff.train", fromlist=["main"]).main(argv),
    "make-tiny": _make_tiny,
    "serve-rewards": _serve_rewards,
    "plan": _plan,
    "eval": lambda argv: __import__("raydiff.eval.cli", fromlist=["main"]).main(argv),
    "doctor": lambda argv: __import__("raydiff.doctor", fromlist=["main"]).main(argv),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(f"usage: raydiff {{{','.join(COMMANDS)}}} [args...]", file=sys.stderr)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
