# One image for every Tidegate process (api, workers, replayer, exporter, simulators).
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
RUN apt-get update && apt-get install -y --no-install-recommends libcurl4-openssl-dev gcc \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY resilience resilience
COPY workers workers
COPY producers producers
COPY tidegate tidegate
RUN pip install --no-cache-dir '.[dev]'
RUN useradd --create-home tidegate
USER tidegate
