# One image for the web server and the GPU worker.
# torch comes from PyPI's default Linux wheels, which carry CUDA: the same image runs on CPU and GPU.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CLIPSCOPE_DATA_DIR=/data

RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 clipscope \
    && mkdir -p /data && chown clipscope:clipscope /data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY clipscope ./clipscope
COPY clipscope_cli ./clipscope_cli
COPY worker ./worker
COPY backend ./backend
COPY frontend ./frontend
COPY migrations ./migrations
COPY configs ./configs
COPY scripts/install-app.sh ./scripts/install-app.sh
RUN PYTHON=/usr/local/bin/python scripts/install-app.sh /app

USER clipscope
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"
CMD ["clipscope", "serve", "--host", "0.0.0.0", "--port", "8000"]
