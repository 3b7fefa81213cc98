#!/usr/bin/env bash
# The README's run command: click-consumer against a local RabbitMQ and ClickHouse.
#
# Installs both servers from Debian's archive if missing, builds the release binary,
# starts private servers on free loopback ports, and runs the consumer against them,
# with a demo publisher sending DEMO_RATE clicks/s (default 20; 0 for none). Every other
# setting comes from the environment as usual, e.g. LOG_LEVEL=debug. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-services.sh
scripts/build-release.sh
cargo build --release --locked -p click-consumer-testkit --bin local-stack
exec target/release/local-stack --demo-rate "${DEMO_RATE:-20}" -- target/release/click-consumer
