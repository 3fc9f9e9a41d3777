"""The command line as a user runs it (the main job itself: tests/test_dag_run.py)."""
import subprocess
import sys

import pytest

from jobs import cli
from synergen_core.config import ConfigError, load_config, with_overrides


COMMANDS = {"generate", "ingest", "validate", "sessionize", "embed", "semantic-ids", "train", "evaluate",
            "register", "promote", "registry", "score", "run", "config"}
# The subcommand that runs each tracked stage of the daily DAG (jobs.stages.STAGES). build_training_data has
# none of its own: ``train`` prepares the windows and side inputs it is missing; ``score`` validates and
# publishes the lists it writes (unless --no-publish).
STAGE_COMMAND = {"validate_raw": "validate", "sessionize": "sessionize", "item_embeddings": "embed",
                 "semantic_ids": "semantic-ids", "build_training_data": "train", "train": "train",
                 "evaluate": "evaluate", "register": "register", "promote": "promote", "score": "score",
                 "validate_candidates": "score", "publish": "score"}


def help_commands(text: str) -> set[str]:
    """The subcommand names of ``synergen --help``: the first word of each line of the COMMAND list."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "COMMAND") + 1
    names = set()
    for line in lines[start:]:
        if not line.startswith("    "):  # the list ends at the next section (options:)
            break
        if not line.startswith("      "):  # deeper indents continue a wrapped help text
            names.add(line.split()[0])
    return names


def test_help_lists_one_subcommand_per_stage():
    from jobs import stages

    out = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], capture_output=True, text=True, check=True)
    # whole names, not substrings: "registry" in the text must not stand in for a missing "register"
    assert help_commands(out.stdout) == COMMANDS
    # every stage the DAG runs can be run by hand, by a command the help lists
    assert set(STAGE_COMMAND) == set(stages.STAGES)
    assert set(STAGE_COMMAND.values()) <= COMMANDS


def test_config_file_and_environment_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("spark:\n  master: spark://h:7077\nvalidate:\n  max_bad_row_share: 0.1\n")
    cfg = load_config(path, environ={"SYNERGEN__VALIDATE__MAX_BAD_ROW_SHARE": "0.2"})
    assert cfg.spark.master == "spark://h:7077" and cfg.validation.max_bad_row_share == 0.2


def test_overrides_apply_over_a_loaded_config_and_name_bad_keys(tmp_path):
    base = load_config(None, environ={"SYNERGEN__MODEL__DROPOUT": "0.4"})
    cfg = with_overrides(base, ["model.n_layers=3", "validate.late_days=4", "train.variants=[sasrec]"])
    assert (cfg.model.dropout, cfg.model.n_layers, cfg.validation.late_days, cfg.train.variants) == (0.4, 3, 4, ["sasrec"])
    assert base.model.n_layers == 2  # the loaded config is left as it was
    with pytest.raises(ConfigError, match="model.n_layer: unknown key"):
        with_overrides(base, ["model.n_layer=3"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        with_overrides(base, ["model.dropout"])


@pytest.mark.parametrize("text, message", [
    ("spark:\n  mastr: x\n", "spark.mastr: unknown key"),
    ("generate:\n  events: lots\n", "generate.events: Input should be a valid integer"),
    ("validate:\n  max_bad_row_share: 2\n", "validate.max_bad_row_share: Input should be less than or equal to 1"),
    ("sparks: {}\n", "sparks: unknown key"),
])
def test_bad_config_names_the_key(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(path, environ={})
    assert str(path) in str(e.value)


def test_bad_ds_and_bad_config_exit_with_a_message(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["validate", "--ds", "2026-13-01"])
    assert "bad ds '2026-13-01'" in capsys.readouterr().err
    path = tmp_path / "c.yaml"
    path.write_text("lake: {rot: x}\n")
    assert cli.main(["config", "--config", str(path)]) == 2
    assert "lake.rot: unknown key" in capsys.readouterr().err
