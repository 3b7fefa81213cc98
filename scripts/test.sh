#!/usr/bin/env bash
# The README's test command. Installs RabbitMQ and ClickHouse from Debian's archive when
# they are missing, then runs every test of the workspace: unit tests, integration tests
# and the end-to-end tests of the binary, against private servers that the tests start
# themselves on free loopback ports (click-consumer-testkit). Extra arguments go to
# `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-services.sh
exec cargo test --workspace --locked "$@"
