"""What a training run leaves on disk, under ``<lake>/<train.output>/ds=D/<protocol>/<variant>/``:

* ``checkpoint.pt``: the full training state (weights, optimizer, RNG states, epoch and step, early
  stopping state), rewritten every ``train.checkpoint_every`` steps and at every epoch end. A killed
  run started again with the same config continues from it and ends with the same weights as a run
  that was never stopped.
* ``model.pt``: the best weights so far (by the validation metric) with what is needed to rebuild the
  model (config and vocabulary sizes; text vectors and semantic IDs are buffers in the state dict).
  This is what evaluation and serving read.
* ``train.json``: the run's summary (history, best epoch, timings).

``serving_record`` turns a model record into what serving needs: the item and query content vectors
precomputed into two tables (``TokenEmbedding.content_tables``) instead of the ID tables, text buffers
and code embeddings they are made from; ``build_from_record`` builds either kind.

Every file is written to a hidden sibling and renamed into place, so a kill never leaves half a file.

Every file is read with ``torch.load(weights_only=True)``: a model file is input that may come from
elsewhere (the registry, a path on the command line), and a pickled object in it would run code when
loaded. So files hold tensors and plain containers only (``plain`` converts numpy values on the way
out); a file holding anything else is refused with a ``PipelineError`` naming it.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import uuid
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from synergen_core.config import ModelConfig
from synergen_core.errors import PipelineError
from synergen_core.model import SynerGen

CHECKPOINT, MODEL, SUMMARY = "checkpoint.pt", "model.pt", "train.json"


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def plain(obj):
    """``obj`` as what ``torch.load(weights_only=True)`` reads back: tensors, str/int/float/bool/None and
    dicts, lists and tuples of them. numpy scalars become Python numbers and arrays become tensors;
    anything else is a programming error, raised here rather than when the file is read."""
    if obj is None or isinstance(obj, (str, bool, int, float, torch.Tensor)):
        return obj
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, dict):
        out = (OrderedDict if isinstance(obj, OrderedDict) else dict)((plain(k), plain(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a state_dict's module versions, read by load_state_dict
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    raise TypeError(f"cannot store a {type(obj).__name__} in a weights-only file: convert it to plain values")


def save(obj, path: Path) -> None:
    obj = plain(obj)
    _atomic(Path(path), lambda tmp: torch.save(obj, tmp))


def to_bytes(obj) -> bytes:
    """``obj`` (see ``plain``) as the bytes of a torch file, e.g. to broadcast a model record."""
    buf = io.BytesIO()
    torch.save(plain(obj), buf)
    return buf.getvalue()


def save_json(obj, path: Path) -> None:
    _atomic(Path(path), lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n"))


def _load(source, name: str, device, mmap: bool = False):
    try:
        return torch.load(source, map_location=device, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # torch's message says which global it met, e.g. "Trying to load unsupported GLOBAL posix.system"
        found = next((line.strip() for line in str(e).splitlines() if "GLOBAL" in line), "")
        if not found:
            raise _unreadable(name, e) from None
        raise PipelineError(
            f"refusing to load {name}: it is not a plain tensor file (would run code: {found}). "
            "Files written by synergen hold tensors only; one from an older version or elsewhere must be "
            "rebuilt: retrain (synergen train --ds D --fresh) and register it again."
        ) from None
    except EOFError as e:  # an empty file
        raise _unreadable(name, e) from None
    except RuntimeError as e:
        if "zip archive" in str(e) or "PytorchStreamReader" in str(e):  # truncated or not a torch file
            raise _unreadable(name, e) from None
        raise


def _unreadable(name: str, e: Exception) -> PipelineError:
    cause = next((line.strip() for line in str(e).splitlines() if line.strip()), "empty file")
    return PipelineError(f"cannot read {name}: not a complete torch file ({cause[:200]}); "
                         "write it again (synergen train --ds D --fresh for a model or checkpoint)")


def load(path: Path, device="cpu", mmap: bool = False) -> dict:
    """A file written by ``save``; a file that would unpickle code is refused (``PipelineError``).
    ``mmap``: tensors stay in the file, mapped copy-on-write (processes mapping it share its pages)."""
    path = Path(path)
    if not path.is_file():
        day = next((part[3:] for part in reversed(path.parts) if part.startswith("ds=")), "D")
        raise PipelineError(f"{path}: no such file (training writes it: run `synergen train --ds {day}`)")
    return _load(path, str(path), device, mmap)


def from_bytes(data: bytes, name: str, device="cpu") -> dict:
    """``to_bytes`` output back; ``name`` says where the bytes came from in a refusal."""
    return _load(io.BytesIO(data), name, device)


def model_record(model: SynerGen, dims: dict) -> dict:
    """What ``model.pt`` holds: config, vocabulary sizes and weights (state tensors on the CPU)."""
    return {
        "model_config": model.cfg.model_dump(mode="json"),
        "dims": dict(dims),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }


CONTENT_TABLES = ("embed.item_table", "embed.query_table")
# every catalog-sized tensor a serving record may hold (what scoring maps from files instead of broadcasting)
CATALOG_TENSORS = CONTENT_TABLES + ("embed.codes_rec", "embed.codes_search")
# what the content tables are computed from (prefixes of state-dict keys)
_CONTENT_SOURCES = ("embed.id_emb.", "embed.item_text", "embed.query_text", "embed.query_id_emb.", "embed.code_emb.")
_SEMANTIC_IDS = ("embed.codes_", "semantic.")  # semantic IDs and their heads: generative retrieval only
_TEXT_BUFFERS = ("embed.item_text", "embed.query_text")


def serving_record(record: dict, semantic_ids: bool = True, keep_weights: bool = False) -> dict:
    """``record`` with its item and query content precomputed (``CONTENT_TABLES``, [n_items, d] and
    [n_queries, d]) in place of what they are computed from; without ``semantic_ids`` also without the
    semantic IDs and their heads (dense retrieval reads neither). The model it builds scores exactly as
    ``record``'s does and cannot be trained. ``keep_weights``: keep the trained weights the tables come
    from and drop only the text buffers (what the registry holds: it serves, and it starts the next day's
    warm start, which takes today's text vectors anyway). Computed in chunks; the record is catalog-sized."""
    sd = record["state_dict"]
    config = dict(record["model_config"])
    keep = dict(sd)
    if "embed.item_table" not in sd:
        items, queries = build_from_record(record).embed.content_tables()
        keep["embed.item_table"] = items
        if queries is not None:
            keep["embed.query_table"] = queries
    drop = _TEXT_BUFFERS if keep_weights else _CONTENT_SOURCES
    keep = {k: v for k, v in keep.items() if not k.startswith(drop)}
    if not semantic_ids:
        keep = {k: v for k, v in keep.items() if not k.startswith(_SEMANTIC_IDS)}
        config["semantic_head"] = False
    return {**record, "model_config": config, "state_dict": keep}


def build_from_record(record: dict, device="cpu") -> SynerGen:
    """Rebuild a model from ``model_record`` or ``serving_record`` output; side inputs come back from
    the state dict. Content tables are used as given (not copied): memory-mapped ones stay mapped."""
    sd = record["state_dict"]
    dims = record["dims"]
    text_proj = sd.get("embed.text_proj.weight")
    model = SynerGen(
        ModelConfig(**record["model_config"]),
        n_items=dims["n_items"], n_queries=dims["n_queries"], n_actions=dims["n_actions"],
        n_surfaces=dims["n_surfaces"],
        item_text=sd.get("embed.item_text"), query_text=sd.get("embed.query_text"),
        item_codes=sd.get("embed.codes_rec"), search_codes=sd.get("embed.codes_search"),
        codebook_size=dims.get("codebook_size"),
        item_table=sd.get("embed.item_table"), query_table=sd.get("embed.query_table"),
        text_dim=None if text_proj is None else text_proj.shape[1],
    )
    if "embed.item_table" not in sd:
        model.load_state_dict(sd)
    else:  # the tables are the model's buffers already; weights they were computed from are not read
        weights = {k: v for k, v in sd.items() if k not in CONTENT_TABLES and not k.startswith(_CONTENT_SOURCES)}
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if set(missing) - set(CONTENT_TABLES) or unexpected:
            raise PipelineError(f"a serving record that does not fit its model: missing {missing}, "
                                f"unexpected {unexpected}")
    return model.to(device).eval()


def load_model(path: Path, device="cpu") -> SynerGen:
    """``model.pt`` (or its folder) -> the model in eval mode."""
    path = Path(path)
    return build_from_record(load(path if path.suffix == ".pt" else path / MODEL), device)
