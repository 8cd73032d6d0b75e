# One image for every chatq service; ENGINE picks what it installs:
#   ENGINE=light  the API, persistence and telemetry (no inference engine)
#   ENGINE=gpu    the inference worker as well (vLLM, CUDA)
# The install is locked: every package, its version and its hashes come from
# deploy/requirements/$ENGINE.txt (scripts/lock-images.sh writes them from pyproject.toml).

# The web interface, built from the committed lockfile.
FROM node:22.12.0-bookworm-slim AS web
WORKDIR /web
COPY web/package.json web/package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY web/ ./
RUN npm run build

FROM python:3.11.11-slim-bookworm
ARG ENGINE=light
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CHATQ_HOME=/data CHATQ_HOST=0.0.0.0 CHATQ_EMBEDDED_NATS=0 CHATQ_WEB_DIST=/app/web/dist
RUN useradd --system --uid 10001 --user-group --home-dir /data --shell /usr/sbin/nologin chatq \
    && mkdir -p /data/models && chown -R chatq:chatq /data
WORKDIR /app
COPY deploy/requirements/ /tmp/requirements/
RUN pip install --require-hashes --no-deps -r "/tmp/requirements/$ENGINE.txt" \
    && pip install --require-hashes --no-deps -r /tmp/requirements/build.txt
COPY pyproject.toml README.md ./
COPY api api
COPY broker broker
COPY catalog catalog
COPY chatq chatq
COPY database database
COPY loadtest loadtest
COPY schemas schemas
COPY stack stack
COPY workers workers
# chatq itself, without resolving anything: every dependency is already installed.
RUN pip install --no-deps --no-build-isolation . && rm -rf /tmp/requirements build
COPY --from=web /web/dist /app/web/dist
USER chatq
VOLUME /data
# Each service's own check (compose.yaml names the service); the API's by default.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "stack.healthcheck", "api"]
CMD ["python", "-m", "api"]
