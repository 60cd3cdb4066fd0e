"""`python -m raydiff.train CONFIG [key.sub=value ...]`: train on an embedded or existing Ray cluster."""

from __future__ import annotations

import argparse
import logging
import sys

from raydiff.config import ConfigError, load_config, to_yaml


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raydiff train", description=__doc__)
    p.add_argument("config", nargs="?", help="YAML config (e.g. configs/tiny_ddpo.yaml); omitted = all defaults")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.num_epochs=3")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from raydiff.engine.trainer import Trainer, connect_ray

    connect_ray(cfg)
    try:
        run_dir = Trainer(cfg).run()
    except (ConfigError, ValueError) as e:
        print(f"raydiff: {e}", file=sys.stderr)
        return 2
    print(f"raydiff: run finished; outputs in {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
