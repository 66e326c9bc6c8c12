"""What the service tells operators: Prometheus metrics at ``GET /metrics`` (prometheus_client's text format).

Counters and histograms, one registry per service (so that several services in one process, as in the tests,
keep their own): requests by route and status, their latency, images per forward pass, answers, answers the
input check flagged, and positive calls per finding. The rates a dashboard wants follow in PromQL, e.g. the flag
rate ``rate(cxrlearn_flagged_total[1h]) / rate(cxrlearn_answers_total[1h])``. No patient data: counts only.
"""

from __future__ import annotations

from typing import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

#: The routes requests are counted by; any other path is counted as "other" (a bounded set of label values).
ROUTES = ("/v1/predict", "/v1/model", "/healthz", "/", "/metrics")
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024)


class ServiceMetrics:
    """The service's metrics: :meth:`request` from the request middleware, :meth:`batch` from the batcher,
    :meth:`answered` for each prediction, :meth:`exposition` for ``/metrics``."""

    def __init__(self, findings: Sequence[str]):
        self.registry = CollectorRegistry()
        self.requests = Counter("cxrlearn_requests", "HTTP requests answered, by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("cxrlearn_request_seconds", "seconds from a request's arrival to its answer",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("cxrlearn_batch_size", "images in each forward pass", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.answers = Counter("cxrlearn_answers", "images answered", registry=self.registry)
        self.flagged = Counter("cxrlearn_flagged", "answers the input check flagged", registry=self.registry)
        self.positive = Counter("cxrlearn_positive", "positive calls, by finding", ["finding"],
                                registry=self.registry)
        for finding in findings:  # every finding's count exists from the start, at zero
            self.positive.labels(finding)

    def request(self, path: str, status: int, seconds: float) -> None:
        route = path if path in ROUTES else "other"
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def batch(self, images: int) -> None:
        self.batch_size.observe(images)

    def answered(self, flagged: bool, positive: Sequence[str] | None) -> None:
        self.answers.inc()
        if flagged:
            self.flagged.inc()
        for finding in positive or ():
            self.positive.labels(finding).inc()

    def exposition(self) -> tuple[bytes, str]:
        """The metrics in Prometheus's text format, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
