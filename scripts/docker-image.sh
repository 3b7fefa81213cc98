#!/usr/bin/env bash
# Build the image the way users build it (`docker build` on the Dockerfile as it is) and check
# what the runtime image promises:
#   - at most 90 MB (MAX_IMAGE_MB) on debian:bookworm-slim; the shipped binary carries no
#     debug sections (they are stripped in the build stage);
#   - runs as uid 10001, with a Docker-format HEALTHCHECK running `click-consumer healthcheck`;
#   - runs with a read-only root filesystem (`docker run --read-only`);
#   - its CA bundle is the builder's Debian bundle, never the host's (which carries the
#     crates.io proxy's CA on these machines, see scripts/docker-standins.sh).
#
#   scripts/docker-image.sh [TAG]        (default TAG: click-consumer:local)
#
# Base images missing and not pullable are first made as local stand-ins by
# scripts/docker-standins.sh, which says so. The build uses the host's network
# (`--network host`): on these machines a build container on Docker's default bridge
# reaches no package registry, and cargo must fetch crates in the dependency layer (cached
# afterwards until a manifest or Cargo.lock changes).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TAG=${1:-click-consumer:local}
MAX_IMAGE_MB=${MAX_IMAGE_MB:-90}
say() { printf '[docker-image] %s\n' "$*"; }
fail() { printf '[docker-image] FAIL: %s\n' "$*" >&2; exit 1; }

scripts/docker-standins.sh Dockerfile

start=$SECONDS
say "docker build --network host -t $TAG ."
docker build --network host -t "$TAG" . 2>&1 | grep -v -E '^(DEPRECATED|  +Install the buildx|  +https://docs.docker.com/go/buildx)'
say "built in $((SECONDS - start)) s"

size=$(docker image inspect -f '{{.Size}}' "$TAG")
size_mb=$(awk -v s="$size" 'BEGIN {printf "%.1f", s / 1e6}')
base_mb=$(docker image inspect -f '{{.Size}}' debian:bookworm-slim | awk '{printf "%.1f", $1 / 1e6}')
say "image size: $size_mb MB (base debian:bookworm-slim: $base_mb MB)"
awk -v s="$size_mb" -v m="$MAX_IMAGE_MB" 'BEGIN {exit !(s <= m)}' || fail "image is $size_mb MB, more than $MAX_IMAGE_MB MB"

[[ $(docker image inspect -f '{{.Config.User}}' "$TAG") == 10001:10001 ]] || fail "image user is not 10001:10001"
health=$(docker image inspect -f '{{if .Config.Healthcheck}}{{join .Config.Healthcheck.Test " "}}{{end}}' "$TAG")
[[ $health == "CMD click-consumer healthcheck" ]] || fail "HEALTHCHECK missing or changed: '$health'"
say "user 10001:10001, HEALTHCHECK: $health"

tmp=$(mktemp -d)
cid=
cleanup() { [[ -n $cid ]] && docker rm -f "$cid" >/dev/null 2>&1; rm -rf "$tmp"; }
trap cleanup EXIT
cid=$(docker create "$TAG")
docker cp "$cid:/usr/local/bin/click-consumer" "$tmp/click-consumer"
docker cp "$cid:/etc/ssl/certs/ca-certificates.crt" "$tmp/ca.crt"
docker rm "$cid" >/dev/null
cid=
# Debug info sections (.debug_gdb_scripts is not one: it is the loaded section that points
# gdb at Rust's pretty-printers).
debug=$(readelf -S -W "$tmp/click-consumer" | grep -oE '\.(z)?debug_(info|line|line_str|abbrev|str|str_offsets|ranges|rnglists|loc|loclists|aranges|frame)\b' || true)
[[ -z $debug ]] || fail "the shipped binary has debug sections: $(echo $debug)"
say "binary: $(stat -c %s "$tmp/click-consumer" | awk '{printf "%.1f MB", $1 / 1e6}'), no debug info sections"

builder=$(sed -n 's/^FROM \([^ ]*\) AS builder.*/\1/p' Dockerfile)
docker run --rm --entrypoint cat "$builder" /etc/ssl/certs/ca-certificates.crt >"$tmp/builder-ca.crt"
cmp -s "$tmp/ca.crt" "$tmp/builder-ca.crt" || fail "the image's CA bundle is not the builder's system bundle"
if ! cmp -s /etc/ssl/certs/ca-certificates.crt "$tmp/builder-ca.crt" && cmp -s "$tmp/ca.crt" /etc/ssl/certs/ca-certificates.crt; then
    fail "the image carries this host's CA bundle"
fi
say "CA bundle: the builder's Debian bundle ($(grep -c 'BEGIN CERT' "$tmp/ca.crt") certificates; this host's has $(grep -c 'BEGIN CERT' /etc/ssl/certs/ca-certificates.crt))"

# Read-only root filesystem: the binary runs, serves /health, and the image's own
# HEALTHCHECK command passes, while it retries an unreachable broker.
cid=$(docker run -d --read-only --network none -e RABBITMQ_URL=amqp://guest:guest@127.0.0.1:1/%2F "$TAG")
ok=false
for _ in $(seq 1 40); do
    if docker exec "$cid" click-consumer healthcheck >/dev/null 2>&1; then ok=true; break; fi
    [[ $(docker inspect -f '{{.State.Running}}' "$cid") == true ]] || break
    sleep 0.25
done
$ok || { docker logs "$cid" >&2; fail "with --read-only, \`click-consumer healthcheck\` never passed"; }
say "--read-only: runs, and \`click-consumer healthcheck\` passes"
docker rm -f "$cid" >/dev/null
cid=
say "ok: $TAG"
