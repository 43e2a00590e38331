# syntax=docker/dockerfile:1
# Three images from one file (see docs/deploy.md):
#   docker build --target gateway      -t cifar10-gateway .        # FastAPI gateway, no TensorFlow (default target)
#   docker build --target model-server -t cifar10-model-server .   # tensorflow/serving + serving/config
#   docker build --target trainer      -t cifar10-trainer .        # training on GPUs (tensorflow/tensorflow:*-gpu)
# Models are not baked into any image: they live on a volume mounted at /models, so a new version on disk goes
# live without a rebuild.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TF_SERVING_IMAGE=tensorflow/serving:2.18.0
ARG TF_IMAGE=tensorflow/tensorflow:2.21.0-gpu

# ---- builder: the project and its base dependencies in a virtual environment ---------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
# Dependencies first (cached while only the code changes): install the declared base deps of an empty package.
COPY pyproject.toml README.md ./
RUN mkdir -p client serving training \
    && touch client/__init__.py serving/__init__.py training/__init__.py \
    && pip install --no-cache-dir . \
    && pip uninstall --yes cifar10-serving
COPY client ./client
COPY serving ./serving
COPY training ./training
# The base install only: no `[tf]` extra, so the gateway image carries no TensorFlow runtime. The checks fail the
# build if TensorFlow slipped in or the gateway's web page was left out of the package data.
RUN pip install --no-cache-dir --no-deps . \
    && python -P -c "import importlib.util as u, sys; sys.exit(u.find_spec('tensorflow') is not None)" \
    && python -P -c "import pathlib, serving.gateway as g; assert (pathlib.Path(g.__file__).parent / 'static' / 'index.html').is_file()"

# ---- model server: TensorFlow Serving with this project's config files ----------------------------------------
FROM ${TF_SERVING_IMAGE} AS model-server
# The image's entrypoint runs tensorflow_model_server --port=8500 --rest_api_port=8501 --model_name=$MODEL_NAME
# --model_base_path=$MODEL_BASE_PATH/$MODEL_NAME "$@"; --model_config_file below takes precedence over the last two.
ENV MODEL_NAME=cifar10 MODEL_BASE_PATH=/models
COPY serving/config/ /config/
# Polling the config file lets `python -m serving.deploy --apply poll` (or an edited ConfigMap) take effect on
# every replica; new version folders are picked up by the file-system poll (every 5 s). The shipped config has
# initial labels: allowing labels on versions not loaded yet keeps them from failing a start-up (the deploy tool
# itself only ever moves a label to a version it has seen AVAILABLE).
CMD ["--model_config_file=/config/models.config", \
     "--model_config_file_poll_wait_seconds=10", \
     "--file_system_poll_wait_seconds=5", \
     "--allow_version_labels_for_unavailable_models=true", \
     "--enable_batching=true", \
     "--batching_parameters_file=/config/batching.config", \
     "--monitoring_config_file=/config/monitoring.config"]
EXPOSE 8500 8501
# Ready means a version is AVAILABLE (the status URL answers 200 while loading too). bash's /dev/tcp because the
# image has no curl.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/8501 && printf 'GET /v1/models/cifar10 HTTP/1.0\\r\\n\\r\\n' >&3 && grep -q AVAILABLE <&3"]

# ---- trainer: training and export on GPUs --------------------------------------------------------------------
FROM ${TF_IMAGE} AS trainer
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 TF_CPP_MIN_LOG_LEVEL=2
WORKDIR /app
COPY pyproject.toml README.md ./
COPY client ./client
COPY serving ./serving
COPY training ./training
# The image's TensorFlow satisfies the tf extra's pin; the rest (serving API, tensorboard, matplotlib) is added.
RUN pip install --no-cache-dir "/app[tf]" \
    && useradd --create-home --uid 10001 trainer \
    && mkdir -p /models /runs /data && chown trainer /models /runs /data
USER 10001
VOLUME ["/models", "/runs"]
ENTRYPOINT ["python", "-m", "training"]
CMD ["train", "--help"]

# ---- gateway (default target): slim, non-root, no TensorFlow --------------------------------------------------
FROM ${PYTHON_IMAGE} AS gateway
ENV PATH=/opt/venv/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    GATEWAY_HOST=0.0.0.0 GATEWAY_PORT=8000 GATEWAY_MODEL_SERVER=model-server:8500
RUN useradd --create-home --uid 10001 gateway
COPY --from=builder /opt/venv /opt/venv
WORKDIR /home/gateway
USER 10001
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]
ENTRYPOINT ["python", "-m", "serving.gateway"]
