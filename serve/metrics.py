"""Prometheus metrics of the server, in a registry of its own (several apps can live in one test process).

Gauges that mirror the engine (active slots, engine queue) are read from it at scrape time through
`set_function`, so /metrics reports the engine's truth, not a counter of ours that could drift.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class ServerMetrics:

  def __init__(self, prefix: str = "dsocr"):
    r = self.registry = CollectorRegistry()
    p = prefix
    self.requests = Counter(f"{p}_requests", "Finished HTTP requests to the API routes, by status code",
                            ["route", "status"], registry=r)
    self.prompt_tokens = Counter(f"{p}_prompt_tokens", "Prompt tokens (text + image placeholders)", registry=r)
    self.image_tokens = Counter(f"{p}_image_tokens", "Image placeholder tokens in prompts", registry=r)
    self.completion_tokens = Counter(f"{p}_completion_tokens", "Generated tokens", registry=r)
    self.images = Counter(f"{p}_images", "Images received", ["mode"], registry=r)
    self.finish_reasons = Counter(f"{p}_finish_reasons", "Finished choices by finish reason", ["reason"],
                                  registry=r)
    self.repetition_stops = Counter(f"{p}_repetition_stops", "Choices stopped by the repetition detector",
                                    registry=r)
    self.cancelled = Counter(f"{p}_cancelled", "Engine requests cancelled (client disconnected)", registry=r)
    self.ttft = Histogram(f"{p}_time_to_first_token_seconds", "Request arrival to the first generated token",
                          buckets=_LATENCY_BUCKETS, registry=r)
    self.latency = Histogram(f"{p}_request_latency_seconds", "Request arrival to the last byte of the answer",
                             buckets=_LATENCY_BUCKETS, registry=r)
    self.preprocess = Histogram(f"{p}_image_prepare_seconds", "Fetch + decode + preprocess + vision encode",
                                buckets=_LATENCY_BUCKETS, registry=r)
    self.engine_time = Histogram(f"{p}_engine_seconds", "Engine submit to finish, per choice",
                                 buckets=_LATENCY_BUCKETS, registry=r)
    self.in_flight = Gauge(f"{p}_requests_in_flight", "Admitted chat requests not yet answered", registry=r)
    self.queue_depth = Gauge(f"{p}_queue_depth", "Engine requests waiting for a slot", registry=r)
    self.active_slots = Gauge(f"{p}_active_slots", "Engine slots holding a running request", registry=r)
    self.ready = Gauge(f"{p}_ready", "1 when warmed up and not draining", registry=r)

  def bind_engine(self, active_slots: Callable[[], float], queue_depth: Callable[[], float]) -> None:
    self.active_slots.set_function(active_slots)
    self.queue_depth.set_function(queue_depth)

  def render(self) -> tuple[bytes, str]:
    return generate_latest(self.registry), CONTENT_TYPE_LATEST
