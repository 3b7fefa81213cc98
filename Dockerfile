# click-consumer: RabbitMQ click events -> ClickHouse.
#
#   docker build -t click-consumer .
#   docker run --rm -e RABBITMQ_URL=... -e CLICKHOUSE_HOST=... click-consumer
#
# Three stages:
#   planner  reduces the workspace to its manifests plus stub target roots (the "skeleton"),
#   builder  compiles the dependencies against the skeleton (a layer that stays cached
#            until a Cargo.toml or Cargo.lock changes), then the real sources,
#   runtime  debian:bookworm-slim with the binary, the CA bundle and a non-root user.
# Both build steps run scripts/build-release.sh, the same release build CI runs without Docker.

# ---------------------------------------------------------------------------------------------
FROM rust:1.95.0-slim-bookworm AS planner
WORKDIR /src
COPY . .
# Every Cargo.toml and Cargo.lock, verbatim; every target root cargo would look for, as a stub:
# lib roots empty, binary/bench/test/example roots and build scripts `fn main() {}`. Cargo
# needs those files to exist just to read the manifests. The skeleton only changes when a
# manifest, the lock file or the set of targets changes, so the dependency layer below is
# rebuilt only then. A target whose `path =` lies outside these patterns makes the
# dependency build fail loudly ("can't find ..."): add it here.
RUN mkdir /skeleton \
 && cp Cargo.lock /skeleton/ \
 && find . -name target -type d -prune -o -name Cargo.toml -type f \
        -exec cp --parents {} /skeleton/ \; \
 && printf 'fn main() {}\n' > /tmp/main.rs \
 && find . -regextype posix-extended -name target -type d -prune -o -type f \
        -regex '\./(.*/)?src/lib\.rs' \
        -exec install -D -m 0644 /dev/null /skeleton/{} \; \
 && find . -regextype posix-extended -name target -type d -prune -o -type f \
        -regex '\./(.*/)?((src/main|build)\.rs|src/bin/[^/]+(\.rs|/main\.rs)|(benches|tests|examples)/[^/]+(\.rs|/main\.rs))' \
        -exec install -D -m 0644 /tmp/main.rs /skeleton/{} \;

# ---------------------------------------------------------------------------------------------
# Same image as the planner: rust slim ships gcc and libc6-dev (ring needs a C compiler) and
# ca-certificates. Bookworm here and in the runtime stage, so the glibc the binary links
# against is the one it runs with.
FROM rust:1.95.0-slim-bookworm AS builder
WORKDIR /build
COPY scripts/build-release.sh scripts/build-release.sh

# 1. Dependencies only, against the stub sources.
COPY --from=planner /skeleton/ ./
RUN bash scripts/build-release.sh

# 2. The real sources. They can carry mtimes older than the stub artifacts above (COPY
#    keeps the build context's mtimes); touching them makes cargo rebuild the workspace crates.
COPY . .
#    The --help check fails the build if the stub binary survived, or if the `healthcheck`
#    subcommand the HEALTHCHECK below relies on is gone.
#    Then the shipped copy is stripped of its debug info (the release profile keeps line
#    tables: 47 MB with them, 10.7 MB without). The debug info stays in this stage as
#    /build/click-consumer.debug, linked by name from the binary (gnu-debuglink), for
#    symbolising a core dump: `docker build --target builder -t cc-builder .` then
#    `docker run --rm cc-builder cat /build/click-consumer.debug > click-consumer.debug`.
#    The symbol table stays, so panics still print function names.
RUN find . -name target -type d -prune -o -name '*.rs' -type f -exec touch {} + \
 && bash scripts/build-release.sh \
 && ./target/release/click-consumer --help > /tmp/help.txt \
 && grep -q healthcheck /tmp/help.txt \
 && objcopy --only-keep-debug target/release/click-consumer /build/click-consumer.debug \
 && objcopy --strip-debug --add-gnu-debuglink=/build/click-consumer.debug \
        target/release/click-consumer /build/click-consumer \
 && /build/click-consumer --help > /dev/null

# ---------------------------------------------------------------------------------------------
# Runtime: debian:bookworm-slim rather than distroless/cc. Same Debian release as the
# builder (glibc 2.36); pinnable by a version tag (distroless publishes only floating tags,
# pinnable only by digest); and a shell for `docker compose exec consumer sh` when
# debugging. The ~20 MB difference is not worth losing those. No apt-get here: the only
# runtime file beyond glibc is the CA bundle (rustls reads the system store for amqps/https),
# copied from the builder.
FROM debian:bookworm-slim AS runtime

LABEL org.opencontainers.image.title="click-consumer" \
      org.opencontainers.image.description="Consumes click events from RabbitMQ and inserts them into ClickHouse" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"

# Fixed numeric uid/gid so volume permissions and Kubernetes runAsUser are predictable.
RUN groupadd --gid 10001 click-consumer \
 && useradd --uid 10001 --gid 10001 --no-log-init --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin click-consumer

COPY --from=builder /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /build/click-consumer /usr/local/bin/click-consumer

# Defaults, with the Python consumer's variable names and values. Not set here on purpose,
# because the binary derives or defaults them itself:
#   RABBITMQ_ROUTING_KEY  (default: the queue name)
#   DEAD_LETTER_QUEUE     (default: <RABBITMQ_QUEUE>.dead-letter)
#   CLICKHOUSE_PASSWORD   (default: empty; pass it at run time, never bake it into an image)
#   BATCH_SIZE, BATCH_TIMEOUT_MS (batching; see the README's configuration table)
# LOG_LEVEL also accepts the Python names DEBUG/INFO/WARNING/ERROR/CRITICAL.
# METRICS_ADDR serves /metrics, /health and /ready; the HEALTHCHECK reads its port.
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    RABBITMQ_URL=amqp://guest:guest@localhost:5672/ \
    RABBITMQ_EXCHANGE=url_shortener \
    RABBITMQ_EXCHANGE_TYPE=topic \
    RABBITMQ_QUEUE=click_events \
    CLICKHOUSE_HOST=localhost \
    CLICKHOUSE_PORT=8123 \
    CLICKHOUSE_DATABASE=url_shortener \
    CLICKHOUSE_TABLE=click_events \
    CLICKHOUSE_USER=default \
    LOG_LEVEL=info \
    METRICS_ADDR=0.0.0.0:9090

USER 10001:10001
EXPOSE 9090

# SIGTERM starts a graceful drain (cancel the consumer, flush, ack, close) that finishes in
# about 8 s, inside Docker's default 10 s stop timeout.
STOPSIGNAL SIGTERM

# `healthcheck` GETs http://127.0.0.1:<METRICS_ADDR port>/health and exits 0 on 200:
# no curl or shell needed in the image.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["click-consumer", "healthcheck"]

# No subcommand runs the consumer; `publish-demo --rate N` and `healthcheck` are the others.
ENTRYPOINT ["click-consumer"]
