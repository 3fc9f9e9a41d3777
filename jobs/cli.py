"""``synergen``: one subcommand per pipeline stage, each taking ``--config`` and ``--ds``.

Imports of heavy stage modules (Spark, torch, Great Expectations) happen inside each command so that
``synergen --help`` stays instant.
"""
from __future__ import annotations

import argparse
import json
import sys

from synergen_core.config import Config, ConfigError, load_config, parse_ds


def _common(p: argparse.ArgumentParser, ds_required: bool = True, ds_help: str = "logical day (= Airflow ds)"):
    p.add_argument("--config", help="YAML config file (defaults + SYNERGEN__* environment otherwise)")
    p.add_argument("--ds", required=ds_required, type=_ds, help=ds_help + ", YYYY-MM-DD")


def _ds(text: str) -> str:
    try:
        return parse_ds(text).isoformat()
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_config(cfg: Config, args) -> None:
    import yaml

    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")


def cmd_generate(cfg: Config, args) -> None:
    from jobs import generate

    if args.ds:
        cfg.generate.start_ds = args.ds
    for key in ("events", "days", "seed", "users", "items"):
        if getattr(args, key) is not None:
            setattr(cfg.generate, key, getattr(args, key))
    _print(generate.run(cfg, cfg.generate.start_ds, out_root=args.out))


def cmd_ingest(cfg: Config, args) -> None:
    from jobs import ingest

    _print(ingest.run(cfg, args.format, args.path, ds=args.ds))


def cmd_validate(cfg: Config, args) -> None:
    if args.table:  # a partial check, e.g. while fixing one table: not a tracked pipeline stage
        from jobs import validate

        _print(validate.run_range(cfg, args.ds, args.last_ds or args.ds, tables=args.table))
    else:
        from jobs import stages

        _print(stages.validate_raw(cfg, args.ds, last_ds=args.last_ds))


def cmd_sessionize(cfg: Config, args) -> None:
    from jobs import stages

    _print(stages.sessionize(cfg, args.ds, from_ds=args.from_ds))


def cmd_run(cfg: Config, args) -> None:
    from jobs import pipeline

    _print(pipeline.run_default(cfg))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="synergen",
        description="Batch pipeline for one generative model serving personalized search and recommendation.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="write seeded synthetic raw logs (the embedded default input)")
    _common(p, ds_required=False, ds_help="first day to generate (default: generate.start_ds)")
    for key in ("events", "days", "seed", "users", "items"):
        p.add_argument(f"--{key}", type=int, help=f"override generate.{key}")
    p.add_argument("--out", help="lake root to write raw tables under (default: lake.root)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("ingest", help="convert real logs into the raw contract")
    p.add_argument("format", choices=["movielens", "amazon-seq", "amazon-json"])
    p.add_argument("--path", required=True, help="folder holding the source files")
    _common(p, ds_required=False, ds_help="write only this day (default: every day in the source)")
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("validate", help="validate a day of raw tables; quarantine bad rows with a reason")
    _common(p)
    p.add_argument("--table", action="append", choices=["catalog", "search_events", "browse_events"],
                   help="only these tables (repeatable; default all)")
    p.add_argument("--last-ds", type=_ds, help="validate every day from --ds to this day as one batch (backfills)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("sessionize", help="events -> sessions, token sequences, vocabularies and splits (Spark)")
    _common(p)
    p.add_argument("--from-ds", type=_ds, help="bulk: rebuild from the state before this day up to --ds in one job")
    p.set_defaults(func=cmd_sessionize)

    p = sub.add_parser("run", help="the main job on the embedded default (generated logs)")
    _common(p, ds_required=False, ds_help="unused: the default runs every generated day")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("config", help="print the effective configuration")
    _common(p, ds_required=False, ds_help="unused")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = load_config(args.config)
        args.func(cfg, args)
    except ConfigError as e:
        print(f"synergen: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
