"""The configuration's typed sections and their checks: one ``Config`` of sections (``lake``, ``spark``,
``train``, ...), each key with its default, its bounds and what it does. Loading it (YAML file, environment
overrides, ``--set`` overrides) is ``synergen_core.config``, which re-exports these names.
"""
from __future__ import annotations

import datetime as dt
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from synergen_core.errors import PipelineError
from synergen_core.lake import Layout


class ConfigError(PipelineError, ValueError):
    """A bad configuration value, file or environment variable. A ``PipelineError`` so the CLI prints it as
    one line; still a ``ValueError`` so that pydantic turns one raised inside a validator into a field error."""


# JVM memory sizes as Spark reads them (JavaUtils.byteStringAsMb): digits, then an optional unit
# b, k, m, g, t or p (optionally followed by b), any case; no unit means MiB.
_JVM_MEMORY = re.compile(r"[0-9]+([kmgtp]b?|b)?", re.IGNORECASE)
# The master URLs SparkContext accepts; anything else fails only once the JVM is up, with a Java trace.
_SPARK_MASTER = re.compile(r"local(\[([0-9]+|\*)(,\s*[0-9]+)?\])?|local-cluster\[.+\]|(spark|k8s|mesos)://.+|yarn")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LakeConfig(_Section):
    root: Path = Path("var/lake")  # a local folder, or a shared filesystem mounted on every worker


class SparkConfig(_Section):
    master: str = "local[*]"
    app_name: str = "synergen"
    # Spark's own default. Adaptive execution (on, jobs.spark) coalesces the small ones after each shuffle, so a
    # local run gets a few tasks while a cluster run gets partitions of a size its executors can sort.
    shuffle_partitions: int = Field(200, ge=1)
    driver_memory: str = "4g"  # a JVM memory size: 512m, 4g, 2G, 1024k
    local_ip: str | None = "127.0.0.1"  # SPARK_LOCAL_IP for local runs; null on a cluster
    conf: dict[str, str] = {}  # any other spark.* setting, passed through
    # A stage stops the session it started (a Celery task process should not keep a JVM it no longer uses),
    # unless this is set: then the next stage of the same process reuses it. `airflow dags test` (what
    # `synergen run` calls) runs every task in one process and sets it, saving a JVM start per Spark stage.
    keep_session: bool = False

    @field_validator("master")
    @classmethod
    def _master_url(cls, v: str) -> str:
        if not _SPARK_MASTER.fullmatch(v.strip()):
            raise ValueError("expected a Spark master URL: local[*], local[4], spark://HOST:7077, yarn or k8s://URL")
        return v.strip()

    @field_validator("driver_memory", mode="before")
    @classmethod
    def _jvm_memory(cls, v: Any) -> Any:
        # A bare number (driver_memory: 4096, or an environment value parsed as YAML) is MiB to Spark.
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if isinstance(v, str) and _JVM_MEMORY.fullmatch(v.strip()) and int(re.match(r"[0-9]+", v.strip()).group()) > 0:
            return v.strip()
        raise ValueError("expected a positive JVM memory size such as 512m, 4g, 2G or 1024k")


class MlflowConfig(_Section):
    tracking_uri: str = "sqlite:///var/mlflow.db"
    artifact_root: Path = Path("var/mlartifacts")
    experiment: str = "synergen"
    registered_model: str = "synergen"


class GenerateConfig(_Section):
    """The synthetic log generator: the embedded default input and the scale benchmarks' input."""

    seed: int = 7
    start_ds: str = "2026-01-01"
    days: int = Field(3, ge=1)
    events: int = Field(60_000, ge=1_000)  # search + browse, valid + malformed, over all days
    users: int = Field(2_000, ge=10)
    items: int = Field(3_000, ge=50)
    categories: int = Field(40, ge=2)
    search_share: float = Field(0.25, ge=0.0, le=1.0)
    impressions: int = Field(8, ge=0)  # items shown per event (0: impressions not logged)
    new_item_share_per_day: float = Field(0.01, ge=0.0, le=0.5)
    malformed_share: float = Field(0.01, ge=0.0, le=0.5)
    interest_drift_per_day: float = Field(0.05, ge=0.0, le=1.0)

    @field_validator("start_ds")
    @classmethod
    def _iso_day(cls, v: str) -> str:
        parse_ds(v)
        return v


