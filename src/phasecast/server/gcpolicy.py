"""Garbage collection for a server that holds thousands of connections.

CPython's cyclic collector pauses the event loop, and a full collection walks every tracked
object: with 10,000 watchers that is hundreds of thousands of objects, a pause of tens to
hundreds of milliseconds, which is the fan-out's latency tail. Two settings keep full
collections rare and small (measured: docs/benchmarks.md, "Delivery path"):

- once the server has started, everything built so far (modules, the app, the engine's
  clients: objects that live as long as the process) is collected once and then frozen
  (``gc.freeze``), so no later collection walks it again;
- the young generation is collected after 50,000 net allocations instead of 700: the
  objects a change makes on its way through (the change, its wire forms, parser output) are
  gone by then and are never promoted, so the old generation grows only with what really
  lives long (connections), and a full collection, which CPython runs once the old
  generation has grown by a quarter, comes that much more rarely.

Only ``phasecast serve`` does this (a startup hook); tests and embedding apps keep their
interpreter's settings.
"""

from __future__ import annotations

import gc
from typing import Any

YOUNG_GENERATION_THRESHOLD = 50_000


async def settle_after_startup(app: Any, services: Any) -> None:
    """A startup hook (``server.app.Startup``): freeze what start-up built, then raise the
    young generation's threshold."""
    gc.collect()
    gc.freeze()
    young, middle, old = gc.get_threshold()
    gc.set_threshold(max(young, YOUNG_GENERATION_THRESHOLD), middle, old)
