#!/usr/bin/env bash
# The broker suites against RabbitMQ 4.0 (Debian trixie's rabbitmq-server, in a chroot
# that scripts/install-rabbitmq4.sh builds once): the testkit's own server tests, the
# library's integration tests, and the binary's end-to-end, replica and fault-injection
# suites. Unit tests, doc tests and examples do not touch the broker and run only in
# scripts/test.sh (against the machine's RabbitMQ 3.10). Extra arguments go to
# `cargo test`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-services.sh # ClickHouse (and the 3.10 tools) for the same suites
scripts/install-rabbitmq4.sh
export CLICK_CONSUMER_TEST_RABBITMQ=4
exec cargo test --locked \
  -p click-consumer-testkit --test servers \
  -p click-consumer --test it \
  -p click-consumer-cli --test e2e --test replicas --test fault_suite \
  "$@"