class ValidateConfig(_Section):
    max_bad_row_share: float = Field(0.05, ge=0.0, le=1.0)  # above it the stage fails
    # Events may arrive up to this many days late (ts before the partition's day); older ones and any
    # ts after the partition's day are quarantined as ts_outside_day.
    late_days: int = Field(2, ge=0)
    max_value: float = 1e9  # browse "value" must be finite and within [0, max_value]
    # Catalog states (validated/catalog_state: the whole catalog as of a day) kept, the latest ones: a daily
    # run needs only yesterday's; a rerun of an older day rebuilds from the catalog partitions.
    catalog_states_kept: int = Field(7, ge=1)


class SessionizeConfig(_Section):
    """Sessionize + tokenize + splits (jobs.sessionize, jobs.splits)."""

    gap_minutes: float = Field(30.0, gt=0)  # an inactivity gap longer than this starts a new session
    max_seq_len: int = Field(200, ge=2)  # tokens kept per sequence, split input and eval context
    source: str = "validated"  # lake layer read (search_events, browse_events, catalog)
    output: str = "sessionized"  # lake layer written (tables of schemas.sequences)
    # Split protocols written per run. The daily model trains on temporal, which needs only the state;
    # loo (the benchmarks' protocol) re-reads the whole event history, so it is written only when asked for.
    splits: list[Literal["loo", "temporal"]] = ["temporal"]
    # Leave-one-out's search test targets per user: the last N search engagements (at most all but two, one
    # left for training and one for validation). 1 is the benchmark protocol; a larger N gives a search test
    # set of hundreds of targets where few users search (benchmarks.quality's movielens_search).
    loo_search_tests: int = Field(1, ge=1)


class ModelConfig(_Section):
    d_model: int = Field(64, ge=8)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(1, ge=1)
    max_seq_len: int = Field(50, ge=2)
    # The defaults are SASRec's recipe (one head, dropout 0.3, LayerNorm, a GELU MLP of width d): on
    # Amazon Beauty and MovieLens it beat 2 heads, dropout 0.2, RMSNorm and a 4d SwiGLU MLP for every
    # variant (BENCHMARKS.md, quality); the alternatives stay for larger corpora.
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    norm: Literal["rmsnorm", "layernorm"] = "layernorm"
    mlp: Literal["swiglu", "gelu"] = "gelu"
    mlp_ratio: float = Field(1.0, gt=0)
    # "time": half the rotary pairs turn with the token position, half with the timestamp (periods
    # log-spaced from rope_min_period_s to rope_max_period_s); "position": ordinary RoPE (ablation).
    rope: Literal["time", "position"] = "time"
    rope_base: float = Field(10_000.0, gt=1.0)
    rope_min_period_s: float = Field(1.0, gt=0)
    rope_max_period_s: float = Field(3.2e8, gt=0)  # ~10 years
    # Input parts of an item token (ablations: no text, no semantic IDs; ID-only = both off).
    use_id_emb: bool = True
    use_text_emb: bool = True
    use_semantic_ids: bool = True
    use_action_surface: bool = True
    semantic_head: bool = True  # GenSAR path: predict the next item's semantic ID code by code
    # Losses: total = w_retrieval * InfoNCE + w_ranking * (w_point * BCE + w_pair * pairwise)
    #               + w_semantic * mean per-level semantic-ID cross-entropy.
    temperature: float = Field(0.05, gt=0)  # InfoNCE temperature (initial value when learned)
    learn_temperature: bool = True
    # Search positions get their own retrieval query Linear and temperature (the item side, hence the
    # index, stays one for both tasks), so a small search share does not have to share the query
    # space and the softmax sharpness that recommendation settles on.
    task_towers: bool = False
    # "joint" (SynerGen's): the ranking head scores each candidate's hidden state and the ranking loss
    # trains the shared backbone along with retrieval. "on_retrieval": a ranking stage on top of the
    # trained encoder: the head adds a learned multiple of the candidate's retrieval logit to its own
    # score, and both enter without gradient, so the ranking loss trains only the head and cannot pull
    # the shared backbone away from retrieval. On MovieLens (one ranking request per window) "joint"
    # trained a head that ordered candidate lists worse than the retrieval scores did, so its table trains
    # "on_retrieval" (figures: BENCHMARKS.md, quality, rank AUC next to the same lists' retrieval-score
    # AUC). No Beauty run with it yet, so "joint" stays the default.
    ranking: Literal["joint", "on_retrieval"] = "joint"
    w_retrieval: float = Field(1.0, ge=0)
    w_ranking: float = Field(1.0, ge=0)
    w_semantic: float = Field(1.0, ge=0)
    w_point: float = Field(1.0, ge=0)
    w_pair: float = Field(1.0, ge=0)


