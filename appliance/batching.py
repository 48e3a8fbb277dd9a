"""How texts are grouped into encoder calls: the one definition of the batch settings.

The Serve config validates them (``AppArgs.batch``), the serving batcher cuts batches and bounds its
queue by them, and the offline encoder plans its session calls by the same budget.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class BatchSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    max_batch_texts: int = Field(64, ge=1, le=1024)  # rows per encoder call
    max_batch_tokens: int = Field(4096, ge=64)  # padded tokens (longest row * rows) per encoder call
    # how long the serving batcher may hold the oldest text for a fuller batch; 0: never waits
    max_wait_ms: float = Field(0.0, ge=0.0, le=1000.0)
    max_queue_texts: int = Field(2048, ge=1)  # texts queued for serving; past that, RESOURCE_EXHAUSTED
    # serving batches in flight at once, each on its own worker thread; with intra_op_threads 0
    # the runtime raises it to the number of cores
    concurrent_batches: int = Field(1, ge=1, le=256)
