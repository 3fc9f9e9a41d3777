"""Known failures reach the command-line user as one ``synergen: ...`` line naming the file, key or day and
the fix, with exit status 2 and no traceback; ``--debug`` or ``SYNERGEN_DEBUG=1`` adds the traceback; an
unexpected error (a bug) keeps its traceback. The cases run the real CLI in a subprocess, with a temporary
lake and MLflow on SQLite; the library-error translations and config checks are also tested in-process.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from jobs import cli, generate
from synergen_core.config import Config, ConfigError, load_config, with_overrides
from synergen_core.errors import PipelineError


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    # Only this test's SYNERGEN__* and SYNERGEN_DEBUG: a developer's own settings must not leak in.
    base = {k: v for k, v in os.environ.items() if not k.startswith("SYNERGEN")}
    return subprocess.run([sys.executable, "-m", "jobs.cli", *args], env={**base, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


# A library's own log record (MLflow says so when it creates its database): not part of the failure.
LOG_RECORD = re.compile(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d (INFO|WARNING) ")


def assert_one_line_failure(out: subprocess.CompletedProcess, *names: str) -> str:
    """Exit status 2; stderr ends with at most two lines starting with ``synergen:`` that name each of
    ``names``, and holds nothing else but library log records: no traceback, no Java dump."""
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr
    first = next((i for i, line in enumerate(lines) if line.startswith("synergen:")), None)
    assert first is not None and len(lines) - first <= 2, out.stderr
    assert all(LOG_RECORD.match(line) for line in lines[:first]), out.stderr
    message = "\n".join(lines[first:])
    for name in names:
        assert name in message, (name, message)
    return message


@pytest.fixture
def lake_env(tmp_path) -> dict[str, str]:
    return {"SYNERGEN__LAKE__ROOT": str(tmp_path / "lake"),
            "SYNERGEN__MLFLOW__TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
            "SYNERGEN__MLFLOW__ARTIFACT_ROOT": str(tmp_path / "artifacts")}


# (name, config file text or None, extra environment, arguments, texts the message must contain).
# "{cfg}" in arguments and texts is the config file's path. `synergen config` is cheap to start; the
# range and version checks happen while parsing, before any stage module is imported.
CHEAP_CASES = [
    ("garbage YAML", "spark:\n  master: [local\nmodel: {}\n", {}, ["config", "--config", "{cfg}"],
     ["{cfg}", "not valid YAML", "line 3"]),
    ("YAML not a mapping", "- spark\n- model\n", {}, ["config", "--config", "{cfg}"],
     ["{cfg}", "expected a mapping of sections"]),
    ("unknown key", "spark:\n  mastr: local[2]\n", {}, ["config", "--config", "{cfg}"],
     ["{cfg}", "spark.mastr: unknown key", "'master'"]),
    ("missing config file", None, {}, ["config", "--config", "{cfg}"], ["{cfg}", "does not exist"]),
    ("bad environment value", None, {"SYNERGEN__TRAIN__EPOCHS": "many"}, ["config"],
     ["SYNERGEN__TRAIN__EPOCHS", "train.epochs", "'many'"]),
    ("environment value not YAML", None, {"SYNERGEN__MODEL__DROPOUT": "[0.1"}, ["config"],
     ["SYNERGEN__MODEL__DROPOUT", "not valid YAML"]),
    ("zero where positive", None, {"SYNERGEN__SPARK__SHUFFLE_PARTITIONS": "0"}, ["config"],
     ["SYNERGEN__SPARK__SHUFFLE_PARTITIONS", "spark.shuffle_partitions", "greater than or equal to 1"]),
    ("driver_memory=lots", None, {"SYNERGEN__SPARK__DRIVER_MEMORY": "lots"}, ["config"],
     ["SYNERGEN__SPARK__DRIVER_MEMORY", "spark.driver_memory", "'lots'", "4g"]),
    ("driver_memory=lots in a file", "spark:\n  driver_memory: lots\n", {}, ["config", "--config", "{cfg}"],
     ["{cfg}", "spark.driver_memory", "512m"]),
    ("reversed --ds/--last-ds", None, {}, ["validate", "--ds", "2026-01-03", "--last-ds", "2026-01-01"],
     ["--last-ds 2026-01-01", "--ds 2026-01-03"]),
    ("--from-ds after --ds", None, {}, ["sessionize", "--ds", "2026-01-01", "--from-ds", "2026-01-03"],
     ["--from-ds 2026-01-03", "--ds 2026-01-01"]),
    ("bad ds", None, {}, ["train", "--ds", "2026-02-30"], ["'2026-02-30'", "YYYY-MM-DD"]),
    ("bad rollback version", None, {}, ["registry", "--rollback", "latest"], ["'latest'", "version number"]),
    ("--dag-days past the generated days", None, {"SYNERGEN__GENERATE__DAYS": "2"}, ["run", "--dag-days", "3"],
     ["--dag-days 3", "generate.days (2)"]),
]


@pytest.mark.parametrize("name, text, env, args, names", CHEAP_CASES, ids=[c[0] for c in CHEAP_CASES])
def test_bad_input_is_one_line_naming_it(tmp_path, lake_env, name, text, env, args, names):
    cfg = tmp_path / "c.yaml"
    if text is not None:
        cfg.write_text(text)
    out = run_cli([a.format(cfg=cfg) for a in args], {**lake_env, **env}, tmp_path)
    assert_one_line_failure(out, *(n.format(cfg=cfg) for n in names))


@pytest.mark.parametrize("how", ["--debug before the command", "--debug after it", "SYNERGEN_DEBUG=1"])
def test_debug_shows_the_traceback_of_a_known_failure(tmp_path, lake_env, how):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("spark: [\n")
    args, env = ["config", "--config", str(cfg)], dict(lake_env)
    if how == "--debug before the command":
        args = ["--debug", *args]
    elif how == "--debug after it":
        args = [*args, "--debug"]
    else:
        env["SYNERGEN_DEBUG"] = "1"
    out = run_cli(args, env, tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback (most recent call last)" in out.stderr and "ConfigError" in out.stderr
    assert out.stderr.strip().splitlines()[-1].startswith(f"synergen: {cfg}: not valid YAML")


def test_corrupt_raw_parquet_names_the_file(tmp_path, lake_env):
    """A truncated file under raw/ (a log shipper died mid-copy): validate names it, no traceback."""
    cfg = Config()
    for key, value in {"events": 2_000, "days": 1, "users": 50, "items": 100, "categories": 5}.items():
        setattr(cfg.generate, key, value)
    root = Path(lake_env["SYNERGEN__LAKE__ROOT"])
    generate.run(cfg, "2026-01-01", out_root=root)
    bad = next((root / "raw" / "browse_events" / "ds=2026-01-01").glob("*.parquet"))
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size // 2)
    out = run_cli(["validate", "--ds", "2026-01-01"], lake_env, tmp_path)
    assert_one_line_failure(out, str(bad))


def test_missing_upstream_partition_names_the_day(tmp_path, lake_env):
    out = run_cli(["train", "--ds", "2026-01-05"], lake_env, tmp_path)
    assert_one_line_failure(out, "2026-01-05")


# ---- in-process: the translation of library errors, bugs keep their traceback ------------------------


def truncated_parquet(tmp_path) -> Path:
    import pyarrow as pa

    path = tmp_path / "part-00000.parquet"
    pq.write_table(pa.table({"x": list(range(1000))}), path)
    with open(path, "r+b") as f:
        f.truncate(100)
    return path


@pytest.mark.parametrize("reader", [pq.read_table, pq.ParquetFile, pq.read_schema])
def test_pyarrow_errors_on_a_corrupt_file_name_it(tmp_path, reader):
    """read_table puts the path in its message, ParquetFile and read_schema do not: the CLI finds it in
    the traceback's frames."""
    path = truncated_parquet(tmp_path)
    with pytest.raises(Exception) as e:
        reader(str(path))
    message = cli.known_failure(e.value)
    assert message is not None and message.startswith(f"{path}: not a readable Parquet file"), message
    assert "magic bytes" in message and "\n" not in message


