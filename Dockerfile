# The serving image: `cnnctl serve` of the artifacts mounted at /models (the base install: ONNX
# Runtime, gRPC, no torch). Build: docker build -t cnnctl .   Run:
#   docker run -p 8000:8000 -p 8001:8001 -v "$PWD/artifacts:/models:ro" cnnctl
# gRPC on 8001, REST (v2 HTTP) on 8000, Prometheus metrics on 8002. SIGTERM drains (health
# NOT_SERVING, --drain-delay-s, then every accepted request is answered); give `docker stop -t`
# more than --grace-s.
# Dockerfile.cuda: the same on ONNX Runtime's CUDA provider. deploy/: Kubernetes and KServe.

FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY cnnctl cnnctl
COPY training training
COPY export export
COPY serving serving
COPY protos protos
COPY clients clients
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl \
    && rm -rf /wheels \
    && useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin cnnctl
USER 10001
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["cnnctl", "health", "--server", "127.0.0.1:8001"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["cnnctl"]
CMD ["serve", "/models", "--host", "0.0.0.0", "--port", "8001", "--metrics-port", "8002", "--metrics-host", "0.0.0.0", "--drain-delay-s", "5", "--grace-s", "30"]
