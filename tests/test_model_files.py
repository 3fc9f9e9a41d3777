"""Model files are read weights-only: a file carrying a pickled callable is refused by every loader, by
name, and its code never runs (a crafted ``model.pt`` used to run a shell command when scoring or the
promotion gate loaded it). Files the pipeline writes itself still load, numpy values included."""
import os
import shlex
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from jobs import register as register_job
from jobs import score
from synergen_core import checkpoint, serving
from synergen_core import train as train_mod
from synergen_core.config import Config
from synergen_core.errors import PipelineError
from synergen_core.features import load_features
from synthetic_training import synthetic_config, synthetic_features, synthetic_split


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    yield


class RunsCode:
    """Unpickling this runs ``touch marker``: what a crafted model file does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture
def crafted(tmp_path):
    """(a folder with a crafted model.pt, features.pt beside it, the marker its code would create)."""
    marker = tmp_path / "code-ran"
    model_dir = tmp_path / "models" / "ds=2026-03-01" / "temporal" / "synergen"
    model_dir.mkdir(parents=True)
    payload = {"x": RunsCode(marker), "state_dict": {"w": torch.zeros(2)}}
    torch.save(payload, model_dir / checkpoint.MODEL)
    torch.save(payload, model_dir.parent / "features.pt")
    # the file really runs code when unpickled the old way (the control for every test below)
    torch.load(model_dir / checkpoint.MODEL, weights_only=False)
    assert marker.exists()
    marker.unlink()
    return model_dir, marker


def _refused(call, path, marker):
    with pytest.raises(PipelineError, match="refusing to load .*not a plain tensor file") as e:
        call()
    assert str(path) in str(e.value) and "would run code" in str(e.value)
    assert not marker.exists()


def test_checkpoint_loaders_refuse_a_file_that_would_run_code(crafted):
    model_dir, marker = crafted
    f = model_dir / checkpoint.MODEL
    _refused(lambda: checkpoint.load(f), f, marker)
    _refused(lambda: checkpoint.load_model(model_dir), f, marker)
    _refused(lambda: checkpoint.load_model(f), f, marker)


def test_scoring_refuses_a_model_file_and_a_broadcast_record_that_would_run_code(crafted):
    model_dir, marker = crafted
    f = model_dir / checkpoint.MODEL
    cfg = Config()
    # score.run reads the model file before it touches Spark
    _refused(lambda: score.run(None, cfg, "2026-03-01", model_dir=model_dir), f, marker)
    settings = serving.Settings(10, 20, "dense", 64, 0.0, 1, 1, False)
    payload = {"record": f.read_bytes(), "source": str(f), "settings": settings, "index": None}
    _refused(lambda: serving.build_scorer(payload), f, marker)


def test_registry_and_features_cache_refuse_files_that_would_run_code(crafted):
    model_dir, marker = crafted
    cfg = Config()
    cfg.lake.root = model_dir.parents[3]
    features = model_dir.parent / "features.pt"
    _refused(lambda: register_job.semantic_ids_version(cfg, "2026-03-01", "temporal"), features, marker)
    # the pyfunc the registry serves, and what the promotion gate re-evaluates, load through load_model
    context = SimpleNamespace(artifacts={serving.ARTIFACT: str(model_dir / checkpoint.MODEL)})
    _refused(lambda: serving.SynerGenPyfunc().load_context(context), model_dir / checkpoint.MODEL, marker)
    _refused(lambda: load_features(cfg.layout, cfg.text_encoder, cfg.semantic_ids, "2026-03-01", None, None, None, 41, 11, cache=features), features, marker)


def test_files_the_pipeline_writes_load_weights_only(tmp_path):
    data, feats = synthetic_split(), synthetic_features()
    feats.notes = {"semantic_ids": {"rqvae_final_loss": np.float32(0.25), "levels": np.int64(2)}}
    train_mod.train(synthetic_config(ema_decay=0.8), data, feats, tmp_path)
    for name in (checkpoint.CHECKPOINT, checkpoint.MODEL):
        torch.load(tmp_path / name, weights_only=True)
    checkpoint.save({"n_items": 41, **feats.__dict__}, tmp_path / "features.pt")
    saved = torch.load(tmp_path / "features.pt", weights_only=True)
    assert saved["notes"]["semantic_ids"] == {"rqvae_final_loss": 0.25, "levels": 2}  # numpy scalars -> numbers
    checkpoint.save({"state": np.arange(3), "rng": np.random.default_rng(0).bit_generator.state}, tmp_path / "x.pt")
    back = checkpoint.load(tmp_path / "x.pt")
    assert torch.equal(back["state"], torch.arange(3)) and back["rng"]["state"]["state"] > 0
    model = checkpoint.load_model(tmp_path)
    back = checkpoint.build_from_record(checkpoint.from_bytes(checkpoint.to_bytes(checkpoint.model_record(model, {
        **train_mod.model_dims(data, feats)})), "bytes"))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))
    with pytest.raises(TypeError, match="cannot store a object"):
        checkpoint.save({"x": object()}, tmp_path / "y.pt")


def test_a_missing_model_file_names_the_path_and_the_command(tmp_path):
    missing = tmp_path / "models" / "ds=2026-03-02" / "loo" / "synergen"
    with pytest.raises(PipelineError, match=r"model\.pt: no such file .*synergen train --ds 2026-03-02"):
        checkpoint.load_model(missing)
    with pytest.raises(PipelineError, match=r"no model file .*synergen train --ds D"):
        score.resolve_model(Config(), missing)


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, b"PK\x03\x04 truncated"])
def test_an_empty_or_broken_model_file_is_a_clear_error(tmp_path, content):
    f = tmp_path / checkpoint.MODEL
    f.write_bytes(content)
    with pytest.raises(PipelineError, match=rf"cannot read {f}: not a complete torch file"):
        checkpoint.load_model(tmp_path)
