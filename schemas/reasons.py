"""Why a row was quarantined. Validation writes these into ``_reason`` (``;``-joined when several
apply); the generator uses the same codes to say which malformed rows it planted."""

NULL = "null:{column}"  # a required field is null, e.g. "null:user_id"
TS_OUTSIDE_DAY = "ts_outside_day"  # after the partition's day, or earlier than the late-event window
UNKNOWN_ACTION = "unknown_action"  # not in the table's known actions
EMPTY_QUERY = "empty_query"  # a search event whose query is empty or blank
UNKNOWN_ITEM = "unknown_item"  # the event's item is not in the catalog as of that day
BAD_VALUE = "bad_value"  # a browse value that is NaN, infinite, negative or above validate.max_value
DUPLICATE_ITEM_ID = "duplicate_item_id"  # a catalog id seen earlier in the same partition (first kept)
# An event id shared by rows of one partition whose content differs (schemas.raw.EVENT_CONTENT). Every row
# of that id is quarantined: nothing says which one is right. Exact copies of one event are not this:
# they are re-deliveries, valid, and sessionize keeps one.
CONFLICTING_EVENT_ID = "conflicting_event_id"


def null(column: str) -> str:
    return NULL.format(column=column)
