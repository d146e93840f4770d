"""`lf-dist` command line: train (and version). User mistakes end in one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import sys

from lf_dist import __version__
from lf_dist.errors import UserError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lf-dist", description="Run LLaMA-Factory fine-tuning configs at any scale.")
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train from a LLaMA-Factory YAML/JSON config")
    train.add_argument("config", help="path to a .yaml/.yml/.json config")
    train.add_argument("overrides", nargs="*", help="key=value overrides (YAML-typed), e.g. learning_rate=5e-4")
    sub.add_parser("version", help="print the version")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(f"lf-dist {__version__}")
        return 0
    try:
        from lf_dist.configure import load_config
        from lf_dist.log import get_logger

        cfg = load_config(args.config, args.overrides)
        if cfg.ignored:
            get_logger().info("notice: these keys have no effect in lf-dist: " + ", ".join(sorted(cfg.ignored)))
        from lf_dist.launchers import launch

        return launch(args.config, args.overrides, cfg)
    except UserError as err:
        print(f"lf-dist: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lf-dist: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
