"""`python -m raydiff.train CONFIG [key.sub=value ...]`: train on an embedded or existing Ray cluster."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from raydiff.config import ConfigError, load_config, to_yaml


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raydiff train", description=__doc__)
    p.add_argument("config", nargs="?", help="YAML config (e.g. configs/tiny_ddpo.yaml); omitted = all defaults")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.num_epochs=3")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--verbose", action="store_true",
                   help="show Ray/Serve/Train/DeepSpeed internals on the console (default: in RUN_DIR/logs/console.log)")
    return p


def final_line(run_dir: Path | str, wall_s: float, log_file: Path | None) -> str:
    """The result: last epoch's reward (4 significant digits), wall time, where the outputs are (path or URI)."""
    from raydiff.console import fmt
    from raydiff.engine.metrics import read_metrics
    from raydiff.engine.storage import redact

    rows = read_metrics(run_dir)
    last = rows[-1] if rows else {}
    run_dir = redact(str(run_dir))
    reward = f"final reward {fmt(last.get('reward/mean'))}, " if "reward/mean" in last else ""
    logs = f" (internals: {log_file})" if log_file else ""
    return f"raydiff: run finished in {fmt(wall_s, 3)} s; {reward}outputs in {run_dir}{logs}"


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_intermixed_args(argv)
    config, overrides = args.config, list(args.overrides)
    if config and "=" in config and not config.endswith((".yaml", ".yml")):
        config, overrides = None, [config] + overrides
    try:
        cfg = load_config(config, overrides)
    except (ConfigError, ValueError) as e:
        print(f"raydiff: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    from raydiff import console

    t0 = time.time()
    from raydiff.engine.storage import Storage, run_location, scratch_dir

    # With output.storage the console log goes to node-local scratch and is uploaded at the end
    # (logs/console.log in run storage); the job's working dir stays free of run outputs.
    remote_logs = cfg.output.storage is not None
    log_file = console.setup(scratch_dir("raydiff-logs-") if remote_logs else cfg.run_dir, args.verbose)
    from raydiff.engine.trainer import Trainer, connect_ray

    connect_ray(cfg)
    try:
        run_dir = Trainer(cfg).run()
    except (ConfigError, ValueError) as e:
        print(f"raydiff: {e}", file=sys.stderr)
        return 2
    except BaseException:
        if log_file:
            print(f"raydiff: run failed; Ray/DeepSpeed logs in {log_file}", file=sys.stderr)
        raise
    finally:
        if remote_logs and log_file and Path(log_file).is_file():
            try:
                Storage(run_location(cfg)).upload_file(log_file, "logs/console.log")
            except Exception as e:  # the log upload must not hide the run's own outcome
                print(f"raydiff: could not upload {log_file} to run storage: {e}", file=sys.stderr)
    print(final_line(run_dir, time.time() - t0, log_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
