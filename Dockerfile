# normserve CPU image: the service on ONNX Runtime (CPU), serving the committed model repository.
#
#   docker build -t normserve:0.1.0 .
#   docker run --rm -p 127.0.0.1:8000:8000 -p 127.0.0.1:8001:8001 --read-only --tmpfs /tmp normserve:0.1.0
#
# Two stages. `builder` installs the project's runtime dependencies into /opt/venv, builds the
# project's wheel and installs it (not editable); `runtime` (the last stage, so the default
# target) copies only that venv and the model repository onto a clean base. No torch (it lives
# in the `export` extra only), no compilers, no pip cache, no pip in the final venv.
# The GPU variant is Dockerfile.gpu. This file avoids BuildKit-only syntax so that the legacy
# builder (docker-compose v1, engines without BuildKit) builds it too.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
WORKDIR /src

# Dependencies first, from pyproject alone, in their own layer: editing code does not
# re-download them. `[project] dependencies` (the runtime set) and the `tracing` extra
# (OpenTelemetry; off unless NORMSERVE_TRACING=true, docs/tracing.md), never another extra.
COPY pyproject.toml ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; print('\n'.join(p['dependencies'] + p['optional-dependencies']['tracing']))" \
        > /tmp/requirements.txt \
    && /opt/venv/bin/pip install -r /tmp/requirements.txt

COPY . .
# NOTE: pip byte-compiles what it installs; those .pyc files are kept (faster start-up), and at
# run time PYTHONDONTWRITEBYTECODE stops Python writing any more (the root filesystem is read-only).
RUN /opt/venv/bin/pip wheel --no-deps --wheel-dir /dist . \
    && /opt/venv/bin/pip install --no-deps /dist/normserve-*.whl \
    && /opt/venv/bin/python -m pip uninstall -y pip setuptools wheel \
    && mkdir /models \
    && cp -r model_repository/. /models/ \
    && chmod -R u=rwX,go=rX /models

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG SOURCE=unknown
LABEL org.opencontainers.image.title="normserve" \
      org.opencontainers.image.description="GroupNorm CIFAR-10 classifier and InstanceNorm denoiser on ONNX Runtime (CPU), Open Inference Protocol v2 health and metadata" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="python:3.11-slim"

# HOME=/tmp: the only writable place when the root filesystem is read-only.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    NORMSERVE_MODEL_REPOSITORY=/models \
    NORMSERVE_HOST=0.0.0.0 \
    NORMSERVE_PORT=8000 \
    NORMSERVE_GRPC_PORT=8001

# A fixed numeric UID/GID, so Kubernetes' runAsNonRoot can check it without a passwd lookup.
RUN groupadd --system --gid 10001 normserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin normserve \
    && mkdir /app

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /models /models

# Empty and root-owned: pydantic-settings looks for ./.env here (mount one to configure).
WORKDIR /app
USER 10001:10001
# HTTP (REST, Open Inference Protocol v2) and gRPC (inference.GRPCInferenceService, as Triton's)
EXPOSE 8000 8001

# Ready = every model loaded and warmed up. urllib raises on a 503, so the exit code follows it.
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/ready' % os.environ.get('NORMSERVE_PORT', '8000'), timeout=2)"

# SIGTERM: uvicorn stops accepting, drains for NORMSERVE_SHUTDOWN_GRACE_S, then exits.
STOPSIGNAL SIGTERM
CMD ["normserve", "serve"]
