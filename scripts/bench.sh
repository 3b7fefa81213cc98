#!/usr/bin/env bash
# The benchmark (issue 3): the release click-consumer against a no-work reference
# consumer, on private RabbitMQ and ClickHouse servers started for the run (they stop
# with it). Prints every run, the medians, the targets with pass/fail and a Markdown
# table for the README; writes the results to bench-results/<UTC timestamp>.json.
#
#   scripts/bench.sh                                   # defaults: 200,000 messages, 3 repeats, 30 s latency phase
#   scripts/bench.sh --messages 50000 --repeats 1 --latency-seconds 10
#   scripts/bench.sh --messages 2000000 --repeats 1 --skip-reference --skip-latency   # peak RSS vs queue depth
#   scripts/bench.sh --messages 50000 --skip-latency --extra-columns   # ten typed extra columns (issue 13)
#   scripts/bench.sh --help
#
# Arguments go to click-consumer-bench unchanged. Takes a few minutes at the defaults on
# 2 cores; run it on an otherwise idle machine.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/install-services.sh
scripts/build-release.sh
cargo build --release --locked -p click-consumer-bench --bin click-consumer-bench

# It runs the click-consumer beside it: target/release/click-consumer.
exec "${CARGO_TARGET_DIR:-target}/release/click-consumer-bench" "$@"
