"""All gateway configuration, from the environment (prefix GATEWAY_), in one place."""

from __future__ import annotations

from functools import cached_property

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from client import contract
from client.preprocessing import DEFAULT_MAX_PIXELS

MiB = 1024 * 1024


def _split(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore", frozen=True)

    host: str = "0.0.0.0"
    port: int = Field(8000, ge=0, le=65535)
    workers: int = Field(1, ge=1, description="uvicorn worker processes (metrics are per process)")

    model_server: str = "127.0.0.1:8500"  # gRPC target of TensorFlow Serving or serving.modelserver
    model_name: str = contract.MODEL_NAME
    model_timeout: float = Field(5.0, gt=0, description="deadline of one Predict call, seconds")
    model_concurrency: int = Field(2, ge=1, description="Predict calls in flight; requests arriving meanwhile "
                                   "share the next call")
    max_batch_images: int = Field(64, ge=1, description="images per shared Predict call")
    status_timeout: float = Field(2.0, gt=0, description="deadline of GetModelStatus calls (readyz, models)")
    # Label names shown by /v1/models: GetModelStatus cannot list labels, so these are resolved one by one.
    labels: str = "stable,canary"

    max_file_bytes: int = Field(10 * MiB, gt=0)
    max_files: int = Field(64, gt=0, description="images per request")
    max_request_bytes: int = Field(64 * MiB, gt=0)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, gt=0, description="pixels per image (decompression bombs)")
    request_timeout: float = Field(30.0, gt=0, description="whole request, reading the body included, seconds")
    max_in_flight: int = Field(256, gt=0, description="concurrent classify requests; more get 429")
    preprocess_threads: int = Field(4, gt=0)
    default_top_k: int = Field(3, ge=1, le=len(contract.CLASS_NAMES))
    retry_after: int = Field(1, ge=0, description="seconds, sent with 429/503/504")

    api_keys: str = ""  # comma-separated; empty disables authentication
    cors_origins: str = ""  # comma-separated origins, or "*"
    log_level: str = "INFO"
    shutdown_grace: float = Field(10.0, ge=0, description="seconds to finish in-flight requests on SIGTERM")

    @cached_property
    def label_names(self) -> list[str]:
        return _split(self.labels)

    @cached_property
    def api_key_list(self) -> list[str]:
        return _split(self.api_keys)

    @cached_property
    def cors_origin_list(self) -> list[str]:
        return _split(self.cors_origins)
