# A partner hospital: Flower's official SuperNode image for the pinned flwr, plus CareFed. The entrypoint is
# carefed-supernode: Flower's SuperNode with CareFed's SuperExec, so every ClientApp task runs the CareFed installed
# here, never the app the coordinator sends (client/launcher.py). Images, keys and the privacy ledger are mounted;
# nothing site-specific is baked in.
# Build from the repository root:  docker build -f docker/hospital.Dockerfile -t carefed/hospital .
FROM flwr/supernode:1.42.0

USER root
# A C++ compiler lets torch.compile build the fused DP-SGD kernels (client/fused_dp.py); without one a site falls
# back to Opacus's hooks, and says so in its log. The default image is Ubuntu-based.
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
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
# the SuperNode's SuperExec checks its local runtime for a new task every 0.1 s instead of 1 s (README, Deployment)
ENV FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1
# compose.yml passes flower-supernode's arguments: the SuperLink, CA, node key and node config.
ENTRYPOINT ["carefed-supernode"]