# Trained models of ``synergen train``: the full model, the ID-only SASRec-style baseline, single-task
# versions and ablations (synergen_core.baselines.VARIANTS holds what each one switches).
VariantName = Literal["synergen", "sasrec", "rec_only", "search_only", "no_time_rope", "no_text", "no_semantic_ids"]


class TrainConfig(_Section):
    """``synergen train`` (synergen_core.train, jobs.train)."""

    seed: int = 42
    epochs: int = Field(10, ge=1)
    # Windows per step. A window carries a target at every position, so a step sees ~batch_size x mean
    # history length targets. 128 at lr 1e-3 without clipping is SASRec's setting; together with the
    # model defaults it beat the former 64 at 2e-3 with clipping at 1 on Amazon Beauty and MovieLens
    # (BENCHMARKS.md, quality), for 30-40 epochs, as batches of 128 halve the steps per epoch.
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0)
    # "cosine": decay from lr to 0 over the run's horizon (epochs x steps per epoch, or max_steps when
    # smaller), which converges further within a fixed budget; early stopping may end the run sooner.
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = Field(0, ge=0)  # linear warm-up from ~0 to lr, before either schedule
    weight_decay: float = Field(0.0, ge=0)
    clip_grad: float | None = Field(None, gt=0)  # max global gradient norm; null: no clipping
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True  # bf16 autocast on CUDA (the CPU always trains in float32)
    threads: int | None = Field(None, ge=1)  # torch CPU threads; null: torch's default
    # Processes of one training run. Above 1 the train stage starts itself under ``torchrun --standalone
    # --nproc_per_node N`` (data-parallel, synergen_core.distributed): one per GPU of the worker.
    processes: int = Field(1, ge=1)
    # Machines of one training run, each with ``processes`` processes. Above 1 the train stage starts
    # ``torchrun --nnodes N --rdzv-backend c10d --rdzv-endpoint <rendezvous>`` on every one of them (the DAG
    # runs one train task per node, all in the GPU queue, see README "Multi-node training"); they meet at
    # the rendezvous and train one model over N x processes ranks, with node ranks in order of arrival.
    nodes: int = Field(1, ge=1)
    # host:port of the rendezvous store that every node reaches (an address of one of the training
    # machines, which hosts it while the run lasts); required when nodes > 1.
    rendezvous: str | None = None
    # Daily warm start (synergen_core.warm_start): the model the DAG registers (registry.protocol /
    # registry.variant) starts from the champion's weights and trains warm_epochs passes over the windows
    # since the champion's day at warm_lr (null: lr). A full retrain instead every full_retrain_days days,
    # or when more than max_new_item_share of today's catalog is new since the champion or the semantic IDs
    # of more than max_sid_change_share of its items changed. The choice and its reason: train.json
    # ("start") and the train stage's MLflow run.
    warm_start: bool = True
    warm_epochs: int = Field(1, ge=1)
    warm_lr: float | None = Field(None, gt=0)
    full_retrain_days: int = Field(7, ge=1)
    max_new_item_share: float = Field(0.05, ge=0, le=1)
    max_sid_change_share: float = Field(0.05, ge=0, le=1)
    # One model per protocol's split. The daily job trains on the temporal split (everything before ds,
    # evaluated on the engagements of ds): the model it registers and serves. "loo" is the benchmarks'.
    protocols: list[Literal["loo", "temporal"]] = ["temporal"]
    variants: list[VariantName] = ["synergen"]
    max_windows: int | None = Field(None, ge=1)  # windows of model.max_seq_len tokens per user, latest first
    # Batches of similar lengths: less padding, so faster epochs, but each batch then holds only short or
    # only long histories and its loss is a mean over very different target counts; on Amazon Beauty the
    # ID-only model learned markedly slower per epoch with it. Opt-in for corpora where padding dominates
    # the cost; the order stays seeded either way.
    bucket_by_length: bool = False
    # Task weights of the joint objective: recommendation = next item at item positions, search = the
    # engaged item at query positions (0 turns a task off: the single-task variants).
    w_search: float = Field(1.0, ge=0)
    w_rec: float = Field(1.0, ge=0)
    # Retrieval negatives: "full" = softmax over the whole catalog (exact, fine up to ~1e5 items);
    # "sampled" = in-batch + n_negatives popularity-sampled items with log-Q correction (large catalogs);
    # "auto" = full up to full_softmax_max_items items, sampled above (a step's logits are [target
    # positions x catalog]: 6,400 x 10M floats at 10M items). The choice is in the training summary.
    negatives: Literal["auto", "full", "sampled"] = "auto"
    full_softmax_max_items: int = Field(100_000, ge=1)
    n_negatives: int = Field(1024, ge=1)
    # Ranking candidates per request: the engaged item + negatives. A request whose event logged
    # impressions gets up to rank_impression_negatives of the items shown with it (the logs' own
    # negatives); any other request gets popularity-sampled + hard negatives (the items nearest the
    # engaged one in the retrieval space).
    rank_impression_negatives: int = Field(8, ge=0)
    rank_pop_negatives: int = Field(8, ge=0)
    rank_hard_negatives: int = Field(4, ge=0)
    # Exponential moving average of the weights, updated after every optimizer step with this decay
    # (torch.optim.swa_utils): validated, kept as the best model and served instead of the raw weights.
    # It evens out the step-to-step noise, so the early-stopping choice and the served model depend less
    # on where the last few batches left the weights (on MovieLens an epoch is a few steps and the validation
    # metric jumps between consecutive epochs; BENCHMARKS.md, quality). null: no average. Half-life: about
    # ln 2 / (1 - decay) steps.
    ema_decay: float | None = Field(None, gt=0, lt=1)
    patience: int = Field(3, ge=1)  # epochs without a better validation metric before stopping
    valid_metric: str = "ndcg@10"  # geometric mean over the trained tasks on the validation targets
    valid_max_rows: int = Field(20_000, ge=1)  # a seeded sample of validation targets beyond this
    checkpoint_every: int = Field(500, ge=1)  # optimizer steps between checkpoints (and every epoch end)
    max_steps: int | None = Field(None, ge=1)  # stop after this many optimizer steps (a time budget)
    resume: bool = True  # continue from the checkpoint of the same ds/protocol/variant when present
    progress: bool = True  # tqdm bar with loss and throughput
    output: str = "models"  # lake layer: <lake>/<output>/ds=D/<protocol>/<variant>/

    @field_validator("rendezvous")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        if v is not None and not re.fullmatch(r"[^\s:]+:[0-9]{1,5}", v.strip()):
            raise ValueError("expected host:port of the c10d rendezvous store, e.g. gpu-0.internal:29400")
        return None if v is None else v.strip()

    @model_validator(mode="after")
    def _nodes_meet_somewhere(self) -> "TrainConfig":
        if self.nodes > 1 and self.rendezvous is None:
            raise ValueError(f"train.nodes is {self.nodes}: train.rendezvous (host:port every node reaches) is required")
        return self


