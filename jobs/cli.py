"""``synergen``: one subcommand per pipeline stage, each taking ``--config`` and ``--ds``.

Imports of heavy stage modules (Spark, torch, Great Expectations) happen inside each command so that
``synergen --help`` stays instant.

Known failures (``PipelineError``, and the few library errors they surface as when a stage does not
wrap them: an unreadable Parquet file, a missing path) are printed as one ``synergen: ...`` line with
exit status 2 and no traceback; ``--debug`` or ``SYNERGEN_DEBUG=1`` prints the traceback too. Anything
else is a bug and keeps its traceback. Airflow calls the stage functions, not this module, so its task
logs keep every traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import traceback

from synergen_core.config import Config, ConfigError, load_config, parse_ds
from synergen_core.errors import PipelineError

EXIT_KNOWN_FAILURE = 2  # also argparse's status for a bad command line; 1 (Python's) is left to bugs

EPILOG = """\
exit status: 0 done; 2 a known failure (bad command line, configuration or input data, a missing upstream
partition), explained in one "synergen: ..." line on stderr; 1 an unexpected error (a bug), with its
traceback. --debug (or SYNERGEN_DEBUG=1) prints the traceback of known failures too.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors as one ``synergen: ...`` line (no usage block), like every other failure."""

    def error(self, message: str):
        command = self.prog.removeprefix("synergen").strip()
        self.exit(EXIT_KNOWN_FAILURE, f"synergen: {command + ': ' if command else ''}{message}; "
                                      f"see `{self.prog} --help`\n")


def _common(p: argparse.ArgumentParser, ds_required: bool = True, ds_help: str = "logical day (= Airflow ds)"):
    p.add_argument("--config", help="YAML config file (defaults + SYNERGEN__* environment otherwise)")
    p.add_argument("--ds", required=ds_required, type=_ds, help=ds_help + ", YYYY-MM-DD")
    # Also accepted after the command; SUPPRESS keeps the subcommand from resetting a --debug given before it.
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="print the traceback of a known failure too (or SYNERGEN_DEBUG=1)")
    p.set_defaults(command_parser=p)  # for errors found after parsing, reported like argparse's own


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


def cmd_embed(cfg: Config, args) -> None:
    from jobs import stages

    _print(stages.item_embeddings(cfg, args.ds))


def cmd_semantic_ids(cfg: Config, args) -> None:
    from jobs import stages

    _print(stages.semantic_ids(cfg, args.ds))


def cmd_train(cfg: Config, args) -> None:
    from jobs import stages

    if args.fresh:
        cfg.train.resume = False
    # in this process, as every rank does under torchrun (stages.train is what starts torchrun)
    _print(stages.run_stage("train", cfg, args.ds, args.group, variants=args.variant, protocols=args.protocol))


def cmd_evaluate(cfg: Config, args) -> None:
    from jobs import stages

    _print(stages.evaluate(cfg, args.ds, variants=args.variant, protocols=args.protocol))


def _stage(name: str):
    from jobs import stages

    return stages.STAGES[name]


def cmd_score(cfg: Config, args) -> None:
    from pathlib import Path

    from jobs import stages

    model_dir = None
    if args.model:
        if args.model.startswith("models:/"):
            cfg.score.model = args.model
        else:
            model_dir = Path(args.model)
    if args.retriever:
        cfg.score.retriever = args.retriever
    out = {"score": stages.score(cfg, args.ds, model_dir=model_dir),
           "validate_candidates": stages.validate_candidates(cfg, args.ds)}
    if not args.no_publish:
        out["publish"] = stages.publish(cfg, args.ds)
    _print(out)


def format_status(st: dict, metrics: tuple[str, ...] = ("all.ndcg@10", "rec.ndcg@10", "rec.recall@10", "search.ndcg@10",
                                                         "search.recall@10", "rec.rank_auc")) -> str:
    """``synergen_core.registry.status`` as the lines ``synergen registry`` prints."""
    from synergen_core.registry import CHALLENGER, CHAMPION

    lines = [f"registered model {st['name']}: {st['versions']} version(s)"]
    for alias in (CHAMPION, CHALLENGER):
        d = st.get(alias)
        if d is None:
            lines.append(f"  {alias}: none")
            continue
        figures = ", ".join(f"{m} {d['metrics'][m]:.4f}" for m in metrics if m in d["metrics"])
        when = f", promoted {d['promoted_at']}" if alias == CHAMPION and d["promoted_at"] else ""
        lines.append(f"  {alias}: version {d['version']} (ds {d['ds']}, {d['protocol']}, "
                     f"semantic IDs {d['semantic_ids_ds']}{when})")
        if figures:
            lines.append(f"    {figures}")
        if alias == CHALLENGER and d.get("gate_reason"):
            lines.append(f"    not promoted: {d['gate_reason']}")
    if st.get("history"):
        lines.append("  champions: " + " -> ".join(f"v{h['version']}" for h in st["history"]))
    return "\n".join(lines)


def registry_report(cfg: Config, rollback_to: str | None = None, as_json: bool = False) -> str:
    """What ``synergen registry`` prints: the status, after a rollback when ``rollback_to`` is given
    ("previous" = the champion before the current one)."""
    from synergen_core import registry

    lines = []
    if rollback_to is not None:
        done = registry.rollback(cfg, None if rollback_to in ("", "previous") else rollback_to)
        lines.append(f"champion: version {done['previous']} -> {done['champion']}")
    st = registry.status(cfg)
    lines.append(json.dumps(st, indent=2, default=str) if as_json else format_status(st))
    return "\n".join(lines)


def cmd_registry(cfg: Config, args) -> None:
    print(registry_report(cfg, args.rollback, args.json))


def cmd_run(cfg: Config, args) -> None:
    from jobs import pipeline

    # the whole result is in its summary_file
    print(pipeline.summary(cfg, pipeline.run_default(cfg, dag_days=args.dag_days)))


def _rollback_version(text: str) -> str:
    if text == "previous" or re.fullmatch(r"[1-9][0-9]*", text):
        return text
    raise argparse.ArgumentTypeError(f"bad version {text!r}: expected a registered version number "
                                     f"(`synergen registry` lists them), or nothing for the previous champion")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="synergen",
        description="Batch pipeline for one generative model serving personalized search and recommendation.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true",
                        help="print the traceback of a known failure too (or SYNERGEN_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _data_commands(sub)
    _model_commands(sub)
    _serving_commands(sub)
    _pipeline_commands(sub)
    return parser


def _data_commands(sub) -> None:
    """Raw logs to the model's inputs: generate, ingest, validate, sessionize, embed, semantic-ids."""
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

    p = sub.add_parser("embed", help="text vectors of items and queries (new or changed texts only) and "
                                     "collaborative item vectors (Spark)")
    _common(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("semantic-ids", help="RQ-VAE semantic IDs of every item: train or reuse, assign (Spark), "
                                            "make unique, validate")
    _common(p)
    p.set_defaults(func=cmd_semantic_ids)


def _model_commands(sub) -> None:
    """Training and the registry's gate: train, evaluate, register, promote."""
    from typing import get_args

    from synergen_core.config import VariantName

    variants = list(get_args(VariantName))
    p = sub.add_parser("train", help="train the model (and trained baselines) on a day's splits; resumes after a kill")
    _common(p)
    p.add_argument("--variant", action="append", choices=variants, help="repeatable (default: train.variants)")
    p.add_argument("--protocol", action="append", choices=["loo", "temporal"], help="repeatable (default: train.protocols)")
    p.add_argument("--fresh", action="store_true", help="ignore existing checkpoints and train from scratch")
    p.add_argument("--group", help="the pipeline run (e.g. Airflow run id) whose MLflow run this joins")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="full-catalog and ranking metrics of the trained models and baselines")
    _common(p)
    p.add_argument("--variant", action="append", choices=variants, help="repeatable (default: every trained one)")
    p.add_argument("--protocol", action="append", choices=["loo", "temporal"], help="repeatable (default: train.protocols)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("register", help="register the day's trained model as a new version in the MLflow registry")
    _common(p)
    p.set_defaults(func=lambda cfg, args: _print(_stage("register")(cfg, args.ds)))

    p = sub.add_parser("promote", help="promotion gate: champion if not worse than the current one on the same "
                                       "data, else challenger")
    _common(p)
    p.set_defaults(func=lambda cfg, args: _print(_stage("promote")(cfg, args.ds)))


def _serving_commands(sub) -> None:
    """Serving the champion: score, registry."""
    p = sub.add_parser("score", help="candidate lists per user (rec) and per user and query (search): score "
                                     "(Spark + faiss + ranking head), validate, publish")
    _common(p)
    p.add_argument("--model", help="models:/NAME@ALIAS, models:/NAME/VERSION, or a model.pt path "
                                   "(default: score.model, the champion)")
    p.add_argument("--retriever", choices=["dense", "generative"], help="override score.retriever")
    p.add_argument("--no-publish", action="store_true", help="score and validate only; leave the day staged")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("registry", help="champion and challenger with their metrics; roll the champion back")
    _common(p, ds_required=False, ds_help="unused")
    p.add_argument("--rollback", nargs="?", const="previous", metavar="VERSION", type=_rollback_version,
                   help="move the champion alias back: to VERSION, or to the previous champion")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=cmd_registry)


