#!/usr/bin/env bash
# Runs every example of the library in self-test mode (EXAMPLE_SELF_TEST=1) against a
# private RabbitMQ and ClickHouse (testkit's local-stack, fresh servers per example).
# Each example exits non-zero if what it shows did not happen. CI runs this.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-services.sh
cargo build --locked -p click-consumer --examples
cargo build --locked -p click-consumer-testkit --bin local-stack
for example in redirect_service consumer_beside_web_server tune_batching; do
  echo "--- example: $example"
  EXAMPLE_SELF_TEST=1 target/debug/local-stack -- "target/debug/examples/$example"
done
echo "--- all examples ran"
