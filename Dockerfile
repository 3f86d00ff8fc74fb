# The one Arus image: every service is `arus <command>` (gateway, worker, sink, api, migrate, ...).
# Pinned base; rebuild on purpose to pick up security updates of the base image.
FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    ARUS_DATA_DIR=/var/lib/arus \
    ARUS_LOG_JSON=true

WORKDIR /opt/arus

# Dependencies first: the layer is reused while only the code changes.
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY infra ./infra
COPY producers ./producers
COPY stream_processors ./stream_processors
COPY consumers ./consumers
COPY arus ./arus
COPY bench ./bench
RUN pip install --no-compile . \
    && useradd --system --uid 10001 --home-dir /var/lib/arus --create-home --shell /usr/sbin/nologin arus \
    && mkdir -p /var/lib/arus/mqtt \
    && chown -R arus:arus /var/lib/arus

# Never run as root: a compromised service must not own the container.
USER arus
WORKDIR /var/lib/arus

ENTRYPOINT ["arus"]
CMD ["--help"]
