"""Prometheus metrics of the gateway, including per model version (TF Serving has no version label).

The predicted-class counter and the top-1 confidence histogram per version are a drift signal: a new
version, or a change in what users send, shows up as a shift in these distributions.
"""

from __future__ import annotations

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from client import contract

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)

REQUESTS = Counter("gateway_requests_total", "HTTP requests by route, method, status and model version",
                   ["route", "method", "status", "model_version"])
LATENCY = Histogram("gateway_request_duration_seconds", "HTTP request latency by route", ["route", "method"],
                    buckets=LATENCY_BUCKETS)
IN_FLIGHT = Gauge("gateway_requests_in_flight", "classify requests being processed")
IMAGES = Counter("gateway_images_classified_total", "images classified, by model version", ["model_version"])
PREDICTED = Counter("gateway_predicted_class_total", "top-1 predicted class, by model version",
                    ["model_version", "class_name"])
CONFIDENCE = Histogram("gateway_top1_confidence", "top-1 probability, by model version", ["model_version"],
                       buckets=CONFIDENCE_BUCKETS)
IMAGE_ERRORS = Counter("gateway_image_errors_total", "images refused, by error code", ["code"])
PREPROCESS = Histogram("gateway_preprocess_seconds", "decoding and resizing the images of one request",
                       buckets=LATENCY_BUCKETS)
MODEL_CALLS = Histogram("gateway_model_server_seconds", "Predict calls to the model server, by outcome",
                        ["outcome"], buckets=LATENCY_BUCKETS)
BATCH_IMAGES = Histogram("gateway_model_batch_images", "images per Predict call (requests coalesced)",
                         buckets=(1, 2, 4, 8, 16, 32, 64, 128))
REJECTED = Counter("gateway_overload_rejections_total", "classify requests refused with 429 (too many in flight)")


def observe_predictions(version: int, probabilities: np.ndarray) -> None:
    label = str(version)
    top = probabilities.argmax(axis=1).tolist()
    confidence = probabilities.max(axis=1).tolist()
    IMAGES.labels(label).inc(len(top))
    hist = CONFIDENCE.labels(label)
    for class_id, p in zip(top, confidence, strict=True):
        PREDICTED.labels(label, contract.CLASS_NAMES[class_id]).inc()
        hist.observe(p)


def render() -> tuple[bytes, str]:
    return generate_latest(), CONTENT_TYPE_LATEST
