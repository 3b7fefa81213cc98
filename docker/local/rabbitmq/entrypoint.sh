#!/bin/sh
# The default user from the environment (as the official image does), then the broker in
# the foreground.
set -eu
{
    echo "listeners.tcp.default = 5672"
    echo "management.tcp.port = 15672"
    echo "loopback_users = none"
    if [ -n "${RABBITMQ_DEFAULT_USER:-}" ]; then
        echo "default_user = ${RABBITMQ_DEFAULT_USER}"
        echo "default_pass = ${RABBITMQ_DEFAULT_PASS:-}"
    fi
} >/etc/rabbitmq/rabbitmq.conf
# Debian's /usr/sbin/rabbitmq-server wrapper sends the output to /var/log/rabbitmq/startup_log;
# the script it wraps logs to stdout (RABBITMQ_LOGS=-), for `docker logs`.
exec /usr/lib/rabbitmq/bin/rabbitmq-server
