"""Prometheus metrics of one server (``GET /metrics``), in a registry of its own.

Per-turn figures are histograms (time to first token, decode rate, memory-update latency,
state commit time); engine load is read at scrape time (rows decoding, turns queued, updates
pending), as are the conversations with a turn in flight.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_RATES = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "rxt_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.ttft = Histogram(
            "rxt_time_to_first_token_seconds",
            "From a turn's request to its first generated token",
            buckets=_FAST,
            registry=r,
        )
        self.tokens = Counter("rxt_generated_tokens", "Tokens generated", registry=r)
        self.tokens_per_second = Histogram(
            "rxt_turn_tokens_per_second",
            "Decode rate of one turn (tokens after the first / their time)",
            buckets=_RATES,
            registry=r,
        )
        self.update_latency = Histogram(
            "rxt_memory_update_latency_seconds",
            "From an answer's last token to its memory update committed in the engine",
            buckets=_FAST,
            registry=r,
        )
        self.commit_latency = Histogram(
            "rxt_state_commit_seconds",
            "Writing a turn's STM version to the state store",
            buckets=_FAST,
            registry=r,
        )
        self.turns = Counter("rxt_turns", "Turns answered, by API", ["api"], registry=r)
        self.replayed = Counter(
            "rxt_replayed_turns", "Earlier turns encoded into memory from a transcript", registry=r
        )
        self.prefix = Counter(
            "rxt_transcript_prefix_lookups",
            "Chat transcripts whose longest seen prefix was found (hit) or not (miss)",
            ["result"],
            registry=r,
        )
        self.forks = Counter("rxt_conversation_forks", "Conversations forked", registry=r)
        self.commit_failures = Counter(
            "rxt_state_commit_failures", "Turns whose state could not be stored", registry=r
        )

    def gauges(
        self,
        queue_depth: Callable[[], float],
        batch_rows: Callable[[], float],
        updates_pending: Callable[[], float],
        active_conversations: Callable[[], float],
    ) -> None:
        r = self.registry
        for name, doc, read in (
            ("rxt_queue_depth", "Turns waiting to join the decoding batch", queue_depth),
            ("rxt_batch_rows", "Turns decoding in the current batch", batch_rows),
            ("rxt_memory_updates_pending", "Memory updates queued or running", updates_pending),
            (
                "rxt_active_conversations",
                "Conversations with a turn being answered or committed",
                active_conversations,
            ),
        ):
            Gauge(name, doc, registry=r).set_function(read)

    def render(self) -> bytes:
        return generate_latest(self.registry)
