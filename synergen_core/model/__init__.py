"""The SynerGen model, one concept per module, in the order a batch flows through them:

- ``embeddings``: the input tokens (item ID + frozen text + semantic-ID codes, query text, action, surface)
- ``rope``: time-aware rotary position embeddings (angles from real timestamps and token order)
- ``masks``: task-specific attention masks over left- or right-padded histories
- ``backbone``: the decoder-only Transformer
- ``heads``: the retrieval, ranking and semantic-ID heads
- ``losses``: InfoNCE for retrieval, the hybrid pointwise + pairwise ranking loss, semantic-ID cross-entropy
- ``decoding``: constrained beam search that generates items code by code through the semantic-ID head
- ``synergen``: ``SynerGen``, which joins them, and the batch contract
"""
from synergen_core.model.synergen import RECOMMEND, SEARCH, SynerGen, next_item_targets, prediction_task

__all__ = ["RECOMMEND", "SEARCH", "SynerGen", "next_item_targets", "prediction_task"]