class Py4JJavaError(Exception):
    """Stands in for py4j's (whose constructor needs a live JVM): recognized by its module, like the real one."""


Py4JJavaError.__module__ = "py4j.protocol"

# Spark 4.x messages as pyspark raises them (stack frames shortened).
SPARK_FOOTER = ("An error occurred while calling o36.parquet.\n: org.apache.spark.SparkException: "
                "[FAILED_READ_FILE.CANNOT_READ_FILE_FOOTER] Encountered error while reading file "
                "file:/lake/validated/browse_events/ds=2026-01-01/part-00000.parquet. Could not read footer. "
                "Please ensure that the file is in either ORC or Parquet format.\nIf not, please convert it to a "
                "valid format. SQLSTATE: KD001\n\tat org.apache.spark.sql.errors.QueryExecutionErrors$."
                "cannotReadFooterForFileError(QueryExecutionErrors.scala:1109)\n\tat scala.concurrent.Future")
SPARK_READ = ("An error occurred while calling o54.count.\n: org.apache.spark.SparkException: "
              "[FAILED_READ_FILE.NO_HINT] Encountered error while reading file "
              "file:///lake/validated/browse_events/ds=2026-01-01/part-00000.parquet.  SQLSTATE: KD001\n"
              "\tat org.apache.spark.sql.errors.QueryExecutionErrors$.cannotReadFilesError(Q.scala:1)\n"
              "Caused by: java.lang.RuntimeException: footer is too large: 2927893724to be read\n\tat org.x.Y")
