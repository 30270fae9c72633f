# Multi-stage build: compile, then run from a slim image with only the binary.
#   CPU (default):  docker build -t candela .
#   NVIDIA GPU:     docker build --target cuda --build-arg CUDA_COMPUTE_CAP=90 -t candela:cuda .
#                   docker run --gpus all -p 8080:8080 -v $PWD/data:/data candela:cuda
# CUDA_COMPUTE_CAP is the card's compute capability ×10 (80 A100, 86 RTX 30xx, 89 RTX 40xx / L4,
# 90 H100/H200); candle's kernels are compiled for it (newer cards JIT the PTX).

# What every build compiles (the demo model is embedded from the test fixtures).
FROM scratch AS source
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY migrations ./migrations
COPY web ./web
COPY tests/fixtures/models/sd1-tiny ./tests/fixtures/models/sd1-tiny

FROM rust:1-bookworm AS build
COPY --from=source /src /src
WORKDIR /src
RUN cargo build --release --locked --bin candela && strip target/release/candela

FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04 AS build-cuda
ARG CUDA_COMPUTE_CAP=80
ENV CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP} PATH=/root/.cargo/bin:${PATH}
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates build-essential pkg-config \
    && rm -rf /var/lib/apt/lists/* \
    && curl -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
COPY --from=source /src /src
WORKDIR /src
RUN cargo build --release --locked --features cuda,cudnn --bin candela && strip target/release/candela

FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 AS cuda
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build-cuda /src/target/release/candela /usr/local/bin/candela
ENV CANDELA_DATA_DIR=/data HF_HOME=/data/hf
VOLUME /data
ENTRYPOINT ["candela"]
EXPOSE 8080
CMD ["serve", "--host", "0.0.0.0", "--port", "8080", "--device", "cuda", "--dtype", "f16"]

# The default target (last): CPU.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/candela /usr/local/bin/candela
ENV CANDELA_DATA_DIR=/data HF_HOME=/data/hf
VOLUME /data
ENTRYPOINT ["candela"]
EXPOSE 8080
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
