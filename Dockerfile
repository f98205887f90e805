# BitingLip: one image for the scheduler, the workers and the gateway (docker-compose.yml picks the command).
# GPU workers need the NVIDIA Container Toolkit on the host; the CUDA build of torch brings its own CUDA libraries.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MODEL_CACHE_DIR=/data/models \
    BITINGLIP_RESULTS_DIR=/data/results \
    HF_HUB_CACHE=/data/hf

# CUDA torch by default; build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu for CPU-only hosts
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124

RUN groupadd --gid 10001 bitinglip \
    && useradd --uid 10001 --gid bitinglip --create-home --shell /usr/sbin/nologin bitinglip \
    && mkdir -p /data/models /data/results /data/hf \
    && chown -R bitinglip:bitinglip /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY bitinglip ./bitinglip
RUN pip install --index-url "${TORCH_INDEX}" torch \
    && pip install ".[gateway,gpu]"

# never root at run time: the model cache and results volumes belong to this user
USER bitinglip:bitinglip
VOLUME ["/data/models", "/data/results"]
EXPOSE 8000 8786 8787
CMD ["bitinglip", "--help"]
