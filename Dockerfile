# One multi-stage build for every service: `docker build --build-arg SERVICE=command-api .`
FROM rust:1.95-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake libcurl4-openssl-dev && rm -rf /var/lib/apt/lists/*
ARG SERVICE=command-api
WORKDIR /src
COPY . .
RUN cargo build --release --locked --package ${SERVICE} \
 && cp target/release/${SERVICE} /service

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && printf '#!/bin/sh\nexec curl -fsS "$1" >/dev/null\n' > /usr/local/bin/healthcheck \
 && chmod +x /usr/local/bin/healthcheck \
 && useradd --system --uid 10001 ledger
COPY --from=build /service /usr/local/bin/service
USER ledger
ENTRYPOINT ["/usr/local/bin/service"]
