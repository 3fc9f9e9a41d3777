"""Data contracts: Arrow schemas, column names and expectation suites for every lake table.

This package is the one place column names are defined; code elsewhere imports them from here.
"""
from schemas import columns as C  # noqa: F401
from schemas.raw import (  # noqa: F401
    BROWSE_ACTIONS,
    BROWSE_EVENTS,
    CATALOG,
    ENGAGEMENT_ACTIONS,
    RAW_TABLES,
    SEARCH_ACTIONS,
    SEARCH_EVENTS,
    TS_DERIVED_KEY,
    quarantine_schema,
)
