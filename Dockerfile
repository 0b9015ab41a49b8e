# syntax=docker/dockerfile:1
# Builds the spendcap daemon. `docker-compose up` runs it next to Redis (see docker-compose.yml).
# Base images are pinned to exact versions (the toolchain CI uses, a Debian point release); pin
# them by digest as well where your registry policy asks for it.
FROM rust:1.95.0-bookworm AS build
WORKDIR /src
# The dependency cache: the registry and target directories persist between builds (BuildKit
# cache mounts), so a source change recompiles spendcap and not its ~300 dependencies.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin spendcap \
    && cp target/release/spendcap /usr/local/bin/spendcap

FROM debian:12.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/spendcap /usr/local/bin/spendcap
COPY docker/entrypoint.sh /usr/local/bin/spendcap-entrypoint
# A fixed uid, so that mounted secrets and volumes can be owned by it. The keys directory exists
# in the image, owned by that user, so a named volume mounted there starts out writable by it.
RUN useradd --system --uid 10001 --home /var/lib/spendcap --create-home spendcap \
    && install -d -o spendcap -g spendcap -m 0700 /var/lib/spendcap/keys
USER spendcap
WORKDIR /var/lib/spendcap
EXPOSE 8402
ENTRYPOINT ["spendcap-entrypoint"]
CMD ["serve"]
