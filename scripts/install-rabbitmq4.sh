#!/usr/bin/env bash
# Installs RabbitMQ 4.0 (Debian trixie's rabbitmq-server, on trixie's Erlang) into a
# Debian trixie chroot, for the tests that run against RabbitMQ 4
# (CLICK_CONSUMER_TEST_RABBITMQ=4, see click-consumer-testkit).
#
# The chroot lives outside the repository, in a fixed cache location shared by every
# clone on the machine: $CLICK_CONSUMER_RABBITMQ4_ROOT, by default
# /var/cache/click-consumer/rabbitmq4-trixie. Idempotent: when the chroot is complete it
# exits at once; otherwise it builds it from scratch (debootstrap, about 1 min, then
# rabbitmq-server, about 15 s) in a side directory and moves it into place only when
# complete, so an interrupted run never leaves a half-built chroot behind.
#
# Nothing is started: the chroot's policy-rc.d forbids the package hooks to start
# services, and the tests start private brokers of their own, as the chroot's
# `rabbitmq` user. No file system stays mounted into the chroot after this script.
set -euo pipefail

ROOT=${CLICK_CONSUMER_RABBITMQ4_ROOT:-/var/cache/click-consumer/rabbitmq4-trixie}
MIRROR=${CLICK_CONSUMER_DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=trixie
MARKER=.click-consumer-rabbitmq4

complete() {
  [ -f "$1/$MARKER" ] && compgen -G "$1/usr/lib/rabbitmq/lib/rabbitmq_server-4.*/sbin/rabbitmq-server" >/dev/null
}

if complete "$ROOT"; then
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "install-rabbitmq4.sh: must run as root (debootstrap and chroot need it)" >&2
  exit 1
fi

if ! command -v debootstrap >/dev/null 2>&1; then
  echo "install-rabbitmq4.sh: installing debootstrap" >&2
  apt-get -q update
  DEBIAN_FRONTEND=noninteractive apt-get -q install -y --no-install-recommends debootstrap
fi

BUILD="$ROOT.partial"
MOUNTED=()
cleanup() {
  local m
  for m in "${MOUNTED[@]}"; do
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
}
trap cleanup EXIT

rm -rf "$BUILD"
mkdir -p "$(dirname "$ROOT")"
echo "install-rabbitmq4.sh: debootstrap $SUITE into $BUILD" >&2
debootstrap --variant=minbase "$SUITE" "$BUILD" "$MIRROR" >"$BUILD.log" 2>&1 || {
  tail -n 30 "$BUILD.log" >&2
  exit 1
}

printf '#!/bin/sh\nexit 101\n' >"$BUILD/usr/sbin/policy-rc.d"
chmod 755 "$BUILD/usr/sbin/policy-rc.d"
cp /etc/resolv.conf "$BUILD/etc/resolv.conf" 2>/dev/null || true
cp /etc/hosts "$BUILD/etc/hosts"
mount -t proc proc "$BUILD/proc" && MOUNTED=("$BUILD/proc" "${MOUNTED[@]}")

echo "install-rabbitmq4.sh: installing rabbitmq-server in the chroot" >&2
chroot "$BUILD" env DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 apt-get -q update >>"$BUILD.log" 2>&1
chroot "$BUILD" env DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 \
  apt-get -q install -y --no-install-recommends rabbitmq-server >>"$BUILD.log" 2>&1 || {
  tail -n 30 "$BUILD.log" >&2
  exit 1
}
chroot "$BUILD" apt-get clean
cleanup
MOUNTED=()

# What the testkit needs: the broker's scripts, epmd, and the rabbitmq user.
if ! compgen -G "$BUILD/usr/lib/rabbitmq/lib/rabbitmq_server-4.*/sbin/rabbitmq-server" >/dev/null ||
  ! [ -x "$BUILD/usr/bin/epmd" ] || ! chroot "$BUILD" id rabbitmq >/dev/null; then
  echo "install-rabbitmq4.sh: the chroot has no RabbitMQ 4 server, epmd or rabbitmq user; see $BUILD.log" >&2
  exit 1
fi
version=$(chroot "$BUILD" dpkg-query -W -f '${Version}' rabbitmq-server)
echo "rabbitmq-server $version" >"$BUILD/$MARKER"

rm -rf "$ROOT"
mv "$BUILD" "$ROOT"
mv "$BUILD.log" "$ROOT.log"
echo "install-rabbitmq4.sh: rabbitmq-server $version ready in $ROOT" >&2
