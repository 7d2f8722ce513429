# syntax=docker/dockerfile:1
# keygate-server, the reference key service, with SQLite and PostgreSQL stores.
#
#   docker build -t keygate-server .
#   docker run -p 7700:7700 -e KEYGATE_ADMIN_TOKEN=... -e KEYGATE_SERVICE_TOKEN=... \
#     -v keygate:/var/lib/keygate keygate-server
#
# See the README, "Deploying".

FROM rust:1-slim-bookworm AS build
WORKDIR /src
# The manifest names the benches: cargo wants them present to read it.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY examples ./examples
# No debug symbols in the image.
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
RUN cargo build --release --locked --features postgres --bin keygate-server

FROM debian:bookworm-slim
# A fixed, unprivileged user: the data volume's owner is stable across rebuilds.
RUN groupadd --system --gid 10001 keygate \
    && useradd --system --uid 10001 --gid keygate --home-dir /var/lib/keygate --create-home \
       --shell /usr/sbin/nologin keygate
COPY --from=build /src/target/release/keygate-server /usr/local/bin/keygate-server
USER keygate:keygate
WORKDIR /var/lib/keygate
VOLUME ["/var/lib/keygate"]
# Listen on every interface of the container; the SQLite file lives on the volume.
# Tokens come from KEYGATE_ADMIN_TOKEN / KEYGATE_SERVICE_TOKEN (never baked in).
ENV KEYGATE_LISTEN=0.0.0.0:7700 \
    KEYGATE_DB=sqlite:///var/lib/keygate/keygate.db \
    KEYGATE_HEALTHCHECK_URL=http://127.0.0.1:7700/healthz
EXPOSE 7700
# The binary checks itself: no curl in the image.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["keygate-server", "healthcheck", "--timeout-s", "4"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["keygate-server"]
CMD ["serve"]