class EvaluateConfig(_Section):
    """``synergen evaluate`` (synergen_core.evaluate, jobs.evaluate)."""

    ks: list[int] = Field([5, 10, 20, 50], min_length=1)

    @field_validator("ks")
    @classmethod
    def _positive_ks(cls, v: list[int]) -> list[int]:
        if any(k < 1 for k in v):
            raise ValueError("every K must be a positive integer, e.g. [5, 10, 20]")
        return v
    baselines: list[Literal["popularity", "bm25"]] = ["popularity", "bm25"]  # untrained, scored in-process
    rank_negatives: int = Field(99, ge=1)  # sampled negatives per candidate list (the same lists for all models)
    # How they are drawn: by training popularity (hard for a model that has learned popularity; on a
    # temporal split whose new engagements go to not-yet-popular items, even below AUC 0.5) or uniformly
    # over the catalog items seen in training (the classic "1 + 99 random" protocol).
    rank_negatives_by: Literal["popularity", "uniform"] = "popularity"
    batch_size: int = Field(512, ge=1)
    seed: int = 7
    # Test targets scored per protocol: beyond this many, a seeded sample stratified by user activity (the
    # same for every scorer and the promotion gate), so evaluation holds a bounded set at any number of
    # users (synergen_core.data.sample_test). Above the benchmarks' test sets: their figures are exact.
    max_test_targets: int = Field(200_000, ge=1)
    # Tasks whose full-catalog ranking leaves out the items the user engaged with before the request, as
    # the served lists do (score.exclude_consumed / exclude_consumed_search): so the figures measure the
    # lists users get. S3-Rec's full ranking (and its successors') masks each user's history too; RecBole's
    # does not for sequential models. Training's validation uses the same setting.
    exclude_consumed: list[Literal["rec", "search"]] = ["rec"]


