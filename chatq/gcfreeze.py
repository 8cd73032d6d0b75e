"""Keep the garbage collector's full collections off the request path.

A full (generation 2) collection walks every object the process holds. After start-up an
API process holds ~100 000 of them (Litestar, msgspec types, nats-py, redis-py, the
profiles), a worker many more (vLLM's front end, the tokenizer), and one full collection
takes ~25 ms on this machine: a request whose first chunk is in flight then waits that long.
Almost none of those objects ever become garbage. `gc.freeze()` moves them to a permanent
generation the collector no longer walks (CPython's documented use: call it once start-up
is done), so later collections see only what requests create.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("chatq.gc")


def freeze_startup_objects(what: str) -> None:
    """Collect once, then freeze what survives: call when `what` has finished starting."""
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    log.debug(
        "%s: %d objects frozen out of garbage collection (%.0f ms)",
        what,
        gc.get_freeze_count(),
        (time.perf_counter() - started) * 1000,
    )


def thaw() -> None:
    """Before dropping much of what was frozen (a worker unloading its model): frozen objects
    are never collected, so give them back to the collector first."""
    gc.unfreeze()
