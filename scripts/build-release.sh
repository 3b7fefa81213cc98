#!/usr/bin/env bash
# The one release build of the `click-consumer` binary.
#
# The Dockerfile's build stage runs this script, and so does CI (without Docker), so the
# step that ships is the step that is tested. Keep the command here and nowhere else.
#
# Output: target/release/click-consumer (or $CARGO_TARGET_DIR/release/click-consumer).
# --locked: fail instead of silently changing Cargo.lock.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [[ $# -ne 0 ]]; then
    echo "usage: $0 (takes no arguments: the release build is fixed)" >&2
    exit 2
fi

exec cargo build --release --locked -p click-consumer-cli --bin click-consumer
