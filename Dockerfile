# The fedline images. Two targets share one base:
#
#   docker build -t fedline .                           every role (aggregator, edge agent, line inference,
#                                                       PLC simulator, tools): `docker run fedline edge --config ...`
#   docker build --target line -t fedline-line .        line inference only: ONNX Runtime, no torch
#                                                       (`fedline infer` never imports it; a line PC has little room)
#
# torch comes from the CPU-only wheel index (the CUDA build is ~2 GB bigger and no fedline
# machine needs a GPU). Both install from requirements.lock, the versions CI tested.
FROM python:3.11-slim-bookworm AS base

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1

RUN groupadd --system --gid 10001 fedline \
 && useradd --system --uid 10001 --gid fedline --home-dir /var/lib/fedline --shell /usr/sbin/nologin fedline
# Every state directory a compose volume is mounted on exists in the image, owned by fedline:
# Docker fills a new named volume from the image's directory (content, owner and mode), so
# the non-root services can write their state. (tests/demo/test_deploy.py runs this line.)
RUN install -d -o 10001 -g 10001 -m 0750 /var/lib/fedline /var/lib/fedline/aggregator /var/lib/fedline/edge /var/lib/fedline/infer

WORKDIR /app
COPY pyproject.toml README.md requirements.lock ./
COPY fedline ./fedline
COPY broker_bridge ./broker_bridge
COPY firmware_adapters ./firmware_adapters
COPY models ./models
COPY edge ./edge
COPY aggregator ./aggregator
COPY data ./data

# The line image: the core, ONNX Runtime and the onnx reader (no torch).
FROM base AS line
RUN pip install -c requirements.lock ".[line]"
USER fedline
ENTRYPOINT ["fedline"]
CMD ["infer", "--help"]

# The full image (the default target, last): every role.
FROM base AS full
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
RUN pip install -c requirements.lock ".[edge,aggregator,line]"
USER fedline
ENTRYPOINT ["fedline"]
CMD ["--help"]
