# Multi-stage build: compile in the Rust image, run from a slim Debian with only the binary.
# CPU build by default; for CUDA build from an nvidia/cuda devel image with `--features cuda`.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY migrations ./migrations
COPY web ./web
COPY tests/fixtures/models/sd1-tiny ./tests/fixtures/models/sd1-tiny
RUN cargo build --release --locked && strip target/release/candela

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/candela /usr/local/bin/candela
ENV CANDELA_DATA_DIR=/data HF_HOME=/data/hf
VOLUME /data
ENTRYPOINT ["candela"]
EXPOSE 8080
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