SPARK_NOT_PARQUET = ("An error occurred while calling o9.count.\n: org.apache.spark.SparkException: Job aborted\n"
                     "Caused by: java.lang.RuntimeException: file:/lake/x/ds=2026-01-01/part-1.parquet is not a "
                     "Parquet file. Expected magic number at tail, but found [1, 2, 3, 4]\n\tat org.x.Y")


@pytest.mark.parametrize("text, cause", [(SPARK_FOOTER, "could not read its footer"),
                                         (SPARK_READ, "footer is too large"),
                                         (SPARK_NOT_PARQUET, "not a Parquet file")])
def test_spark_errors_on_a_corrupt_file_name_it_and_the_cause(text, cause):
    message = cli.known_failure(Py4JJavaError(text))
    assert message is not None and "\n" not in message and "org.apache" not in message, message
    assert message.startswith("/lake/") and ".parquet: not a readable Parquet file" in message
    assert cause in message


def test_spark_missing_path_and_other_spark_errors():
    class AnalysisException(Exception):
        pass

    AnalysisException.__module__ = "pyspark.errors.exceptions.captured"
    missing = cli.known_failure(AnalysisException("[PATH_NOT_FOUND] Path does not exist: file:/lake/v/ds=2026-01-02. "
                                                  "SQLSTATE: 42K03"))
    assert missing.startswith("/lake/v/ds=2026-01-02: does not exist"), missing
    # A column that is not there is our code's bug (or a stage's to explain), not a file problem.
    assert cli.known_failure(AnalysisException("[UNRESOLVED_COLUMN.WITH_SUGGESTION] A column ... `foo`")) is None


