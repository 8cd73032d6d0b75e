# One image for every chatq service. ENGINE=gpu installs vLLM (CUDA); ENGINE=none
# builds the light image for the API, persistence and telemetry.
FROM python:3.11-slim
ARG ENGINE=none
ENV PYTHONUNBUFFERED=1 CHATQ_HOME=/data CHATQ_HOST=0.0.0.0 CHATQ_EMBEDDED_NATS=0
WORKDIR /app
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
RUN if [ "$ENGINE" = none ]; then pip install --no-cache-dir . ; \
    else pip install --no-cache-dir ".[$ENGINE]"; fi
VOLUME /data