class TextEncoderConfig(_Section):
    """The frozen text encoder that embeds item texts (search view of semantic IDs)."""

    kind: Literal["wordllama", "sentence_transformers"] = "wordllama"
    path: Path | None = None  # sentence_transformers only: a model folder on local disk (no download)
    batch_size: int = Field(256, ge=1)
    max_description_chars: int = Field(500, ge=0)  # long descriptions would drown the title in a mean pool


class SemanticIdConfig(_Section):
    """GenSAR-style RQ-VAE: shared codebooks over both views, then one codebook chain per view."""

    latent_dim: int = Field(32, ge=2)  # per view; shared codebooks live in the concatenated 2x space
    hidden_dims: list[int] = [256, 128]

    @field_validator("hidden_dims")
    @classmethod
    def _positive_dims(cls, v: list[int]) -> list[int]:
        if any(d < 1 for d in v):
            raise ValueError("every hidden layer width must be a positive integer, e.g. [256, 128]")
        return v
    shared_levels: int = Field(2, ge=0)
    specific_levels: int = Field(1, ge=1)  # without one the two views' IDs would be the same ID
    codebook_size: int = Field(256, ge=2)  # every level but the last, as in TIGER
    # ID capacity. With collision=reassign IDs stay fixed-length, so each prefix of the first
    # L-1 codes (L = shared_levels + specific_levels) holds at most as many items as the last level has
    # codes. The last level (the last specific codebook of each view) therefore grows with the catalog:
    # it keeps codebook_size while n_items / codebook_size**(L-1) <= capacity_load * codebook_size, and
    # otherwise takes the smallest power of two last_size with n_items / codebook_size**(L-1) <=
    # capacity_load * last_size. The load is the planned average fill of a prefix; the rest is headroom
    # for skew (Beauty's worst prefix held ~150x the average). A larger last codebook rather than one
    # more level: IDs keep their length, so the model's sequence layout, head and trie are unchanged and
    # its per-level vocabulary is simply the largest level's size. The default keeps 256 up to ~2M
    # items (2 + 1 levels of 256; 10M items get 2048). A new last size needs a cold start (the model's shape).
    capacity_load: float = Field(0.125, gt=0.0, le=1.0)
    last_codebook_size: int | None = Field(None, ge=2)  # null: by the rule above; a number pins it
    # The RQ-VAE is trained (cold or warm) on a sample of this many items (every item below it), the
    # items of smallest hash of (item_id, seed), so the sample is stable from day to day; the driver holds
    # only these rows; every item is still coded, made unique and checked on Spark (jobs.semantic_ids).
    train_sample: int = Field(200_000, ge=1)
    beta: float = Field(0.25, ge=0.0)  # commitment weight
    epochs: int = Field(80, ge=1)
    batch_size: int = Field(1024, ge=2)  # the first batch seeds k-means (at least the largest level's rows)
    lr: float = Field(1e-3, gt=0)
    warm_epochs: int = Field(20, ge=0)  # a daily run fine-tunes yesterday's model this long
    warm_lr: float = Field(1e-4, gt=0)
    dead_code_interval: int = Field(30, ge=1)  # optimizer steps; unused codes are re-seeded after it
    kmeans_iters: int = Field(20, ge=1)
    # reassign: fixed-length IDs and stabler under a daily retrain than extra_code (fewer old IDs changed;
    # BENCHMARKS.md, semantic_ids_beauty); it fails if a prefix outgrows codebook_size
    collision: Literal["reassign", "extra_code"] = "reassign"
    candidates: int = Field(32, ge=1)  # last-level codes kept per item for collision re-assignment
    hysteresis: float = Field(0.1, ge=0.0)  # keep yesterday's code unless another is 1+h times nearer (sq.)
    assign_batch_size: int = Field(8192, ge=1)
    seed: int = 42
    # The daily stage (jobs.semantic_ids) keeps yesterday's RQ-VAE as it is, so old items keep their IDs
    # and new items are coded by the same model, until the share of items added since its last training
    # or the relative rise of its reconstruction loss on today's catalog exceeds this; then it fine-tunes
    # (warm_epochs at warm_lr) and re-codes the catalog. 0 retrains every day.
    retrain_drift_threshold: float = Field(0.1, ge=0.0)


