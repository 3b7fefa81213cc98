#!/bin/sh
# Writes a config from the environment (as the official image's entrypoint does), creates
# CLICKHOUSE_DB on a server that listens on 127.0.0.1 only, then runs the real server on all
# addresses in the foreground. So, as with the official image, a healthcheck against the
# container's own address turns healthy only once the database exists.
set -eu
user=${CLICKHOUSE_USER:-default}
password=${CLICKHOUSE_PASSWORD:-}
dir=/etc/clickhouse-server/generated

write_config() { # listen_host
    cat >"$dir/config.xml" <<XML
<?xml version="1.0"?>
<yandex>
    <logger>
        <level>information</level>
        <log>/var/lib/clickhouse/clickhouse-server.log</log>
        <errorlog>/var/lib/clickhouse/clickhouse-server.err.log</errorlog>
        <size>50M</size>
        <count>2</count>
        <console>1</console>
    </logger>
    <listen_host>$1</listen_host>
    <http_port>8123</http_port>
    <tcp_port>9000</tcp_port>
    <path>/var/lib/clickhouse/</path>
    <tmp_path>/var/lib/clickhouse/tmp/</tmp_path>
    <user_files_path>/var/lib/clickhouse/user_files/</user_files_path>
    <format_schema_path>/var/lib/clickhouse/format_schemas/</format_schema_path>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <profiles>
        <default/>
    </profiles>
    <users>
        <$user>
            <password>$password</password>
            <networks>
                <ip>::/0</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </$user>
    </users>
    <quotas>
        <default/>
    </quotas>
</yandex>
XML
}

if [ -n "${CLICKHOUSE_DB:-}" ] && [ ! -e "/var/lib/clickhouse/metadata/${CLICKHOUSE_DB}.sql" ]; then
    write_config 127.0.0.1
    clickhouse-server --config-file="$dir/config.xml" >/dev/null 2>&1 &
    pid=$!
    i=0
    until clickhouse-client --host 127.0.0.1 --user "$user" --password "$password" -q 'SELECT 1' >/dev/null 2>&1; do
        i=$((i + 1))
        [ "$i" -lt 300 ] || { echo "clickhouse-entrypoint: the init server did not start" >&2; exit 1; }
        sleep 0.1
    done
    clickhouse-client --host 127.0.0.1 --user "$user" --password "$password" \
        -q "CREATE DATABASE IF NOT EXISTS ${CLICKHOUSE_DB}"
    echo "clickhouse-entrypoint: created database ${CLICKHOUSE_DB}"
    kill "$pid"
    wait "$pid" || true
fi

write_config 0.0.0.0
exec clickhouse-server --config-file="$dir/config.xml"