def _pipeline_commands(sub) -> None:
    """The whole job and its configuration: run, config."""
    p = sub.add_parser("run", help="the main job on the embedded default (generated logs)")
    _common(p, ds_required=False, ds_help="unused: the default runs every generated day")
    p.add_argument("--dag-days", type=int, default=2, metavar="N",
                   help="run the DAG for the last N generated days, the days before validated as history "
                        "(default 2: the last day's evaluation then measures the lists served the day before)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("config", help="print the effective configuration")
    _common(p, ds_required=False, ds_help="unused")
    p.set_defaults(func=cmd_config)


def check_day_order(args) -> None:
    """A range given backwards is a usage error, not an empty range run silently."""
    last_ds, from_ds = getattr(args, "last_ds", None), getattr(args, "from_ds", None)
    if last_ds and args.ds and last_ds < args.ds:
        args.command_parser.error(f"--last-ds {last_ds} is before --ds {args.ds}: give the first day as --ds "
                                  f"and the last as --last-ds")
    if from_ds and args.ds and from_ds > args.ds:
        args.command_parser.error(f"--from-ds {from_ds} is after --ds {args.ds}: --from-ds is the first day to "
                                  f"rebuild, --ds the last")


_PARQUET_PATH = re.compile(r"""['"]?((?:file:)?/[^\s'"]+?\.parq(?:uet)?)\b""", re.IGNORECASE)


def _parquet_file_in_traceback(e: BaseException) -> str | None:
    """The Parquet file a frame was reading when ``e`` was raised (pyarrow's ParquetFile and read_schema
    leave the path out of their message): the innermost local variable naming one."""
    frames = []
    tb = e.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    for frame in reversed(frames):
        for value in frame.f_locals.values():
            if isinstance(value, (str, os.PathLike)) and str(value).lower().endswith((".parquet", ".parq")):
                return str(value)
    return None


def _clean_path(path: str) -> str:
    return re.sub(r"^file:(//)?", "", path)


def _arrow_failure(e: BaseException) -> str | None:
    """pyarrow's error on a corrupt or truncated Parquet file (ArrowInvalid, ArrowIOError)."""
    text = str(e)
    if "parquet" not in text.lower():
        return None  # another Arrow error: a bug until shown otherwise
    quoted = _PARQUET_PATH.search(text)
    path = quoted.group(1) if quoted else _parquet_file_in_traceback(e)
    cause = text.rsplit("': ", 1)[-1].split(". ")[0].strip().rstrip(".")
    where = _clean_path(path) if path else "a Parquet file (--debug shows which)"
    return f"{where}: not a readable Parquet file ({cause}); replace it or move it out of its partition"


def _spark_failure(e: BaseException) -> str | None:
    """Spark's error (AnalysisException, SparkException, a Py4J error) on an unreadable or missing Parquet
    path: the file and the one-line cause, out of a Java message that is mostly a stack trace."""
    text = str(e)
    condition = re.search(r"\[([A-Z_]+(?:\.[A-Z_]+)?)\]", text)
    condition = condition.group(1) if condition else ""
    if condition == "PATH_NOT_FOUND":
        path = re.search(r"Path does not exist: (\S+?)\.?(?:\s|$)", text)
        return (f"{_clean_path(path.group(1)) if path else 'an input path'}: does not exist; check --ds and lake.root, "
                f"or run the stage that writes it first")
    unreadable = (condition.startswith(("FAILED_READ_FILE", "CANNOT_READ_FILE_FOOTER"))
                  or "is not a Parquet file" in text or "Could not read footer" in text)
    if not unreadable:
        return None  # another Spark error: a bug until shown otherwise
    path = (re.search(r"(?:reading file|for file:?|file) ((?:file:)?/\S+?)\.?(?:\s|$)", text)
            or _PARQUET_PATH.search(text))
    if "Could not read footer" in text:
        cause = "could not read its footer"
    elif "is not a Parquet file" in text:
        cause = "not a Parquet file"
    else:
        causes = re.findall(r"Caused by: [\w.$]+: (.+)", text)
        cause = causes[-1].strip()[:200] if causes else condition
    where = _clean_path(path.group(1)) if path else "a Parquet file (--debug shows which)"
    return f"{where}: not a readable Parquet file ({cause}); replace it or move it out of its partition"


def known_failure(e: BaseException) -> str | None:
    """The one-line message for a known failure, or None for an unexpected error (a bug: keep its traceback).
    Library errors are recognized by their defining module so that reading an error imports nothing heavy."""
    if isinstance(e, PipelineError):
        return str(e)
    module = type(e).__module__ or ""
    if module.startswith("pyarrow"):
        return _arrow_failure(e)
    if module.startswith(("pyspark", "py4j")):
        return _spark_failure(e)
    if isinstance(e, FileNotFoundError):
        path = e.filename or str(e) or "a file"  # pyarrow raises FileNotFoundError(path)
        return (f"{path}: no such file or directory; check --ds, --config and lake.root, or run the stage "
                f"that writes it first")
    return None


def _debug_requested(args, environ) -> bool:
    # The command line's entry point is the one place that reads SYNERGEN_DEBUG.
    return bool(getattr(args, "debug", False)) or environ.get("SYNERGEN_DEBUG", "").lower() in ("1", "true", "yes")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_day_order(args)
    debug = _debug_requested(args, os.environ)
    try:
        cfg = load_config(args.config)
        args.func(cfg, args)
    except Exception as e:
        message = known_failure(e)
        if message is None:
            raise  # a bug: Python prints the traceback, exit status 1
        if debug:
            traceback.print_exc()
        print(f"synergen: {message}", file=sys.stderr)
        return EXIT_KNOWN_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
