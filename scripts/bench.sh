#!/usr/bin/env bash
# The benchmark (issues 3 and 10): the release click-consumer against two no-work
# reference consumers (click-consumer's own window: its prefetch, an ack per BATCH_SIZE,
# 7,000 and 3,500 by default; and prefetch 1,000 with an ack per 100), on private RabbitMQ and ClickHouse servers started for the run (they stop
# with it); then large-message drains (2,000 and 5,000 valid clicks of ~700 KB: peak RSS,
# MB/s); then the latency phase. Prints every run, min/median/max, the broker's CPU per
# message, the targets with pass/fail and Markdown tables for the README; writes the
# results to bench-results/<UTC timestamp>.json.
#
#   scripts/bench.sh                                   # defaults: 200,000 messages, 9 repeats, large drains, 30 s latency phase
#   scripts/bench.sh --consumer-env PREFETCH_COUNT=2000 --consumer-env BATCH_SIZE=1000   # another window
#   scripts/bench.sh --messages 50000 --repeats 1 --large-messages 0 --latency-seconds 10
#   scripts/bench.sh --messages 2000000 --repeats 1 --skip-reference --skip-latency --large-messages 0   # peak RSS vs queue depth
#   scripts/bench.sh --messages 50000 --skip-latency --large-messages 0 --extra-columns   # ten typed extra columns (issue 13)
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
