# One image for every role: the api, each worker, and the one-shot provisioning job.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY api ./api
COPY workers ./workers
COPY contracts ./contracts
COPY shared ./shared
COPY scripts ./scripts
COPY nats.conf ./
# pg_dump and pg_restore: `payments backup` / `restore` against PostgreSQL.
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-client \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir . && useradd --system --uid 10001 payments && mkdir -p /app/data && chown payments /app/data
USER payments
ENV PAYMENTS_DATA_DIR=/app/data
EXPOSE 8081
CMD ["payments", "api"]
