"""Offline batch scoring (jobs.score): every Amazon Beauty user, K = 100, against the real catalog and a
generated catalog of 1M items; end-to-end users/s next to bare faiss exact search over the same vectors.

1. The Beauty lake (``benchmarks.quality.prepare``: ingest -> validate -> sessionize, cached under ``--work``)
   and two models trained on its leave-one-out split for ``--train-steps`` steps: ``synergen`` (the full
   model) and ``no_text`` (its ablation without item text).
2. Real catalog, dense vs generative retrieval: every user scored from the training split's histories
   (everything before the held-out validation item), so the lists' quality is Recall / NDCG of that
   item; users/s of each retriever.
3. 1M items: the ``--big-model`` (default ``synergen``, the model the DAG trains, with item text) grown to
   1,000,000 items (each generated item = a real item's ID embedding and text vector plus Gaussian noise,
   and its semantic IDs), a lake whose item vocabulary holds them, then the production run: every user's
   latest sequence, consumed items excluded, K = 100 of N = 200 (then again with N = 100: retrieval depth
   is the main cost of the ranking pass, see ``--retrieve-n``; and at N = 200 under bfloat16 autocast,
   ``score.precision``). The stage chooses its index on its own measurement (IVF above
   ``score.exact_max_items``, IVF-PQ from ``score.pq_min_items``) and we report it, users/s end to end
   (Spark already started; everything else counted: requests, model, index build and recall measurement,
   inference, writing) and the validation's time. In the same run, bare faiss exact search
   (``IndexFlatIP``, all cores) over the same 1M item vectors with real request vectors of the same model
   is the machine's limit; the approximate index's recall@100 against it is measured on those requests.
   What the executors receive (``_score.json``'s ``payload``: the broadcast and the files they map) is
   set against what the stage broadcast before the serving payload: the whole model record and the
   serialized IVF-Flat index, measured on the same grown model (``shipped_before``).

    .venv/bin/python -m benchmarks.scoring                                  # the full run
    .venv/bin/python -m benchmarks.scoring --items 20000 --max-users 2000 --train-steps 20   # a quick check
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from benchmarks.common import ROOT, write_result
from schemas import C
from schemas import sequences as sequences_schema
from synergen_core import checkpoint, lake
from synergen_core.config import Config

K_LIST, N_RETRIEVE = 100, 200
VARIANTS = ("synergen", "no_text")


# ---------------------------------------------------------------------------------------------
# inputs


def trained_models(cfg: Config, ds: str, steps: int) -> dict[str, Path]:
    """The two variants trained on the loo split for ``steps`` optimizer steps (reused when present)."""
    from jobs import train

    cfg = cfg.model_copy(deep=True)
    cfg.train = cfg.train.model_copy(update={"output": f"models-scoring-{steps}", "max_steps": steps, "epochs": 1,
                                             "progress": False, "protocols": ["loo"]})
    dirs = {v: cfg.layout.model_dir(ds, "loo", v) for v in VARIANTS}
    if not all((d / checkpoint.MODEL).is_file() for d in dirs.values()):
        train.run(cfg, ds, variants=list(VARIANTS), protocols=["loo"])
    return dirs


def _sessionized(root: Path, table: str, ds: str) -> Path:
    """A sessionized partition of the benchmark's lakes (the default layout: the benchmarks' configs keep it)."""
    layout = lake.Layout(root)
    return layout.part(layout.sessions(table), ds)


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        os.symlink(src.resolve(), dst)


def _users(table: pa.Table, max_users: int | None) -> pa.Table:
    """The first ``max_users`` users by id (all when None): a fixed subset for quick runs."""
    if max_users is None or table.num_rows <= max_users:
        return table
    return table.sort_by(C.USER_ID).slice(0, max_users)


def quality_lake(src_root: Path, work: Path, ds: str, max_users: int | None) -> Path:
    """A lake whose ``sequences`` snapshot is the loo training split: scoring it predicts the valid item."""
    root = work / "beauty-loo" / "lake"
    shutil.rmtree(root, ignore_errors=True)
    train = _users(pq.read_table(_sessionized(src_root, "split_loo_train", ds)), max_users)
    n = pc.list_value_length(train[C.TOKENS]).cast(pa.int64())
    seqs = pa.table({C.USER_ID: train[C.USER_ID], C.N_EVENTS: n, C.N_TOKENS: n,
                     C.LAST_SESSION: pa.array(np.zeros(train.num_rows, np.int32)),
                     C.WATERMARK: pa.array(np.full(train.num_rows, np.datetime64(ds, "us")),
                                           sequences_schema.SEQUENCES.field(C.WATERMARK).type),
                     C.TOKENS: train[C.TOKENS]}, schema=sequences_schema.SEQUENCES)
    lake.write_partition(seqs, _sessionized(root, "sequences", ds))
    for table in ("item_vocab", "query_vocab"):
        _link(_sessionized(src_root, table, ds), _sessionized(root, table, ds))
    return root


def valid_targets(src_root: Path, ds: str) -> dict[str, str]:
    """user_id -> item_id of the held-out validation item (the item after the training histories)."""
    ev = pq.read_table(_sessionized(src_root, "split_loo_eval", ds), columns=[C.USER_ID, C.SPLIT, C.ITEM_INDEX])
    ev = ev.filter(pc.equal(ev[C.SPLIT], sequences_schema.SPLIT_VALID))
    vocab = pq.read_table(_sessionized(src_root, "item_vocab", ds), columns=[C.ITEM_INDEX, C.ITEM_ID])
    ids = dict(zip(vocab[C.ITEM_INDEX].to_pylist(), vocab[C.ITEM_ID].to_pylist()))
    return {u: ids[i] for u, i in zip(ev[C.USER_ID].to_pylist(), ev[C.ITEM_INDEX].to_pylist())}


def grow(record: dict, n_items: int, seed: int, noise: float = 0.5) -> dict:
    """The model record with ``n_items`` items: every item-indexed tensor (ID embeddings, semantic IDs) gets
    rows for the generated items, copied from a random real item (float rows plus noise of ``noise`` x the
    table's std)."""
    n_real = record["dims"]["n_items"]
    rng = np.random.default_rng(seed)
    src = torch.from_numpy(rng.integers(1, n_real, n_items - n_real))
    gen = torch.Generator().manual_seed(seed)
    sd = dict(record["state_dict"])
    for key, t in sd.items():
        if key.startswith("embed.") and t.ndim >= 1 and t.shape[0] == n_real:
            new = t[src].clone()
            if t.is_floating_point():
                new += noise * t[1:].std() * torch.randn(new.shape, generator=gen)
            sd[key] = torch.cat([t, new])
    return {**record, "state_dict": sd, "dims": {**record["dims"], "n_items": n_items}}


def big_lake(src_root: Path, work: Path, ds: str, n_items: int, max_users: int | None) -> Path:
    """The Beauty lake with ``n_items`` items: the vocabulary extended with generated ids (events, users and
    queries as they are)."""
    root = work / f"beauty-{n_items}" / "lake"
    shutil.rmtree(root, ignore_errors=True)
    vocab = pq.read_table(_sessionized(src_root, "item_vocab", ds))
    first = int(pc.max(vocab[C.ITEM_INDEX]).as_py()) + 1
    idx = np.arange(first, n_items, dtype=np.int32)
    gen = pa.table({C.ITEM_INDEX: idx, C.ITEM_ID: pa.array([f"gen-{i}" for i in idx]),
                    C.FIRST_DS: pa.array([ds] * len(idx)), C.COUNT: pa.array(np.zeros(len(idx), np.int64))},
                   schema=sequences_schema.ITEM_VOCAB)
    lake.write_partition(pa.concat_tables([vocab.cast(sequences_schema.ITEM_VOCAB), gen]),
                         _sessionized(root, "item_vocab", ds))
    seqs = _users(pq.read_table(_sessionized(src_root, "sequences", ds)), max_users)
    lake.write_partition(seqs, _sessionized(root, "sequences", ds))
    _link(_sessionized(src_root, "query_vocab", ds), _sessionized(root, "query_vocab", ds))
    _link(_sessionized(src_root, "consumed", ds), _sessionized(root, "consumed", ds))
    _link(src_root / lake.Layout.sessionized / "events", root / lake.Layout.sessionized / "events")
    return root


# ---------------------------------------------------------------------------------------------
# measurements


def score_config(root: Path, work: Path, **score) -> Config:
    cfg = Config()
    cfg.lake.root = root
    cfg.spark.conf = {"spark.ui.enabled": "false"}
    cfg.spark.driver_memory = "8g"
    cfg.mlflow.tracking_uri = f"sqlite:///{work}/mlflow.db"
    cfg.score = cfg.score.model_copy(update={"top_k": K_LIST, "retrieve_n": N_RETRIEVE, "lookback_days": None,
                                             "surfaces": ["rec"], **score})
    return cfg


def list_quality(cfg: Config, ds: str, targets: dict[str, str]) -> dict:
    """Recall@10/@100 and NDCG@10 of the held-out item in every user's list (users without a list count 0)."""
    from jobs import candidates

    t = pq.ParquetDataset(candidates.staged_dir(cfg, ds) / "surface=rec").read(columns=[C.USER_ID, C.ITEM_ID, C.RANK])
    rank = {(u, i): r for u, i, r in zip(*(t[c].to_pylist() for c in (C.USER_ID, C.ITEM_ID, C.RANK)))}
    ranks = np.array([rank.get((u, i), 0) for u, i in targets.items()])
    hit = lambda k: float(np.mean((ranks > 0) & (ranks <= k)))  # noqa: E731
    ndcg10 = float(np.mean(np.where((ranks > 0) & (ranks <= 10), 1 / np.log2(np.maximum(ranks, 1) + 1), 0.0)))
    return {"users": len(targets), "recall@10": hit(10), "recall@100": hit(100), "ndcg@10": ndcg10}


def request_vectors(cfg: Config, ds: str, record: dict, n: int, seed: int) -> np.ndarray:
    """[n, d] request vectors of ``n`` random users of the lake (the scorer's own code, on the driver)."""
    from synergen_core import serving

    seqs = pq.read_table(_sessionized(Path(cfg.lake.root), "sequences", ds), columns=[C.USER_ID, C.TOKENS])
    rows = np.sort(np.random.default_rng(seed).choice(seqs.num_rows, min(n, seqs.num_rows), replace=False))
    seqs = seqs.take(rows)
    batch = pa.RecordBatch.from_pydict({
        C.SURFACE: ["rec"] * len(rows), C.USER_ID: seqs[C.USER_ID].combine_chunks(),
        C.QUERY: pa.nulls(len(rows), pa.string()),
        serving.QUERY_INDEX_COLUMN: pa.nulls(len(rows), pa.int32()), C.TOKENS: seqs[C.TOKENS].combine_chunks()})
    settings = serving.Settings(K_LIST, N_RETRIEVE, "dense", 256, serving.end_of_day(ds), record["dims"]["n_queries"],
                                2, False)
    scorer = serving.Scorer(checkpoint.build_from_record(record), None, settings)
    req, _ = scorer.requests(batch)
    with torch.no_grad():
        return np.concatenate([scorer.request_vectors(req, np.arange(i, min(i + 256, len(req))))
                               for i in range(0, len(req), 256)])


def item_vectors(record: dict) -> np.ndarray:
    model = checkpoint.build_from_record(record)
    ids = torch.arange(1, model.n_items)
    with torch.no_grad():
        return np.concatenate([model.item_vectors(ids[i:i + 65536]).numpy() for i in range(0, len(ids), 65536)])


def bare_faiss(items: np.ndarray, queries: np.ndarray, report: dict, seed: int) -> dict:
    """Exact search throughput (all cores) over ``items``, and the recall@100 of the stage's index choice."""
    import faiss

    from synergen_core import index

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    flat = index.exact_index(items)
    t0 = time.perf_counter()
    truth = index.search(flat, queries, K_LIST)[1] + 1  # rows -> item indices (item i is row i - 1)
    exact_s = time.perf_counter() - t0
    out = {"queries": len(queries), "items": len(items), "threads": faiss.omp_get_max_threads(),
           "seconds": round(exact_s, 3), "queries_per_s": round(len(queries) / exact_s, 1)}
    if report.get("kind") in (index.IVF, index.IVFPQ):
        ids = np.arange(1, len(items) + 1)
        pq = report["kind"] == index.IVFPQ
        built = (index.ivfpq_index if pq else index.ivf_index)(items, report["nlist"], seed)  # the stage's index
        ann = index.CandidateIndex(built, ids, report["kind"], refine=report.get("pq_refine", 1))
        faiss.extract_index_ivf(built).nprobe = report["nprobe"]
        t0 = time.perf_counter()
        found = ann.search(queries, K_LIST, index.exact_scores(items, ids))[1]
        out["ivf"] = {"kind": report["kind"], "nlist": report["nlist"], "nprobe": report["nprobe"],
                      "recall@100": round(index.recall_at_k(found, truth), 4),
                      "queries_per_s": round(len(queries) / (time.perf_counter() - t0), 1)}
    return out


def shipped_before(record: dict, items: np.ndarray, report: dict, seed: int) -> dict:
    """The bytes the stage broadcast to executors before the serving payload (revision 75e5b03): the whole
    model record (ID tables, text buffers, semantic IDs) and the IVF-Flat index serialized, at the nlist
    the stage chose now (IVF-Flat was the index above score.exact_max_items then)."""
    import faiss

    from synergen_core import index

    ivf = index.ivf_index(items, report["nlist"], seed) if "nlist" in report else index.exact_index(items)
    model, idx = len(checkpoint.to_bytes(record)), int(faiss.serialize_index(ivf).nbytes) + 8 * len(items)
    return {"model_record_bytes": model, "index_bytes": idx, "total_bytes": model + idx}


def list_overlap(a: Config, b: Config, ds: str) -> float:
    """Share of ``a``'s (user, item) rows that ``b``'s lists of the same day also hold."""
    import polars as pl

    from jobs import candidates

    def rows(cfg: Config) -> pl.DataFrame:
        part = candidates.staged_dir(cfg, ds) / "surface=rec"
        return pl.read_parquet(part / "*.parquet", columns=[C.USER_ID, C.ITEM_ID])

    ra = rows(a)
    return round(ra.join(rows(b), on=[C.USER_ID, C.ITEM_ID], how="semi").height / max(ra.height, 1), 4)


def validate_seconds(cfg: Config, ds: str) -> float:
    from jobs import candidates

    t0 = time.perf_counter()
    candidates.validate_candidates(cfg, ds)
    return round(time.perf_counter() - t0, 1)


# ---------------------------------------------------------------------------------------------


def summary(fig: dict) -> str:
    real, big = fig["real_catalog"], fig["big_catalog"]
    lines = [f"Amazon Beauty, {big['users']:,} users, K = {K_LIST} of N = {fig['n']} retrieved, "
             f"models trained {fig['train_steps']} steps.", "",
             f"**Real catalog ({real['catalog_items']:,} items)**, histories = the leave-one-out training split, "
             "quality = the held-out validation item:", "",
             "| retriever | users/s | R@10 | R@100 | N@10 |", "|---|---|---|---|---|"]
    for name in ("dense", "generative"):
        r = real[name]
        lines.append(f"| {name} | {r['users_per_s']:.1f} | {r['quality']['recall@10']:.4f} | "
                     f"{r['quality']['recall@100']:.4f} | {r['quality']['ndcg@10']:.4f} |")
    b, ix = big["bare_faiss"], big["index"]
    sh = big["shipped"]
    mib = lambda b: f"{b / 2**20:,.1f} MiB"  # noqa: E731
    lines += ["", f"**{big['catalog_items']:,} items** ({big['model']} model, generated items), consumed items "
              "excluded:", "",
              "| | figure |", "|---|---|",
              f"| shipped to executors: broadcast + files they map (content tables, index) | "
              f"{mib(sh['now']['broadcast_bytes'])} + {mib(sh['now']['file_bytes'])} = {mib(sh['now']['total_bytes'])} |",
              f"| shipped before (75e5b03): model record broadcast + IVF-Flat index broadcast | "
              f"{mib(sh['before']['model_record_bytes'])} + {mib(sh['before']['index_bytes'])} = "
              f"{mib(sh['before']['total_bytes'])} |",
              f"| now / before | {sh['ratio']:.3f} (target <= 0.2) |",
              f"| end-to-end scoring (Spark started; requests, model, index, inference, write) | "
              f"{big['users_per_s']:.1f} users/s ({big['seconds']['total']:.1f} s) |",
              f"| bare faiss exact search, {b['threads']} threads, same vectors | {b['queries_per_s']:.1f} queries/s |",
              f"| end-to-end / bare exact | {big['ratio_to_bare_exact']:.2f} (target >= 0.5) |",
              *[f"| N = {n}: end to end (index {r['seconds']['index']:.1f} s + scoring and writing "
                f"{r['seconds']['score_and_write']:.1f} s) | {r['users_per_s']:.1f} users/s, "
                f"{r['ratio_to_bare_exact']:.2f} of bare exact |" for n, r in big.get("by_retrieve_n", {}).items()],
              f"| index chosen by the stage | {ix.get('kind')}: {ix.get('why')} |"]
    if "ivf" in b:
        lines.append(f"| {b['ivf']['kind']} recall@100 vs exact ({b['queries']} real requests) | {b['ivf']['recall@100']:.4f} "
                     f"(nprobe {b['ivf']['nprobe']} of {b['ivf']['nlist']}; "
                     f"{b['ivf']['queries_per_s']:.0f} queries/s) |")
    if "bf16_list_overlap" in big:
        lines.append(f"| bfloat16 lists vs float32 lists (N = {fig['n']}): share of the same (user, item) rows | "
                     f"{big['bf16_list_overlap']:.4f} |")
    lines.append(f"| validation of the {big['rows']:,} rows (Great Expectations on Spark) | "
                 f"{big['validate_seconds']} s |")
    return "\n".join(lines)


def main() -> None:
    from benchmarks.quality import prepare
    from jobs import score
    from jobs.spark import get_spark

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=1_000_000, help="catalog size of the scale run")
    ap.add_argument("--max-users", type=int, help="score only this many users (a quick check; default all)")
    ap.add_argument("--train-steps", type=int, default=500, help="optimizer steps per model")
    ap.add_argument("--bare-queries", type=int, default=2000, help="real request vectors for the bare faiss run")
    ap.add_argument("--work", type=Path, default=ROOT / "var" / "bench" / "scoring", help="lakes and models")
    ap.add_argument("--exact-max-items", type=int, default=Config().score.exact_max_items,
                    help="score.exact_max_items of the scale run (IVF above it)")
    ap.add_argument("--pq-min-items", type=int, default=Config().score.pq_min_items,
                    help="score.pq_min_items of the scale run (IVF-PQ from it)")
    ap.add_argument("--retrieve-n", type=int, nargs="+", default=[N_RETRIEVE, K_LIST],
                    help="N of the scale run, one run per value in this order (the first is the headline)")
    ap.add_argument("--bf16", type=int, choices=(0, 1), default=1,
                    help="1: one more run at the first N with score.precision=bfloat16")
    ap.add_argument("--big-model", choices=VARIANTS, default="synergen",
                    help="the model grown to --items items (synergen: the default model, with item text)")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    t_all = time.perf_counter()
    base_cfg, ds = prepare("beauty", args.work)
    src = Path(base_cfg.lake.root)
    models = trained_models(base_cfg, ds, args.train_steps)
    spark = get_spark(score_config(src, args.work))  # started before any timing
    fig: dict = {"ds": ds, "train_steps": args.train_steps, "k": K_LIST, "n": args.retrieve_n[0]}

    qroot = quality_lake(src, args.work, ds, args.max_users)
    targets = valid_targets(src, ds)
    users = set(pq.read_table(_sessionized(qroot, "sequences", ds), columns=[C.USER_ID])[C.USER_ID].to_pylist())
    targets = {u: i for u, i in targets.items() if u in users}
    fig["real_catalog"] = {}
    for retriever in ("dense", "generative"):
        cfg = score_config(qroot, args.work, retriever=retriever, exclude_consumed=False,
                           output=f"candidates-{retriever}")
        out = score.run(spark, cfg, ds, model_dir=models["synergen"])
        fig["real_catalog"][retriever] = {"users_per_s": out["users"] / out["seconds"]["total"],
                                          "seconds": out["seconds"], "quality": list_quality(cfg, ds, targets)}
        fig["real_catalog"]["catalog_items"] = out["catalog_items"]
        print(retriever, json.dumps(fig["real_catalog"][retriever]), flush=True)

    broot = big_lake(src, args.work, ds, args.items + 1, args.max_users)  # index 0 is padding
    record = grow(checkpoint.load(models[args.big_model] / checkpoint.MODEL), args.items + 1, args.seed)
    grown = args.work / f"model-{args.items}"
    grown.mkdir(parents=True, exist_ok=True)
    checkpoint.save(record, grown / checkpoint.MODEL)
    runs = {}
    variants = [(n, "float32") for n in args.retrieve_n] + [(args.retrieve_n[0], "bfloat16")] * args.bf16
    for n, precision in variants:  # the same lake, model and users, one run after another
        cfg = score_config(broot, args.work, seed=args.seed, exact_max_items=args.exact_max_items, retrieve_n=n,
                           pq_min_items=args.pq_min_items, precision=precision, output=f"candidates-{n}-{precision}")
        key = str(n) if precision == "float32" else f"{n} {precision}"
        runs[key] = score.run(spark, cfg, ds, model_dir=grown)
        print(f"N = {key}:", json.dumps(runs[key]["seconds"]), flush=True)
    n0 = args.retrieve_n[0]
    out = runs[str(n0)]
    cfg = score_config(broot, args.work, seed=args.seed, exact_max_items=args.exact_max_items, retrieve_n=n0,
                       pq_min_items=args.pq_min_items, output=f"candidates-{n0}-float32")
    big = {"users": out["users"], "catalog_items": out["catalog_items"], "seconds": out["seconds"],
           "users_per_s": out["users"] / out["seconds"]["total"], "index": out["index"],
           "rows": out["surfaces"]["rec"]["rows"], "validate_seconds": validate_seconds(cfg, ds)}
    queries = request_vectors(cfg, ds, record, args.bare_queries, args.seed)
    items = item_vectors(record)
    big["bare_faiss"] = bare_faiss(items, queries, out["index"], args.seed)
    big["model"] = args.big_model
    big["shipped"] = {"now": out["payload"], "before": shipped_before(record, items, out["index"], args.seed)}
    big["shipped"]["ratio"] = big["shipped"]["now"]["total_bytes"] / big["shipped"]["before"]["total_bytes"]
    big["ratio_to_bare_exact"] = big["users_per_s"] / big["bare_faiss"]["queries_per_s"]
    if args.bf16:
        big["bf16_list_overlap"] = list_overlap(cfg, score_config(broot, args.work, output=f"candidates-{n0}-bfloat16"),
                                                ds)
    big["by_retrieve_n"] = {n: {"seconds": r["seconds"], "users_per_s": r["users"] / r["seconds"]["total"],
                                     "ratio_to_bare_exact": r["users"] / r["seconds"]["total"]
                                     / big["bare_faiss"]["queries_per_s"]} for n, r in runs.items()}
    fig["big_catalog"] = big
    fig["seconds"] = round(time.perf_counter() - t_all, 1)
    print(json.dumps(big, indent=1, default=str), flush=True)
    spark.stop()
    write_result("scoring", fig, summary(fig))


if __name__ == "__main__":
    main()
