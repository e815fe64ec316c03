# Shortcut API image: the FastAPI service plus the shipped checkpoint, CPU torch, non-root.
#
#   docker build -t shortcut-api .                                 # torch from TORCH_INDEX_URL
#   podman build --format docker -v /opt/wheels:/wheels:ro --build-arg PIP_FIND_LINKS=/wheels -t shortcut-api .
#                                                                  # torch from a local wheel folder
#   docker run -p 8000:8000 shortcut-api
#
# The checkpoint is package data of `model` (pyproject: model/checkpoints/*.safetensors), so the
# non-editable `pip install .` bakes it into site-packages and the app's default
# SHORTCUT_CHECKPOINT finds it. Override with -e SHORTCUT_CHECKPOINT=/path and a mounted file.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# Folder of local wheels (mounted at build time). When set, torch comes from it and only from it.
ARG PIP_FIND_LINKS=""

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, in its own layer: it is by far the largest dependency and changes least often.
# With PIP_FIND_LINKS, --no-index keeps pip off every index for torch itself; torch's small
# pure-Python dependencies are resolved from PyPI by the project install below.
RUN if [ -n "$PIP_FIND_LINKS" ]; then \
        pip install --no-index --no-deps --find-links "$PIP_FIND_LINKS" "torch==${TORCH_VERSION}"; \
    else \
        pip install --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
    fi

WORKDIR /src
# README.md is named by pyproject's `readme`; the glob keeps COPY valid if the context lacks it.
COPY pyproject.toml README.md* ./
COPY model ./model
COPY app ./app
# Non-editable install: app and model (with model/checkpoints/*.safetensors) land in site-packages.
# PIP_FIND_LINKS (an ARG, so also in this step's environment) lets pip see the local torch wheel again,
# but torch is already installed, so only its pure-Python dependencies are fetched.
# (pip writes the files with default modes, so a 0600 checkpoint in the context is still readable by the app user.)
RUN test -f README.md || touch README.md; \
    pip install . && pip check

# The fused C decode step (model/fast, docs/performance.md), compiled here with the builder's gcc into the installed
# package, so it travels with the venv; the runtime stage has no compiler and needs none. Two builds, not
# -march=native: AVX2/FMA/F16C, and the same with AVX-512; at load the widest one the CPU runs is taken (elsewhere the
# TorchScript step runs). Without a compiler (apt unreachable) the image decodes with the TorchScript step.
RUN cd / && { { apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev; } >/dev/null 2>&1 \
        && python -m model.fast.build || echo "no C compiler: the image decodes with the TorchScript step"; } \
    && rm -rf /var/lib/apt/lists/*

# Fail the build here rather than at runtime if the default checkpoint did not get packaged
# (REQUIRE_CHECKPOINT=0 for an image that will only ever get SHORTCUT_CHECKPOINT from a mount).
ARG REQUIRE_CHECKPOINT=1
ARG CHECKPOINT_NAME=shakespeare.safetensors
# Every .py of app/ and model/ must have landed in site-packages (catches subpackages missing from pyproject).
RUN cd / && python -c "import pathlib, torch, app, model; \
site = pathlib.Path(app.__file__).parent.parent; src = pathlib.Path('/src'); \
files = [p.relative_to(src) for pkg in ('app', 'model') for p in (src / pkg).rglob('*.py')]; \
missing = [str(f) for f in files if not (site / f).is_file()]; \
print('torch', torch.__version__, '-', len(files) - len(missing), 'of', len(files), 'source files installed'); \
raise SystemExit(f'not installed (add the packages to pyproject.toml): {missing}' if missing else 0)" \
    && if [ "$REQUIRE_CHECKPOINT" = "1" ]; then \
        python -c "import pathlib, sys, model; p = pathlib.Path(model.__file__).parent / 'checkpoints' / sys.argv[1]; \
sys.exit(0 if p.is_file() else f'{p} missing: model/checkpoints/{p.name} was not in the build context')" \
        "$CHECKPOINT_NAME"; \
    fi

# Serving code only: training/ (training, evaluation, the depth study; matplotlib via the `train` extra) stays out.
RUN cd / && python -c "import importlib.util, sys; \
sys.exit('training/ must not be in the server image' if importlib.util.find_spec('training') else 0)"

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="shortcut-api" \
      org.opencontainers.image.description="Serve a deep residual Transformer LM over HTTP with Prometheus metrics"

RUN groupadd --gid 10001 shortcut \
    && useradd --uid 10001 --gid shortcut --create-home --home-dir /home/shortcut \
       --shell /usr/sbin/nologin shortcut \
    && install -d -o shortcut -g shortcut -m 0750 /var/lib/shortcut/steering
# /var/lib/shortcut/steering: where a shared volume for named steering vectors mounts (SHORTCUT_STEERING_DIR,
# deploy/README.md); owned by the app user so that a new named volume copies that ownership

COPY --from=builder /opt/venv /opt/venv

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SHORTCUT_HOST=0.0.0.0 \
    SHORTCUT_PORT=8000 \
    SHORTCUT_DEVICE=cpu \
    SHORTCUT_LOG_JSON=true

# A directory without app/ or model/ in it, so `python -m app` imports the installed packages.
WORKDIR /home/shortcut
USER shortcut:shortcut

EXPOSE 8000

HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('SHORTCUT_PORT', '8000'), timeout=4)"]

STOPSIGNAL SIGTERM
CMD ["python", "-m", "app"]
