# syntax=docker/dockerfile:1
# One multi-stage build for every image: `docker build --build-arg SERVICE=command-api .`
# SERVICE is one of `command-api` (also the relay and the transfer process manager, as
# subcommands), `projector`, `query-api`, or `audit` (the `ledger-audit` CLI).

# The build stage does not read SERVICE, so every image shares it: BuildKit builds the
# workspace once and each image only copies its binary out. Building the four packages in one
# cargo invocation also compiles their shared dependencies once.
FROM rust:1.95-bookworm AS build
# rdkafka builds librdkafka (>= 2.2) from source: the build needs what README.md lists.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libcurl4-openssl-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cache mounts keep the registry and the target directory between builds, so a source change
# rebuilds only our crates. The target directory lives in the cache, not in the layer, hence
# the copy to /out inside the same RUN. `sharing=locked`: parallel image builds wait for one
# another instead of racing two cargo builds on two cores.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked \
      --package command-api --package projector --package query-api --package audit \
 && mkdir /out \
 && cp target/release/command-api target/release/projector target/release/query-api /out/ \
 && cp target/release/ledger-audit /out/audit

# Runtime: Debian slim, not distroless. Compose health checks run
# /usr/local/bin/healthcheck, which needs a shell and curl; distroless has neither, and the
# binaries have no health-check subcommand of their own. (Kubernetes probes are plain HTTP
# and need neither.)
FROM debian:bookworm-slim
# ca-certificates: TLS to Postgres, Kafka and the identity provider. curl: the health check.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && printf '#!/bin/sh\n# usage: healthcheck URL; exit 0 on a 2xx answer within 2 s\nexec curl -fsS --max-time 2 "$1" >/dev/null\n' > /usr/local/bin/healthcheck \
 && chmod +x /usr/local/bin/healthcheck \
 && groupadd --system --gid 10001 ledger \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin ledger
ARG SERVICE=command-api
COPY --from=build /out/${SERVICE} /usr/local/bin/service
# A numeric user, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
ENTRYPOINT ["/usr/local/bin/service"]
