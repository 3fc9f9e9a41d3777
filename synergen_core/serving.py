"""Serving a trained model: the registry's MLflow pyfunc (``SynerGenPyfunc``).

``synergen_core.registry.register`` logs ``model.pt`` with this class, its signature, an input example
and its requirements; MLflow loads the class back from here when a registered version is served.
"""
from __future__ import annotations

import numpy as np

from synergen_core.config import Config

ARTIFACT = "model"  # the pyfunc artifact key (and file stem) of model.pt
# the token columns a pyfunc request may carry, oldest token first (only item_idx is required)
INPUT_COLUMNS = ("token_type", "item_idx", "query_idx", "action", "surface", "position", "ts")

try:
    from mlflow.pyfunc import PythonModel as _PythonModel
except ImportError:  # pragma: no cover - mlflow is a dependency
    _PythonModel = object


class SynerGenPyfunc(_PythonModel):
    """``model.pt`` as an MLflow pyfunc: next-item retrieval for a batch of token sequences.

    Input: a DataFrame, one row per request, list columns of equal length per row, oldest token first:
    ``item_idx`` (required), ``token_type`` (1 item, 2 query; default: 1 where item_idx > 0 else 2 where
    query_idx > 0), ``query_idx``, ``action``, ``surface``, ``position`` (default 0..n-1), ``ts`` (epoch
    seconds, default 0). A request whose last token is a query asks for search, else recommendation.
    Indices the model does not know are read as unknown. Params: ``k`` (default 10).
    Output: DataFrame ``items`` (top-k item indices, best first) and ``scores`` (retrieval logits).
    """

    def load_context(self, context) -> None:
        from synergen_core.checkpoint import load_model

        self.model = load_model(context.artifacts[ARTIFACT], "cpu")

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        from synergen_core.data import to_batch
        from synergen_core.embeddings import TokenType
        from synergen_core.evaluate import fit_history, model_vocab

        model = self.model
        k = int((params or {}).get("k", 10))
        df = pd.DataFrame(model_input)
        L, R = model.cfg.max_seq_len, len(df)
        hist = {c: np.zeros((R, L), np.float64 if c == "ts" else np.int64) for c in INPUT_COLUMNS}
        lengths = np.zeros(R, np.int64)

        def cell(col: str, r: int, n: int, default):
            v = df[col].iloc[r] if col in df.columns else None
            if v is None or (np.isscalar(v) and pd.isna(v)):
                return default
            return np.asarray(v)[-n:] if n else np.asarray(v)[:0]

        for r in range(R):
            items = np.asarray(df["item_idx"].iloc[r], np.int64)
            n = min(len(items), L)
            items = items[len(items) - n:]
            queries = cell("query_idx", r, n, np.zeros(n, np.int64)).astype(np.int64)
            default_tt = np.where(items > 0, int(TokenType.ITEM), np.where(queries > 0, int(TokenType.QUERY), 0))
            cols = {"item_idx": items, "query_idx": queries,
                    "token_type": cell("token_type", r, n, default_tt), "action": cell("action", r, n, np.zeros(n)),
                    "surface": cell("surface", r, n, np.zeros(n)), "position": cell("position", r, n, np.arange(n)),
                    "ts": cell("ts", r, n, np.zeros(n))}
            for c, v in cols.items():
                hist[c][r, L - n:] = v
            lengths[r] = n
        hist = fit_history(hist, *model_vocab(model))
        out_items, out_scores = [[] for _ in range(R)], [[] for _ in range(R)]
        rows = np.nonzero(lengths > 0)[0]
        if len(rows):
            with torch.no_grad():
                batch = to_batch(hist, rows, lengths, "cpu")
                hidden = model(batch)
                logits = model.request_logits(batch, hidden).float()
                top = logits.topk(min(k, logits.shape[1] - 1), dim=1)
            for j, r in enumerate(rows):
                out_items[r] = top.indices[j].tolist()
                out_scores[r] = [float(s) for s in top.values[j].tolist()]
        return pd.DataFrame({"items": out_items, "scores": out_scores})


def pyfunc_signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, ParamSchema, ParamSpec, Schema

    long_, double = DataType.long, DataType.double
    inputs = Schema([ColSpec(Array(long_), "item_idx")]
                    + [ColSpec(Array(double if c == "ts" else long_), c, required=False)
                       for c in INPUT_COLUMNS if c != "item_idx"])
    outputs = Schema([ColSpec(Array(long_), "items"), ColSpec(Array(double), "scores")])
    return ModelSignature(inputs=inputs, outputs=outputs, params=ParamSchema([ParamSpec("k", long_, 10)]))


def input_example(cfg: Config, ds: str, protocol: str, rows: int = 3):
    """A few of the day's test requests (real token sequences) as the pyfunc's input DataFrame."""
    import pandas as pd

    from synergen_core.data import load_test

    req, _ = load_test(cfg, ds, protocol)
    data: dict[str, list] = {c: [] for c in INPUT_COLUMNS}
    for r in range(min(rows, len(req))):
        n = int(req.lengths[r])
        for c in INPUT_COLUMNS:
            v = req.history[c][r, len(req.history[c][r]) - n:]
            data[c].append([float(x) for x in v] if c == "ts" else [int(x) for x in v])
    if not data["item_idx"]:
        data = {"item_idx": [[1, 2]], "token_type": [[1, 1]], "ts": [[0.0, 60.0]]}
    return pd.DataFrame(data)


def pyfunc_requirements() -> list[str]:
    import mlflow
    import pandas
    import torch

    # The serving environment also needs this project's package (synergen) at the version tagged
    # synergen.code_version: the model class and its loader live there.
    return [f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}",
            f"pandas=={pandas.__version__}", f"mlflow=={mlflow.__version__}"]
