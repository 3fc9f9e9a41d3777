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
