"""Service settings: one pydantic-settings class read from `NORMSERVE_*` environment variables
(and `.env`), validated at start-up, reached through the cached `get_settings()`."""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from normserve.service.tiling import Blend
from normserve.service.versions import VersionPolicy

LogLevel = Literal["critical", "error", "warning", "info", "debug"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="NORMSERVE_", env_file=".env", extra="ignore", protected_namespaces=())

    # Where and how models load
    model_repository: Path = Path("model_repository")  # folder of <model>/<version>/{model.onnx,config.json}
    providers: str = "auto"  # "auto" (CUDA if present, else CPU) or a comma list of ORT execution providers
    # Model instances (Triton's instance_group count): how many batches of one model run at the same
    # time in a worker process, each an ORT run on its own thread. 0 = auto: 1 when intra_op_threads
    # is set (whoever chose the threads per run chose workers x threads = cores), else 2 when the
    # worker has at least 2 CPUs, else 1. Keep workers x instances x intra_op_threads = the cores.
    model_instances: int = Field(0, ge=0)
    intra_op_threads: int = Field(0, ge=0)  # ORT threads per run; 0 = CPU cores / (worker processes x instances)
    inter_op_threads: int = Field(1, ge=1)
    # ORT's intra-op threads spin-wait for the next run by default; off, idle ORT threads leave the
    # cores to decoding, encoding and HTTP in the same process (session.intra_op.allow_spinning).
    intra_op_spinning: bool = True
    # A run of at least this many pixels (rows x H x W) uses every core of the machine when no other
    # run is in progress in any worker process (service/cores.py); smaller runs always take their
    # share. 256 x 256: the denoiser gains from the wide session from there, while the classifier's
    # runs (32 x 32 x 32 at most) never do (README: Batching, overload and threads).
    wide_run_pixels: int = Field(256 * 256, ge=1)
    # The folder the worker processes of one server share: core locks (service/cores.py) and
    # readiness marks (service/workers.py). `normserve serve` sets it, a fresh folder per start;
    # unset, a server process makes one of its own.
    runtime_dir: Path | None = None
    # Which versions of each model load (service/versions.py; Triton's version_policy): "all",
    # "latest:N" or "specific:V[,V...]". `version_policies` overrides it per model, as JSON
    # ({"gncnn": "latest:2"}); a model name that is not in the repository stops the server.
    # Triton's default, the newest version only: each version loaded costs every worker its session
    # (the shipped 8 + 3 versions: 485 MiB idle server against 299 MiB; docs/limits-http.md).
    version_policy: Annotated[VersionPolicy, NoDecode] = VersionPolicy.LATEST_ONE
    version_policies: Annotated[dict[str, VersionPolicy], NoDecode] = Field(default_factory=dict)
    # Rescan the repository every this many seconds while serving and load new, changed and
    # removed versions (service/poller.py; Triton's poll mode); 0 = only at start-up.
    repository_poll_s: float = Field(0.0, ge=0)
    warmup: bool = True  # run each model once before it reports ready
    strict_readiness: bool = True  # server ready only when every model is (Triton's default)
    classifier: str = "gncnn"  # model behind /classify and /features
    denoiser: str = "in_autoencoder"  # model behind /reconstruct

    # Process
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    # Worker processes: what `normserve serve` starts (its default, and 0 here: one per CPU, at
    # most 2; service/cores.py lets them share the cores). A server started otherwise is one process.
    workers: int = Field(1, ge=0)
    log_level: LogLevel = "info"
    shutdown_grace_s: float = Field(30.0, ge=0)
    # gRPC (service/grpc_server.py): Triton's inference.GRPCInferenceService on a port of its own,
    # in every worker process (one port shared through SO_REUSEPORT), next to HTTP on `port`.
    grpc: bool = True  # NORMSERVE_GRPC=false: HTTP only
    grpc_port: int = Field(8001, ge=1, le=65535)  # Triton's default
    # Largest message gRPC accepts / sends. 0 = max_body_bytes, so a request that HTTP takes is
    # taken over gRPC too (gRPC's own default, 4 MiB, is too small for image batches).
    grpc_max_receive_bytes: int = Field(0, ge=0)
    grpc_max_send_bytes: int = Field(64 * 1024 * 1024, ge=1024)
    # Calls one worker's gRPC server serves at once; past it gRPC answers RESOURCE_EXHAUSTED before
    # receiving the message (gRPC receives a whole message, up to grpc_max_receive_bytes, before the
    # handler can reserve it from the budget). 0 = the budget over the largest message, at least 4.
    grpc_max_concurrent_rpcs: int = Field(0, ge=0)

    # Limits
    max_body_bytes: int = Field(32 * 1024 * 1024, ge=1024)  # request body, enforced while reading
    # The JSON part of a V2 inference request (all of a JSON body, or what Inference-Header-Content-Length
    # says): parsing it holds the GIL, ~6 ms per MiB in which the worker answers nobody. Binary tensors
    # (Triton's binary extension) are limited by max_body_bytes only.
    max_json_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(40_000_000, ge=1)  # any decoded image (header checked before decoding)
    max_reconstruct_pixels: int = Field(24_000_000, ge=16)  # /reconstruct (6000 x 4000); larger than a tile runs tiled
    # /features at native size (384 x 384): its feature maps (112 floats a pixel) and their JSON
    # take ~4 KB a pixel, so this is what fits one worker's memory budget (docs/limits-budgets.md)
    max_features_pixels: int = Field(147_456, ge=16)
    # Resource budgets of one worker process (service/budget.py, docs/limits-budgets.md). Every
    # request (HTTP or gRPC) reserves its estimated peak working memory before decoding or
    # running, and its body before reading it; the reservations of one worker add up to at most this. A request larger than all of it gets
    # 413; one that does not fit now waits at most memory_wait_s, then gets 503 with Retry-After.
    # 640 MiB: two workers (the default on 2 CPUs) stay within 1.5 GB above their start-up RSS.
    worker_memory_mb: int = Field(640, ge=16)
    memory_wait_s: float = Field(5.0, ge=0)
    # CPU bounds of a decode (413 beyond): scans of a (progressive) JPEG, each a pass over the
    # whole image (standard encoders write at most ~20; libjpeg-turbo's scan limit is 500), and
    # declared pixels per byte of file for images over 4 MP (a 35-byte GIF declaring 38 MP).
    # 0 turns either check off.
    max_jpeg_scans: int = Field(100, ge=0)
    max_pixels_per_byte: int = Field(2000, ge=0)
    # /classify and /features decode images of at most this many pixels (in a body of at most
    # 64 KiB) on the event loop, without a thread-pool trip; 0 = always in the thread pool
    # (a header in a body of at most 64 KiB is read on the event loop either way).
    inline_decode_pixels: int = Field(128 * 128, ge=0)
    # Decodes whose Pillow image has more pixels than this run one at a time in each worker
    # (waiting counts against the request's deadline): Pillow holds the GIL while it allocates and
    # frees a large image, so several at once stall the event loop for their sum. 0 = no limit.
    serial_decode_pixels: int = Field(4_000_000, ge=0)
    # POST /classify and V2 infer answered below FastAPI's routing, without dependency solving or a
    # response model (raw_routes.py); off: FastAPI's routes answer them. Same answers and errors either way.
    raw_routes: bool = True

    # HTTP limits, per worker process (service/http_limits.py; `normserve serve` applies them to uvicorn)
    max_header_bytes: int = Field(16 * 1024, ge=1024)  # request line + headers; 431 past it (Node's and h11's 16 KiB)
    header_timeout_s: float = Field(10.0, gt=0)  # whole header block, from connect or the request's first byte; 408
    body_timeout_s: float = Field(60.0, gt=0)  # whole body, from the end of the header; 408 (or close)
    # Connections and requests in flight per worker (uvicorn's limit_concurrency); past it every
    # new request is answered 503 with Retry-After until some finish. 0 = no cap.
    max_connections: int = Field(128, ge=0)
    keep_alive_timeout_s: float = Field(5.0, gt=0)  # idle keep-alive connection closed after (uvicorn's default)
    keep_alive_max_requests: int = Field(1000, ge=0)  # requests per connection, then Connection: close; 0 = no cap
    # After an early answer (a 413 for a body over the limit) up to this much of the rest of the body
    # is read and thrown away to keep the connection (Go's net/http: 256 KiB); a longer rest is not
    # read: the answer says Connection: close and the connection is closed once it is written.
    max_discard_bytes: int = Field(256 * 1024, ge=0)
    # Memory returned: once a worker has had no request in flight for this long after some, ORT's
    # arenas are shrunk and free pages go back to the system (service/memory.py). 0 = never.
    memory_trim_idle_s: float = Field(2.0, ge=0)
    # ONNX Runtime's CPU memory arena (SessionOptions.enable_cpu_mem_arena): on, each session keeps
    # the largest activations any run needed for the life of the process; off, they are malloc'd
    # per run and go back with the trim above.
    cpu_mem_arena: bool = True
    # glibc malloc arenas per worker process (mallopt M_ARENA_MAX, as MALLOC_ARENA_MAX); 0 = glibc's
    # default, 8 per core. Fewer arenas keep fewer pages that a trim cannot return (docs/limits-http.md).
    malloc_arenas: int = Field(2, ge=0)

    # Dynamic batching and overload, per model (a model's config.json may override the first three
    # in its "dynamic_batching" block). See service/batching.py.
    max_batch_size: int = Field(32, ge=1)  # rows per model run; a V2 request with more rows is refused (400)
    max_queue_delay_ms: float = Field(0.0, ge=0)  # how long the oldest queued request waits for others to join
    max_queue_size: int = Field(64, ge=1)  # requests waiting per model; one more gets 503 with Retry-After
    # rows x H x W of requests joined into one run; 0 = the largest run a route makes alone (for a
    # denoiser one tile batch, reconstruct_tile² x reconstruct_tile_batch; for a classifier max_features_pixels)
    max_batch_pixels: int = Field(0, ge=0)
    # the whole request after its body is read (decode, memory wait, queue, run, tiles, encode);
    # 504 after, and work not yet started is dropped (as it is when the client disconnects)
    request_timeout_s: float = Field(30.0, gt=0)
    # /reconstruct on images larger than a tile (service/tiling.py): memory ~ tile² × batch, not image size.
    # 512/64/cosine: tiling costs no PSNR vs whole-image runs (scripts/tile_gap.py; README: Large images).
    reconstruct_tile: int = Field(512, ge=16)  # tile side; an image within one tile runs whole
    reconstruct_overlap: int = Field(64, ge=0)  # least overlap between neighbouring tiles (at most tile / 2)
    # tiles per model call: each 512² tile takes ~170 MB of the worker's memory budget while it runs
    reconstruct_tile_batch: int = Field(2, ge=1)
    reconstruct_blend: Blend = "cosine"  # tile blending window: cosine | linear | flat
    # /reconstruct response encoding (Accept: image/png (default) | image/webp | image/jpeg)
    png_compress_level: int = Field(1, ge=0, le=9)  # zlib level: 1 encodes fast, 9 smallest
    jpeg_quality: int = Field(90, ge=1, le=95)
    webp_quality: int = Field(90, ge=0, le=100)  # lossy WebP

    # Security and logging
    # When set, the inference routes need `Authorization: Bearer <key>`; health, metadata,
    # metrics, docs and the demo page stay open. Empty = no key.
    api_key: SecretStr | None = None
    # Origins allowed to call the API from a browser (comma list, or "*"); empty = no CORS headers at all.
    cors_origins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    access_log: bool = True  # one JSON line per request on the `normserve.access` logger (stdout)
    # OpenTelemetry traces of each request, exported over OTLP/HTTP (the `tracing` extra; the
    # OTEL_* environment configures the endpoint, sampler and service name; docs/tracing.md).
    tracing: bool = False

    @model_validator(mode="after")
    def _overlap_fits(self) -> Settings:
        if 2 * self.reconstruct_overlap > self.reconstruct_tile:
            raise ValueError(
                f"reconstruct_overlap ({self.reconstruct_overlap}) must be at most half of "
                f"reconstruct_tile ({self.reconstruct_tile})"
            )
        return self

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int) -> int:
        return v or default_workers()

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

    @field_validator("version_policy", mode="before")
    @classmethod
    def _version_policy(cls, v: object) -> object:
        return VersionPolicy.parse(v) if isinstance(v, str) else v

    @field_validator("version_policies", mode="before")
    @classmethod
    def _version_policies(cls, v: object) -> object:
        if isinstance(v, str):  # from the environment: JSON, or empty for none
            v = json.loads(v) if v.strip() else {}
        if isinstance(v, dict):
            return {name: VersionPolicy.parse(p) if isinstance(p, str) else p for name, p in v.items()}
        return v

    def policy_for(self, model: str) -> VersionPolicy:
        return self.version_policies.get(model, self.version_policy)

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

    def grpc_receive_limit(self) -> int:
        return self.grpc_max_receive_bytes or self.max_body_bytes

    def grpc_concurrent_rpcs(self) -> int:
        """NORMSERVE_GRPC_MAX_CONCURRENT_RPCS, or as many largest messages as the worker's budget holds (>= 4)."""
        if self.grpc_max_concurrent_rpcs:
            return self.grpc_max_concurrent_rpcs
        return max(4, self.worker_memory_mb * 1024 * 1024 // self.grpc_receive_limit())

    def cpus_per_worker(self) -> int:
        return max(1, usable_cpus() // self.workers)

    def instances(self) -> int:
        """Concurrent runs per model version in one worker process (see model_instances)."""
        if self.model_instances:
            return self.model_instances
        if self.intra_op_threads:
            return 1
        return 2 if self.cpus_per_worker() >= 2 else 1

    def ort_intra_threads(self) -> int:
        if self.intra_op_threads:
            return self.intra_op_threads
        return max(1, self.cpus_per_worker() // self.instances())

    def ort_wide_threads(self) -> int:
        """Threads for a run that has the machine to itself (no other run in progress in any
        worker; service/cores.py), or 0 when it would be no wider than `ort_intra_threads` or the
        threads were set explicitly. With the default layout a lone large request then uses every
        core, and concurrent ones split them."""
        wide = usable_cpus()
        if self.intra_op_threads or wide <= self.ort_intra_threads():
            return 0
        return wide


CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path | None = None) -> int | None:
    """The CPUs this process's cgroup CPU bandwidth limit allows (`docker run --cpus`, compose
    `cpus:`, Kubernetes `limits.cpu`), rounded up; None when there is no limit or no cgroup.

    cgroup v2 `cpu.max` ("max 100000" or "150000 100000": quota and period in µs), else v1
    `cpu/cpu.cfs_quota_us` (-1: none) over `cpu/cpu.cfs_period_us`, read where a container sees its
    own cgroup. The same reading and rounding as loky's `cpu_count` (joblib, scikit-learn) and the
    JDK's container support. Threads beyond the quota do not run in parallel: the kernel stops the
    whole cgroup for the rest of each period once the quota is spent, which shows as latency spikes.
    """
    root = root or CGROUP_ROOT
    try:
        v2 = root / "cpu.max"
        if v2.is_file():
            quota, period = v2.read_text().split()
        else:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        q, p = (-1 if quota == "max" else int(quota)), int(period)
    except (OSError, ValueError):  # no cgroup files (not Linux, not mounted) or an unexpected format
        return None
    if q <= 0 or p <= 0:
        return None
    return max(1, math.ceil(q / p))


def usable_cpus() -> int:
    """The CPUs this process may use: the CPUs it may run on (taskset, cgroup cpusets), capped by
    its cgroup's CPU quota; not every CPU of the machine."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    return min(allowed, limit) if limit else allowed


def default_workers() -> int:
    """Worker processes `normserve serve` starts by default: one per CPU, at most 2. Measured on
    2 cores (README: Benchmark, "Two workers by default"): two workers serve /classify at 1.5 x one worker's rate,
    and with the core lock a lone large /reconstruct still gets both cores. More workers than 2
    were not measured; see the README for larger machines."""
    return min(2, usable_cpus())


@lru_cache
def get_settings() -> Settings:
    return Settings()