class EmbeddingsConfig(_Section):
    """Inputs of the semantic IDs: text vectors (jobs.text_vectors) and collaborative vectors (jobs.collab)."""

    output: str = "embeddings"  # lake layer: items/, queries/, collab/ under it
    # Implicit-feedback ALS (Spark MLlib) over user-item engagement counts: the collaborative vectors of the
    # first run, before a champion model exists.
    als_rank: int = Field(64, ge=2)
    als_max_iter: int = Field(10, ge=1)
    als_reg: float = Field(0.1, ge=0.0)
    als_alpha: float = Field(10.0, gt=0.0)  # confidence = 1 + alpha * engagement count
    # ALS user and item blocks (RDD partitions: adaptive execution does not size them). None: the Spark
    # application's default parallelism, i.e. its executor cores, so a cluster gets more blocks than a laptop.
    als_blocks: int | None = Field(None, ge=1)
    # Items without a collaborative vector get the similarity-weighted mean of their k text-nearest
    # neighbours' vectors (among items that have one).
    fallback_neighbours: int = Field(10, ge=1)
    # The neighbours are searched among at most fallback_max_anchors items with a vector (the most engaged
    # ones when there are more): their index is built in one process and read by every task of the cold
    # items, so this bounds its memory (anchors x (text + collaborative width) x 4 bytes), whatever the
    # catalog's size. Exact search up to fallback_exact_max_anchors anchors; IVF beyond (about sqrt(anchors)
    # lists), probing fallback_nprobe of them.
    fallback_max_anchors: int = Field(100_000, ge=1)
    fallback_exact_max_anchors: int = Field(20_000, ge=1)
    fallback_nprobe: int = Field(16, ge=1)
    # Parquet file or folder (item_id, vector) of the champion model's item embeddings; when set (or when a
    # loader is passed to jobs.collab.run) they replace ALS. Null: ALS on the first run, then carried.
    champion_vectors: Path | None = None
    # Otherwise the registry's champion (mlflow.registered_model@champion) supplies them when there is one:
    # its collaborative ID embeddings of the items it was trained on. False: ALS once, then carried.
    from_champion: bool = True



