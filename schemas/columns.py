"""Column names of every lake table. Import as ``from schemas import C``."""

# raw events (search and browse)
EVENT_ID = "event_id"
USER_ID = "user_id"
TS = "ts"
QUERY = "query"
ITEM_ID = "item_id"
ACTION = "action"
VALUE = "value"
SURFACE = "surface"
IMPRESSIONS = "impressions"

# raw catalog
TITLE = "title"
DESCRIPTION = "description"
CATEGORIES = "categories"
BRAND = "brand"

# partitioning
DS = "ds"

# quarantine bookkeeping: where a row came from and why it was set aside
REASON = "_reason"
SOURCE_FILE = "_source_file"
SOURCE_ROW = "_source_row"

# sessionized events, tokens and sequences (schemas/sequences.py)
KIND = "kind"  # which raw table an event came from: "search" or "browse"
LATE = "late"  # ts is before the day the event arrived in
CLAMPED = "clamped"  # late and earlier than the user's latest known event
EVENT_POS = "event_pos"  # 0-based rank of the event in its user's history
POS = "pos"  # 0-based position of a token in its user's history
SESSION = "session"  # 0-based session index within the user's history
GAP_S = "gap_s"  # seconds since the user's previous event (null for the first)
TOKEN_TYPE = "type"  # "query" or "item"
ITEM_INDEX = "item_index"
QUERY_INDEX = "query_index"
TOKENS = "tokens"
N_EVENTS = "n_events"
N_TOKENS = "n_tokens"
LAST_SESSION = "last_session"
WATERMARK = "watermark"  # latest event time of the user so far
SHOWN_ITEMS = "shown_items"  # item indices logged as shown with an event (impressions), engaged one excluded
CONSUMED = "consumed"  # item indices of every event of a user so far, sorted, each once

# vocabularies
FIRST_DS = "first_ds"
COUNT = "count"

# training and evaluation splits
TASK = "task"  # "recommendation" or "search"
SPLIT = "split"  # "valid" or "test"
TARGET_POS = "target_pos"
TARGET_TS = "target_ts"
CONTEXT = "context"

# item/query embeddings and semantic IDs (schemas/semantic_ids.py)
TEXT_HASH = "text_hash"  # sha256 of the encoder fingerprint and the embedded text
VECTOR = "vector"
EMBEDDED_DS = "embedded_ds"  # day the vector was computed (older than ds: carried over unchanged)
VECTOR_SOURCE = "source"  # what made a collaborative vector: "als", "champion" or "text_neighbours"
COMPUTED_DS = "computed_ds"
SEARCH_CODES = "search_codes"  # search-view semantic ID: shared codes + text codes
REC_CODES = "rec_codes"  # recommendation-view semantic ID: shared codes + collaborative codes
RAW_CODES = "raw_codes"  # RQ-VAE codes before collision handling: [shared | text | collab]
ID_DS = "id_ds"  # day the item's current search and rec IDs were first given

# candidate lists of the scoring stage (schemas/candidates.py)
RANK = "rank"  # 1-based position of an item in its request's list, best first
RETRIEVAL_SCORE = "retrieval_score"  # the retriever's score (dense: cosine / temperature; generative: log-prob)
RANKING_SCORE = "ranking_score"  # the ranking head's logit: the list's order
MODEL_NAME = "model_name"
MODEL_VERSION = "model_version"
