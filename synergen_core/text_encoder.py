"""Frozen text encoders for the search view of semantic IDs, loaded from local disk only.

The default is wordllama's 256-d static embedding model that ships inside its wheel: no download, about
50k short texts/s on 2 cores. A sentence-transformers model is the alternative, from a user-given folder.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from synergen_core.config import TextEncoderConfig
from synergen_core.vectors import unit_rows


class TextEncoder(Protocol):
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:  # [n, dim] float32, rows L2-normalized
        ...


class WordLlamaEncoder:
    def __init__(self, batch_size: int = 256):
        import wordllama
        from wordllama import WordLlama

        # plain WordLlama.load() looks for its tokenizer in the wrong folder and tries to download it
        self._model = WordLlama.load(cache_dir=Path(wordllama.__file__).parent, disable_download=True)
        self.batch_size = batch_size
        self.dim = int(self._model.embed(["x"]).shape[1])

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        emb = self._model.embed(list(texts), norm=False, batch_size=self.batch_size)  # [n, dim]
        return unit_rows(emb)  # an empty text embeds to zeros; it stays zero rather than becoming NaN


class SentenceTransformerEncoder:
    def __init__(self, path: str | Path, batch_size: int = 256):
        path = Path(path)
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as e:
            raise ImportError(
                f"text_encoder.kind=sentence_transformers needs the 'sentence-transformers' package, "
                f"which is not installed (model path: {path}); install it, or use kind=wordllama"
            ) from e
        if not path.exists():
            raise FileNotFoundError(f"sentence-transformers model folder {path} does not exist")
        self._model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
        self.batch_size = batch_size
        self.dim = int(self._model.get_sentence_embedding_dimension())

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        emb = self._model.encode(
            list(texts), batch_size=self.batch_size, convert_to_numpy=True, normalize_embeddings=False,
            show_progress_bar=False,
        )
        return unit_rows(emb)


def load_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    if cfg.kind == "wordllama":
        return WordLlamaEncoder(cfg.batch_size)
    if cfg.path is None:
        raise ValueError("text_encoder.kind=sentence_transformers needs text_encoder.path (a local model folder)")
    return SentenceTransformerEncoder(cfg.path, cfg.batch_size)


def _clean(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return re.sub(r"\s+", " ", str(value)).strip()


def _flatten(categories: Any) -> list[str]:
    # Amazon metadata nests category paths (list of lists); other catalogs give one string or a flat list
    if isinstance(categories, (list, tuple, np.ndarray)):
        return [c for x in categories for c in _flatten(x)]
    c = _clean(categories)
    return [c] if c else []


def item_text(
    title: Any = None,
    categories: Any = None,
    description: Any = None,
    brand: Any = None,
    max_description_chars: int = 500,
) -> str:
    """One item's text to embed, the same string for the same fields on every run.

    Order: title, brand, categories (first occurrence of each, in given order), truncated description.
    Missing fields (None, NaN, empty) are left out, so a title-only catalog embeds just its titles.
    """
    parts = []
    if t := _clean(title):
        parts.append(t)
    if b := _clean(brand):
        parts.append(f"Brand: {b}")
    cats = list(dict.fromkeys(_flatten(categories)))
    if cats:
        parts.append("Categories: " + ", ".join(cats))
    if (d := _clean(description)[:max_description_chars].strip()) and max_description_chars > 0:
        parts.append(d)
    return ". ".join(parts)