def test_other_errors_are_bugs_with_a_traceback(tmp_path, monkeypatch, capsys):
    assert cli.known_failure(FileNotFoundError(2, "No such file or directory", "/lake/x")).startswith("/lake/x: ")
    assert cli.known_failure(PipelineError("day 2026-01-01: whatever; do this")) == "day 2026-01-01: whatever; do this"
    assert cli.known_failure(KeyError("oops")) is None

    def buggy(cfg, args):
        raise KeyError("oops")

    monkeypatch.setattr(cli, "cmd_config", buggy)
    for key in [k for k in os.environ if k.startswith("SYNERGEN")]:
        monkeypatch.delenv(key)
    with pytest.raises(KeyError):
        cli.main(["config"])

    def known(cfg, args):
        raise PipelineError("/lake/raw/x.parquet: broken; replace it")

    monkeypatch.setattr(cli, "cmd_config", known)
    assert cli.main(["config"]) == 2
    assert capsys.readouterr().err == "synergen: /lake/raw/x.parquet: broken; replace it\n"


# ---- in-process: the configuration's own checks --------------------------------------------------------


@pytest.mark.parametrize("value", ["512m", "4g", "2G", "1024k", "1t", "4gb", 4096])
def test_jvm_memory_sizes_are_accepted(value):
    assert load_config(environ={"SYNERGEN__SPARK__DRIVER_MEMORY": str(value)}).spark.driver_memory == str(value)


@pytest.mark.parametrize("value", ["lots", "0g", "4 gigs", "-1g", "4.5g", "true"])
def test_bad_jvm_memory_sizes_name_the_key(value):
    with pytest.raises(ConfigError, match=r"SYNERGEN__SPARK__DRIVER_MEMORY: spark\.driver_memory: expected a "
                                          r"positive JVM memory size such as 512m, 4g"):
        load_config(environ={"SYNERGEN__SPARK__DRIVER_MEMORY": value})


def test_spark_master_urls():
    for master in ("local", "local[*]", "local[4]", "local[2, 3]", "spark://h1:7077,h2:7077", "yarn",
                   "k8s://https://k:6443"):
        assert load_config(environ={"SYNERGEN__SPARK__MASTER": master}).spark.master == master
    with pytest.raises(ConfigError, match="SYNERGEN__SPARK__MASTER: spark.master: expected a Spark master URL"):
        load_config(environ={"SYNERGEN__SPARK__MASTER": "localhost:7077"})


def test_config_errors_are_pipeline_errors_on_one_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("spark:\n  mastr: x\n  shuffle_partitions: -2\nevaluate:\n  ks: [10, 0]\n")
    with pytest.raises(PipelineError) as e:
        load_config(path, environ={"SYNERGEN__MODEL__DROPOUT": "high"})
    message = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in message
    for part in (f"{path}: spark.mastr: unknown key (did you mean 'master'?)",
                 f"{path}: spark.shuffle_partitions: Input should be greater than or equal to 1 (got -2)",
                 f"{path}: evaluate.ks: every K must be a positive integer",
                 "SYNERGEN__MODEL__DROPOUT: model.dropout: Input should be a valid number"):
        assert part in message, (part, message)


def test_environment_clashes_and_empty_keys_name_the_variable():
    with pytest.raises(ConfigError, match="SYNERGEN__MODEL__DROPOUT: model is also given a plain value"):
        load_config(environ={"SYNERGEN__MODEL": "3", "SYNERGEN__MODEL__DROPOUT": "0.1"})
    with pytest.raises(ConfigError, match="SYNERGEN__MODEL__: empty key"):
        load_config(environ={"SYNERGEN__MODEL__": "1"})
    with pytest.raises(ConfigError, match="SYNERGEN__MODEL: model: Input should be a valid dictionary"):
        load_config(environ={"SYNERGEN__MODEL": "3"})
    with pytest.raises(ConfigError, match="SYNERGEN__SPARKS__MASTER: sparks: unknown key"):
        load_config(environ={"SYNERGEN__SPARKS__MASTER": "local"})


def test_overrides_name_the_assignment():
    with pytest.raises(ConfigError, match=r"override train.epochs=-1: train.epochs: Input should be greater"):
        with_overrides(Config(), ["train.epochs=-1"])


def test_an_empty_config_file_is_the_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("# nothing set yet\n")
    assert load_config(path, environ={}) == Config()
