#!/usr/bin/env bash
# Installs the real servers that click-consumer's integration tests and benchmarks run:
# RabbitMQ (with Erlang's epmd), ClickHouse, and ZooKeeper with Java (for the ClickHouse
# cluster tests), from Debian's archive; and nftables, with which the cluster suite cuts
# a RabbitMQ node off from the others (a partition on loopback; that needs root).
#
# Idempotent, and silent when everything is already there. It only installs packages:
# the tests start private instances of their own (click-consumer-testkit), on free
# loopback ports, so no system-wide service is wanted. The packages' install hooks
# are kept from starting those services, and a service that the install started
# anyway is stopped again. Nothing that was running before is touched.
set -euo pipefail

PACKAGES=(rabbitmq-server clickhouse-server clickhouse-client zookeeper nftables)
POLICY_RC=/usr/sbin/policy-rc.d

have_program() {
  command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ] || [ -x "/usr/bin/$1" ]
}

have_rabbitmq_server() {
  compgen -G '/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server' >/dev/null
}

all_present() {
  have_rabbitmq_server && have_program epmd &&
    have_program clickhouse-server && have_program clickhouse-client &&
    have_program java && [ -f /usr/share/java/zookeeper.jar ] &&
    have_program nft
}

if all_present; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
  AS_ROOT=()
elif command -v sudo >/dev/null 2>&1; then
  AS_ROOT=(sudo)
else
  echo "install-services.sh: need root or sudo to install ${PACKAGES[*]}" >&2
  exit 1
fi

# Processes of the packages' own system users: the system-wide services.
system_services_running() {
  pgrep -u "$1" >/dev/null 2>&1
}

stop_system_service() {
  echo "install-services.sh: stopping the system-wide $1 that the install started" >&2
  if [ -d /run/systemd/system ]; then
    "${AS_ROOT[@]}" systemctl stop "$1" || echo "warning: could not stop $1" >&2
  elif [ -x "/etc/init.d/$1" ]; then
    "${AS_ROOT[@]}" "/etc/init.d/$1" stop || echo "warning: could not stop $1" >&2
  fi
}

# A policy-rc.d that exits 101 forbids package hooks to start services (Debian's
# invoke-rc.d and deb-systemd-invoke both honour it). Add one only for this run.
if [ ! -e "$POLICY_RC" ]; then
  "${AS_ROOT[@]}" sh -c "printf '#!/bin/sh\nexit 101\n' >'$POLICY_RC' && chmod 755 '$POLICY_RC'"
  trap '"${AS_ROOT[@]}" rm -f "$POLICY_RC"' EXIT
fi

rabbitmq_was_running=no
clickhouse_was_running=no
system_services_running rabbitmq && rabbitmq_was_running=yes
system_services_running clickhouse && clickhouse_was_running=yes

echo "install-services.sh: installing ${PACKAGES[*]}" >&2
"${AS_ROOT[@]}" apt-get -q update
"${AS_ROOT[@]}" env DEBIAN_FRONTEND=noninteractive \
  apt-get -q install -y --no-install-recommends "${PACKAGES[@]}"

if [ "$rabbitmq_was_running" = no ] && system_services_running rabbitmq; then
  stop_system_service rabbitmq-server
fi
if [ "$clickhouse_was_running" = no ] && system_services_running clickhouse; then
  stop_system_service clickhouse-server
fi

if ! all_present; then
  echo "install-services.sh: installed ${PACKAGES[*]} but still missing one of:" \
    "/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server, epmd," \
    "clickhouse-server, clickhouse-client, java, /usr/share/java/zookeeper.jar, nft" >&2
  exit 1
fi
