# syntax=docker/dockerfile:1
# Committee images, one Dockerfile, three targets (docs/operations.md):
#   serve      (default) CUDA runtime + onnxruntime-gpu; service/ and model_store/ only, no torch
#   serve-cpu  the same on a plain Python base with onnxruntime
#   train      torch + timm + the training package, running committee-train
# The bases are build arguments, so a locally made base works where no registry is reachable:
#   podman build --isolation chroot --build-arg PYTHON_BASE=localhost/bookworm-python --target serve-cpu .
# pip's own settings pass through as build arguments when a build needs them (make image-test: a
# TLS-intercepting proxy's CA, a folder of local wheels): PIP_CERT, PIP_FIND_LINKS, PIP_INDEX_URL.
ARG PYTHON_BASE=python:3.11-slim-bookworm
ARG CUDA_BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---- the project as a wheel, built once for every target ----------------------------------------
FROM ${PYTHON_BASE} AS wheel
ARG PIP_CERT PIP_FIND_LINKS PIP_INDEX_URL
WORKDIR /src
COPY pyproject.toml README.md ./
COPY model_store/ model_store/
COPY service/ service/
COPY training/ training/
# a venv for pip: minimal bases (debootstrap's) have Python and venv but no system pip
RUN python3 -m venv /tmp/build && /tmp/build/bin/pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# ---- serving on CPU ---------------------------------------------------------------------------------
FROM ${PYTHON_BASE} AS serve-cpu
ARG PIP_CERT PIP_FIND_LINKS PIP_INDEX_URL
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/committee/bin:$PATH \
    COMMITTEE_STORE=/models COMMITTEE_HOST=0.0.0.0 COMMITTEE_PORT=8000 COMMITTEE_STATE_DIR=/state \
    MPLCONFIGDIR=/tmp/matplotlib
COPY --from=wheel /wheels /wheels
RUN python3 -m venv /opt/committee \
    && /opt/committee/bin/pip install --no-cache-dir "$(ls /wheels/committee-*.whl)[serve,cpu]" \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin committee \
    && mkdir -p /models /state \
    && chown 10001 /state
USER 10001
# The only writable place it needs: experiment state (SQLite). Mount the store read-only at /models.
VOLUME ["/state"]
EXPOSE 8000
# The port the server listens on: COMMITTEE_PORT (KServe runs it on 8080), not a fixed 8000.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/live' % os.environ.get('COMMITTEE_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["committee-serve"]

# ---- training ----------------------------------------------------------------------------------------
FROM ${PYTHON_BASE} AS train
ARG PIP_CERT PIP_FIND_LINKS PIP_INDEX_URL
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/committee/bin:$PATH \
    COMMITTEE_STORE=/models COMMITTEE_REPORT_DIR=/reports MPLCONFIGDIR=/tmp/matplotlib
COPY --from=wheel /wheels /wheels
RUN python3 -m venv /opt/committee \
    && /opt/committee/bin/pip install --no-cache-dir "$(ls /wheels/committee-*.whl)[train,cpu]" \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin committee \
    && mkdir -p /models /reports /data \
    && chown 10001 /models /reports
USER 10001
ENTRYPOINT ["committee-train"]

# ---- serving on GPU (default target) -------------------------------------------------------------------
# The steps of serve-cpu again on another base: its Python differs, so a venv cannot be copied across.
FROM ${CUDA_BASE} AS serve
ARG PIP_CERT PIP_FIND_LINKS PIP_INDEX_URL
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/committee/bin:$PATH \
    COMMITTEE_STORE=/models COMMITTEE_HOST=0.0.0.0 COMMITTEE_PORT=8000 COMMITTEE_STATE_DIR=/state \
    COMMITTEE_DEVICE=cuda MPLCONFIGDIR=/tmp/matplotlib
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY --from=wheel /wheels /wheels
RUN python3 -m venv /opt/committee \
    && /opt/committee/bin/pip install --no-cache-dir "$(ls /wheels/committee-*.whl)[serve,gpu]" \
    && rm -rf /wheels \
    && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin committee \
    && mkdir -p /models /state \
    && chown 10001 /state
USER 10001
VOLUME ["/state"]
EXPOSE 8000
# The port the server listens on: COMMITTEE_PORT (KServe runs it on 8080), not a fixed 8000.
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
    CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/live' % os.environ.get('COMMITTEE_PORT', '8000'), timeout=2)"]
ENTRYPOINT ["committee-serve"]
