"""The one exception type for known failures.

A ``PipelineError``'s message is complete on its own: one or two lines that name the file, row, field,
day or key at fault and say what to do. The CLI prints it without a traceback (``--debug`` or
``SYNERGEN_DEBUG=1`` shows one); inside Airflow the task log keeps the full traceback as usual.
"""
from __future__ import annotations


class PipelineError(RuntimeError):
    """A known failure with a message fit for the person running the pipeline."""
