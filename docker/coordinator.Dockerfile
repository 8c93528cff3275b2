# The study coordinator: Flower's official SuperLink image for the pinned flwr, plus CareFed and its dependencies,
# so the ServerApp runs as the SuperLink's subprocess (runtime dependency installation stays disabled).
# Build from the repository root:  docker build -f docker/coordinator.Dockerfile -t carefed/coordinator .
FROM flwr/superlink:1.42.0

USER root
WORKDIR /app/carefed
COPY pyproject.toml README.md ./
COPY common ./common
COPY server ./server
COPY client ./client
COPY simulations ./simulations
RUN python -m pip install --no-cache-dir torch==2.14.1 torchvision==0.29.1 \
        --index-url https://download.pytorch.org/whl/cpu \
    && python -m pip install --no-cache-dir . \
    && chown -R app:app /app/carefed
USER app
ENV FLWR_TELEMETRY_ENABLED=0
# the SuperLink's SuperExec checks its local runtime for a new task every 0.1 s instead of 1 s (README, Deployment)
ENV FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1
# flower-superlink is the base image's entrypoint; compose.yml passes TLS, node authentication and the port.
