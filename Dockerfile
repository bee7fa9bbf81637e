# probewatch worker image: `docker build -t probewatch:0.1.0 .` (deploy/docker-compose.yml builds it).
# Runs `probewatch run --source kafka`; configuration from PROBEWATCH__* variables and/or a TOML file
# at $PROBEWATCH_CONFIG; /metrics, /healthz and /readyz on metrics.port (9108 here).
FROM python:3.11.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY probewatch ./probewatch
COPY ingest ./ingest
COPY detectors ./detectors
COPY storage ./storage
COPY alerting ./alerting
COPY dashboards ./dashboards
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11.11-slim-bookworm
RUN useradd --system --uid 10001 --home-dir /var/lib/probewatch --create-home probewatch
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER 10001
WORKDIR /var/lib/probewatch
ENV PYTHONUNBUFFERED=1 \
    PROBEWATCH__SOURCE=kafka \
    PROBEWATCH__METRICS__HOST=0.0.0.0 \
    PROBEWATCH__METRICS__PORT=9108 \
    PROBEWATCH__LOGGING__JSON=true
EXPOSE 9108
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s \
  CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:9108/healthz', timeout=2).status != 200)"
ENTRYPOINT ["probewatch"]
CMD ["run", "--source", "kafka"]
