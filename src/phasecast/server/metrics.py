"""Prometheus metrics. One registry per app, so several apps in one process (tests) never
collide."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from phasecast.fanout import Hub

if TYPE_CHECKING:
    from phasecast.server.ingest import ThinCounts

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.connections = Gauge(
            "phasecast_connections", "Open streaming connections", ["transport"],
            registry=self.registry,
        )
        self.watchers = Gauge(
            "phasecast_watchers", "Local watcher subscriptions across all connections",
            registry=self.registry,
        )
        self.watched_jobs = Gauge(
            "phasecast_watched_jobs", "Jobs with at least one local watcher",
            registry=self.registry,
        )
        self.updates = Counter(
            "phasecast_updates", "Write requests by result (applied, ignored, rejected)",
            ["result"], registry=self.registry,
        )
        self.messages = Counter(
            "phasecast_messages_sent", "State messages written to watchers", ["transport"],
            registry=self.registry,
        )
        self.conflated = Counter(
            "phasecast_messages_conflated",
            "States replaced by a newer one before a slow watcher read them "
            "(counted when the watcher's connection ends)",
            registry=self.registry,
        )
        self.latency = Histogram(
            "phasecast_delivery_latency_seconds",
            "From a change being accepted (updated_at) to its write to a watcher's socket",
            ["transport"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.rejected_requests = Counter(
            "phasecast_rejected_requests", "Requests refused, by reason code", ["code"],
            registry=self.registry,
        )
        self.thin: ThinCounts | None = None  # server/ingest.py registers it on first use

    def bind_hub(self, hub: Hub) -> None:
        self.watchers.set_function(lambda: hub.watchers)
        self.watched_jobs.set_function(lambda: hub.watched_jobs)

    def render(self) -> bytes:
        return generate_latest(self.registry)
