"""What a training run leaves on disk, under ``<lake>/<train.output>/ds=D/<protocol>/<variant>/``:

* ``checkpoint.pt``: the full training state (weights, optimizer, RNG states, epoch and step, early
  stopping state), rewritten every ``train.checkpoint_every`` steps and at every epoch end. A killed
  run started again with the same config continues from it and ends with the same weights as a run
  that was never stopped.
* ``model.pt``: the best weights so far (by the validation metric) with what is needed to rebuild the
  model (config and vocabulary sizes; text vectors and semantic IDs are buffers in the state dict).
  This is what evaluation and serving read.
* ``train.json``: the run's summary (history, best epoch, timings).

Every file is written to a hidden sibling and renamed into place, so a kill never leaves half a file.
"""
from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import torch

from synergen_core.config import ModelConfig
from synergen_core.model import SynerGen

CHECKPOINT, MODEL, SUMMARY = "checkpoint.pt", "model.pt", "train.json"


def run_dir(root: Path, output: str, ds: str, protocol: str, variant: str) -> Path:
    return Path(root) / output / f"ds={ds}" / protocol / variant


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(obj, path: Path) -> None:
    _atomic(Path(path), lambda tmp: torch.save(obj, tmp))


def save_json(obj, path: Path) -> None:
    _atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def load(path: Path, device="cpu") -> dict:
    return torch.load(Path(path), map_location=device, weights_only=False)


def model_record(model: SynerGen, dims: dict) -> dict:
    """What ``model.pt`` holds: config, vocabulary sizes and weights (state tensors on the CPU)."""
    return {
        "model_config": model.cfg.model_dump(mode="json"),
        "dims": dict(dims),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }


def build_from_record(record: dict, device="cpu") -> SynerGen:
    """Rebuild a model from ``model_record`` output; side inputs come back from the state dict."""
    sd = record["state_dict"]
    dims = record["dims"]
    model = SynerGen(
        ModelConfig(**record["model_config"]),
        n_items=dims["n_items"], n_queries=dims["n_queries"], n_actions=dims["n_actions"],
        n_surfaces=dims["n_surfaces"],
        item_text=sd.get("embed.item_text"), query_text=sd.get("embed.query_text"),
        item_codes=sd.get("embed.codes_rec"), search_codes=sd.get("embed.codes_search"),
        codebook_size=dims.get("codebook_size"),
    )
    model.load_state_dict(sd)
    return model.to(device).eval()


def load_model(path: Path, device="cpu") -> SynerGen:
    """``model.pt`` (or its folder) -> the model in eval mode."""
    path = Path(path)
    return build_from_record(load(path / MODEL if path.is_dir() else path), device)