class ScoreConfig(_Section):
    """``synergen score`` (jobs.score): per-user candidate lists for recommendation and search, to Parquet."""

    # A registry reference (``models:/<name>@<alias>`` or ``models:/<name>/<version>``) or a model.pt file or
    # its folder (e.g. <lake>/models/ds=D/loo/synergen).
    model: str = "models:/synergen@champion"
    surfaces: list[Literal["rec", "search"]] = ["rec", "search"]
    retriever: Literal["dense", "generative"] = "dense"  # faiss over item vectors, or semantic-ID beam search
    top_k: int = Field(50, ge=1)  # K: items kept per request
    retrieve_n: int = Field(200, ge=1)  # N: candidates retrieved, then re-scored by the ranking head (N >= K)
    # The order of each task's lists: auto, the one recorded with the model (the ranking head's where it is at
    # least as good as retrieval's on validation, synergen_core.list_order; a model without a record: the
    # head), or ranking / retrieval for every task. A model without a ranking head serves retrieval order.
    order: Literal["auto", "ranking", "retrieval"] = "auto"
    lookback_days: int | None = Field(30, ge=1)  # rec: users with an event in the N days up to ds; null: all
    exclude_consumed: bool = True  # rec lists leave out every item the user engaged with up to ds
    # Search lists keep them by default: finding again an item one bought is a legitimate search result.
    exclude_consumed_search: bool = False
    requests_path: Path | None = None  # Parquet of search requests (user_id, query); null: the queries of ds
    exact_max_items: int = Field(200_000, ge=0)  # exact IndexFlatIP up to this catalog size, IVF beyond
    min_ann_recall: float = Field(0.95, gt=0.0, le=1.0)  # IVF recall@N vs exact below this: exact is used
    ann_sample: int = Field(1000, ge=1)  # real request vectors the IVF recall is measured on
    ann_nlist: int | None = Field(None, ge=1)  # IVF lists; null: about sqrt(catalog)
    # IVF-PQ (32 bytes an item at d = 64) from this catalog size on, IVF-Flat below; it fetches pq_refine x N
    # items and re-scores them exactly from the model's item table (synergen_core.index)
    pq_min_items: int | None = Field(1_000_000, ge=1)
    pq_refine: int = Field(2, ge=1)
    batch_size: int = Field(256, ge=1)  # requests per model forward
    threads: int = Field(1, ge=1)  # torch and faiss threads per Spark task (tasks already run in parallel)
    # CPUs each scoring task takes (Spark stage-level scheduling: spark.task.cpus for this stage only).
    # With task_cpus = threads = spark.executor.cores an executor runs one Python worker using every core.
    # Standalone, YARN and Kubernetes masters with dynamic allocation off; ignored on a local master.
    task_cpus: int | None = Field(None, ge=1)
    # The model's passes in float32, or under bfloat16 autocast: faster on CPUs with AMX or AVX512-BF16
    # (slower without), and near-ties may swap places (BENCHMARKS.md "scoring" measures both); float32
    # keeps lists identical across machines.
    precision: Literal["float32", "bfloat16"] = "float32"
    partitions: int | None = Field(None, ge=1)  # Spark partitions of the requests; null: default parallelism
    progress: bool = True  # a tqdm bar per Spark task
    output: str = "candidates"  # lake layer: <lake>/<output>/ds=D/surface=rec|search/
    seed: int = 7  # the IVF k-means and the recall sample


class RegistryConfig(_Section):
    """The MLflow model registry and its promotion gate (jobs.promote); the registered model's
    name is ``mlflow.registered_model``."""

    protocol: Literal["loo", "temporal"] = "temporal"  # whose model is registered (the other one if it is missing)
    variant: VariantName = "synergen"
    # The gate's figure, higher is better: "<task>.<name>" with task rec|search, or all (the geometric mean
    # over the tasks evaluated: one model serves both surfaces), and name a catalog metric (recall@K, ndcg@K,
    # mrr) or a candidate-list one (rank_auc, rank_ndcg@K). The first version must beat popularity on it.
    metric: str = "all.ndcg@10"
    # A new version becomes champion unless its figure is below the champion's (re-evaluated on the same
    # day's test targets) by more than this share of the champion's figure.
    tolerance: float = Field(0.02, ge=0.0, lt=1.0)
    cache_dir: Path | None = None  # downloaded model versions; null: <lake.root>/_registry_cache
    skip_promotion: bool = False  # register as challenger only (the DAG's skip_promotion param)


class Config(_Section):
    lake: LakeConfig = LakeConfig()
    spark: SparkConfig = SparkConfig()
    mlflow: MlflowConfig = MlflowConfig()
    generate: GenerateConfig = GenerateConfig()
    # "validate" in YAML and the environment; the attribute is ``validation`` (``validate`` is pydantic's)
    validation: ValidateConfig = Field(ValidateConfig(), alias="validate")
    sessionize: SessionizeConfig = SessionizeConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    semantic_ids: SemanticIdConfig = SemanticIdConfig()
    embeddings: EmbeddingsConfig = EmbeddingsConfig()
    score: ScoreConfig = ScoreConfig()
    registry: RegistryConfig = RegistryConfig()

    model_config = ConfigDict(extra="forbid", populate_by_name=True, protected_namespaces=())

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    @property
    def layout(self) -> Layout:
        """Where each table of this pipeline lives in the lake (``synergen_core.lake.Layout``)."""
        return Layout.of(self)


def parse_ds(ds: str) -> dt.date:
    """``YYYY-MM-DD`` -> date, with an error that says what was expected."""
    try:
        if len(ds) == 10:
            return dt.date.fromisoformat(ds)
    except (TypeError, ValueError):
        pass
    raise ConfigError(f"bad ds {ds!r}: expected a day as YYYY-MM-DD")
