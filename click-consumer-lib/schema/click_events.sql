-- The table click-consumer writes to, created at start-up when missing.
-- {database} and {table} are replaced by CLICKHOUSE_DATABASE and CLICKHOUSE_TABLE,
-- which are validated as plain identifiers ([A-Za-z_][A-Za-z0-9_]*); {on_cluster} by
-- `ON CLUSTER <CLICKHOUSE_CLUSTER>` when that is set; {engine} by
-- CLICKHOUSE_TABLE_ENGINE (default MergeTree()).
-- Works on ClickHouse 18.16 and current releases.
CREATE TABLE IF NOT EXISTS {database}.{table} {on_cluster}
(
    short_code String,
    timestamp DateTime,
    user_agent String,
    ip_address String,
    referrer String,
    original_url String
)
ENGINE = {engine}
ORDER BY (short_code, timestamp)
