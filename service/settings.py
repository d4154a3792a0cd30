"""Service settings: one pydantic-settings class read from `NORMSERVE_*` environment variables
(and `.env`), validated at start-up, reached through the cached `get_settings()`."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NORMSERVE_", env_file=".env", extra="ignore", protected_namespaces=())

    # Where and how models load
    model_repository: Path = Path("model_repository")  # folder of <model>/<version>/{model.onnx,config.json}
    providers: str = "auto"  # "auto" (CUDA if present, else CPU) or a comma list of ORT execution providers
    intra_op_threads: int = Field(0, ge=0)  # ORT threads per session; 0 = CPU cores / worker processes
    inter_op_threads: int = Field(1, ge=1)
    warmup: bool = True  # run each model once before it reports ready
    strict_readiness: bool = True  # server ready only when every model is (Triton's default)
    classifier: str = "gncnn"  # model behind /classify and /features
    denoiser: str = "in_autoencoder"  # model behind /reconstruct

    # Process
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1)
    log_level: LogLevel = "info"
    shutdown_grace_s: float = Field(30.0, ge=0)

    # Limits
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)  # request body, enforced while reading
    max_image_pixels: int = Field(40_000_000, ge=1)  # any decoded image (header checked before decoding)
    max_reconstruct_pixels: int = Field(4_194_304, ge=16)  # /reconstruct works on the whole image at once
    max_features_pixels: int = Field(1_048_576, ge=16)  # /features at native size

    # Security and logging
    # When set, the inference routes need `Authorization: Bearer <key>`; health, metadata,
    # metrics, docs and the demo page stay open. Empty = no key.
    api_key: SecretStr | None = None
    # Origins allowed to call the API from a browser (comma list, or "*"); empty = no CORS headers at all.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    access_log: bool = True  # one JSON line per request on the `normserve.access` logger (stdout)

    @field_validator("providers")
    @classmethod
    def _providers(cls, v: str) -> str:
        v = v.strip()
        if not v:
            raise ValueError(
                "providers must be 'auto' or a comma list such as 'CUDAExecutionProvider,CPUExecutionProvider'"
            )
        return v

    @field_validator("api_key")
    @classmethod
    def _api_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None or not v.get_secret_value().strip():
            return None
        if v.get_secret_value() != v.get_secret_value().strip():
            raise ValueError("api_key has leading or trailing whitespace (a copy-paste slip?)")
        return v

    @field_validator("cors_origins", mode="before")
    @classmethod
    def _cors_origins(cls, v: object) -> object:
        if isinstance(v, str):
            return [o.strip() for o in v.split(",") if o.strip()]
        return v

    def provider_list(self, available: list[str]) -> list[str]:
        """Execution providers to request, most preferred first."""
        if self.providers == "auto":
            preferred = ["CUDAExecutionProvider", "CPUExecutionProvider"]
            return [p for p in preferred if p in available] or ["CPUExecutionProvider"]
        wanted = [p.strip() for p in self.providers.split(",") if p.strip()]
        unknown = [p for p in wanted if p not in available]
        if unknown:
            raise ValueError(
                f"execution providers {unknown} are not in this onnxruntime build (available: {available})"
            )
        return wanted

    def ort_intra_threads(self) -> int:
        if self.intra_op_threads:
            return self.intra_op_threads
        return max(1, (os.cpu_count() or 1) // self.workers)


@lru_cache
def get_settings() -> Settings:
    return Settings()
