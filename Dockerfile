# Builds the spendcap daemon. `docker-compose up` runs it next to Redis (see docker-compose.yml).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin spendcap

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/spendcap /usr/local/bin/spendcap
RUN useradd --system --home /var/lib/spendcap --create-home spendcap
USER spendcap
WORKDIR /var/lib/spendcap
EXPOSE 8402
ENTRYPOINT ["spendcap"]
CMD ["serve"]
