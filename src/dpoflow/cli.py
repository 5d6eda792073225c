"""`dpoflow` command line: one subcommand per step, each a thin call of the step function.

Conventions shared by every step command: `-c/--config` (default params.yaml), repeatable
`--set key.path=value`, `--out DIR` (default <run.output_dir>/<run.name>/<step>).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dpoflow.config import ConfigError, config_dict, config_hash, load_config


def _add_common(parser: argparse.ArgumentParser, out: bool = True) -> None:
    parser.add_argument("-c", "--config", default="params.yaml", help="run config (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set data.mode=quarantine (repeatable)")
    if out:
        parser.add_argument("--out", default=None, help="output folder (default: <output_dir>/<run name>/<step>)")


def _out_dir(args, cfg, step: str) -> Path:
    return Path(args.out) if args.out else Path(cfg.run.output_dir) / cfg.run.name / step


def cmd_config_show(args) -> int:
    cfg = load_config(args.config, args.overrides)
    print(json.dumps(config_dict(cfg), indent=2))
    print(f"config_hash: {config_hash(cfg)}")
    return 0


def cmd_data(args) -> int:
    from dpoflow.data.step import run_data

    overrides = list(args.overrides)
    if args.source:
        overrides.append(f"data.source={args.source}")
    if args.mode:
        overrides.append(f"data.mode={args.mode}")
    cfg = load_config(args.config, overrides)
    out_dir = _out_dir(args, cfg, "data")
    result = run_data(cfg.data, out_dir, seed=cfg.run.seed)
    stats = result.stats
    print(f"data: {stats['rows_in']} rows in, {stats['kept']} kept, quarantined {stats['quarantined'] or 'none'}")
    print(f"data: splits {stats['splits']} -> {out_dir}")
    if stats["quarantined"]:
        print(f"data: bad rows with reasons in {out_dir / 'quarantine.jsonl'}")
    return 0


def cmd_run(args) -> int:
    from dpoflow.runner import run_pipeline

    run_pipeline(load_config(args.config, args.overrides))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dpoflow", description="Reproducible DPO alignment pipeline.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the whole pipeline from the config (the default demo: make run)")
    _add_common(run, out=False)
    run.set_defaults(func=cmd_run)

    config = sub.add_parser("config", help="show the resolved config and its hash")
    config_sub = config.add_subparsers(dest="config_command", required=True, metavar="ACTION")
    show = config_sub.add_parser("show", help="print the resolved config and its stable hash")
    _add_common(show, out=False)
    show.set_defaults(func=cmd_config_show)

    data = sub.add_parser("data", help="load, validate, split and fingerprint a dataset")
    _add_common(data)
    data.add_argument("--source", help="a .jsonl/.parquet/.csv file or save_to_disk folder (overrides data.source)")
    data.add_argument("--mode", choices=["strict", "quarantine"], help="what to do with bad rows")
    data.set_defaults(func=cmd_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as error:
        print(f"dpoflow: {error}", file=sys.stderr)
        return 2
    except (ValueError, FileNotFoundError) as error:
        print(f"dpoflow {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
