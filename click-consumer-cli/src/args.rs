//! Command line and environment: every setting is a flag and an environment variable
//! (the Python service's names), lowered into the library's `Config`, which validates.

use clap::{Parser, Subcommand};
use click_consumer::{Config, Scrubber, config::defaults};

/// Declares the settings once: each becomes a `--flag` with an `env`, and a lookup by
/// environment-variable name for `Config::from_lookup`. Values are never shown in
/// `--help` (`hide_env_values`), so a password in the environment stays out of it.
macro_rules! settings {
    ($( $(#[doc = $doc:literal])* $field:ident: $env:literal $(= $default:expr)?; )*) => {
        /// Service settings.
        #[derive(clap::Args)]
        pub(crate) struct Settings {
            $(
                $(#[doc = $doc])*
                #[arg(long, env = $env, hide_env_values = true, value_name = "VALUE" $(, default_value = $default.to_string())?)]
                $field: Option<String>,
            )*
        }

        impl Settings {
            fn lookup(&self, name: &str) -> Option<String> {
                match name {
                    $( $env => self.$field.clone(), )*
                    _ => None,
                }
            }
        }
    };
}

settings! {
    /// AMQP URL of RabbitMQ (amqps:// for TLS). An empty path means the vhost `/`.
    rabbitmq_url: "RABBITMQ_URL" = defaults::RABBITMQ_URL;
    /// PEM file of a private CA for amqps:// [default: the system's trusted roots].
    rabbitmq_ca_file: "RABBITMQ_CA_FILE";
    /// Exchange the shortener publishes clicks to.
    rabbitmq_exchange: "RABBITMQ_EXCHANGE" = defaults::EXCHANGE;
    /// Exchange type: direct, fanout, topic or headers.
    rabbitmq_exchange_type: "RABBITMQ_EXCHANGE_TYPE" = defaults::EXCHANGE_TYPE;
    /// Durable queue to consume.
    rabbitmq_queue: "RABBITMQ_QUEUE" = defaults::QUEUE;
    /// Queue type: classic, or quorum for a RabbitMQ cluster.
    rabbitmq_queue_type: "RABBITMQ_QUEUE_TYPE" = defaults::QUEUE_TYPE;
    /// Binding key of the queue [default: the queue name].
    rabbitmq_routing_key: "RABBITMQ_ROUTING_KEY";
    /// Queue for messages that cannot be stored [default: <queue>.dead-letter].
    dead_letter_queue: "DEAD_LETTER_QUEUE";
    /// false: reject invalid messages without requeue instead of dead-lettering them.
    dead_letter_enabled: "DEAD_LETTER_ENABLED" = true;
    /// ClickHouse host (HTTP interface).
    clickhouse_host: "CLICKHOUSE_HOST" = defaults::CLICKHOUSE_HOST;
    /// ClickHouse HTTP port.
    clickhouse_port: "CLICKHOUSE_PORT" = defaults::CLICKHOUSE_PORT;
    /// Full ClickHouse URL (http:// or https://); overrides host and port.
    clickhouse_url: "CLICKHOUSE_URL";
    /// PEM file of a private CA for https:// [default: Mozilla's roots, built in].
    clickhouse_ca_file: "CLICKHOUSE_CA_FILE";
    /// Database, created if missing.
    clickhouse_database: "CLICKHOUSE_DATABASE" = defaults::CLICKHOUSE_DATABASE;
    /// Table, created if missing.
    clickhouse_table: "CLICKHOUSE_TABLE" = defaults::CLICKHOUSE_TABLE;
    /// Engine of the table created when missing, e.g. ReplicatedMergeTree(...).
    clickhouse_table_engine: "CLICKHOUSE_TABLE_ENGINE" = defaults::CLICKHOUSE_TABLE_ENGINE;
    /// Create the database and table ON CLUSTER this cluster.
    clickhouse_cluster: "CLICKHOUSE_CLUSTER";
    /// ClickHouse user.
    clickhouse_user: "CLICKHOUSE_USER" = defaults::CLICKHOUSE_USER;
    /// ClickHouse password [default: empty].
    clickhouse_password: "CLICKHOUSE_PASSWORD";
    /// Rows per INSERT (1 to 65535).
    batch_size: "BATCH_SIZE" = defaults::BATCH_SIZE;
    /// Longest a message waits for its batch, in milliseconds.
    batch_timeout_ms: "BATCH_TIMEOUT_MS" = defaults::BATCH_TIMEOUT_MS;
    /// A batch is also written once it holds this many bytes.
    batch_max_bytes: "BATCH_MAX_BYTES" = defaults::BATCH_MAX_BYTES;
    /// Unacknowledged messages in flight [default: 2 x BATCH_SIZE, at most 65535].
    prefetch_count: "PREFETCH_COUNT";
    /// Larger message bodies are dead-lettered unread.
    max_message_bytes: "MAX_MESSAGE_BYTES" = defaults::MAX_MESSAGE_BYTES;
    /// Message bytes received and not yet acknowledged, at most: the prefetch window
    /// shrinks for large messages [default: 67108864, or MAX_MESSAGE_BYTES if larger].
    max_inflight_bytes: "MAX_INFLIGHT_BYTES";
    /// Consumer tag on the broker [default: <hostname>-<pid>].
    consumer_tag: "CONSUMER_TAG";
    /// Longest a shutdown may take (flush, ack, close), in milliseconds.
    shutdown_timeout_ms: "SHUTDOWN_TIMEOUT_MS" = defaults::SHUTDOWN_TIMEOUT_MS;
    /// Longest start-up waits for RabbitMQ and ClickHouse, in milliseconds.
    startup_timeout_ms: "STARTUP_TIMEOUT_MS" = defaults::STARTUP_TIMEOUT_MS;
    /// First wait before a retry (doubles with jitter), in milliseconds.
    retry_initial_backoff_ms: "RETRY_INITIAL_BACKOFF_MS" = defaults::RETRY_INITIAL_BACKOFF_MS;
    /// Longest wait between retries, in milliseconds.
    retry_max_backoff_ms: "RETRY_MAX_BACKOFF_MS" = defaults::RETRY_MAX_BACKOFF_MS;
    /// After ClickHouse failed this long, a batch goes back to the queue, in milliseconds.
    insert_release_after_ms: "INSERT_RELEASE_AFTER_MS" = defaults::INSERT_RELEASE_AFTER_MS;
    /// How long to reconnect to a lost broker before exiting, in milliseconds.
    reconnect_limit_ms: "RECONNECT_LIMIT_MS" = defaults::RECONNECT_LIMIT_MS;
    /// Interval of the throughput log line, in milliseconds.
    stats_interval_ms: "STATS_INTERVAL_MS" = defaults::STATS_INTERVAL_MS;
}

/// Moves click events from RabbitMQ into ClickHouse, in batches, acknowledging only what
/// ClickHouse has committed. Every option can also be set by the environment variable
/// shown (the Python consumer's variables keep their names); flags win.
#[derive(Parser)]
#[command(name = "click-consumer", version, max_term_width = 100)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) settings: Settings,

    /// Log level: error, warn, info, debug, trace, or the Python names DEBUG, INFO,
    /// WARNING, ERROR, CRITICAL (any case). RUST_LOG, if set, adds module filters.
    #[arg(long, env = "LOG_LEVEL", default_value = "info", value_name = "LEVEL")]
    pub(crate) log_level: String,

    /// Address of the HTTP listener for /metrics, /health and /ready; `off` disables it.
    #[arg(
        long,
        env = "METRICS_ADDR",
        default_value = "0.0.0.0:9090",
        value_name = "ADDR"
    )]
    pub(crate) metrics_addr: String,

    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run the consumer (what happens without a subcommand).
    Run,
    /// Exit 0 if the consumer on this host answers /health (for Docker's HEALTHCHECK).
    Healthcheck,
    /// Publish realistic demo clicks to the exchange, to watch rows arrive.
    PublishDemo {
        /// Clicks per second.
        #[arg(long, default_value_t = 20)]
        rate: u32,
        /// Stop after this many clicks (0: until interrupted).
        #[arg(long, default_value_t = 0)]
        count: u64,
    },
}

impl Settings {
    /// The validated library configuration.
    pub(crate) fn config(&self) -> click_consumer::Result<Config> {
        Config::from_lookup(|name| self.lookup(name))
    }

    /// The secrets among the settings (`CLICKHOUSE_PASSWORD`, the passwords inside
    /// `RABBITMQ_URL` and `CLICKHOUSE_URL`), for scrubbing them from everything printed.
    pub(crate) fn secrets(&self) -> Scrubber {
        let get = |name| self.lookup(name).unwrap_or_default();
        let rabbitmq_url = get("RABBITMQ_URL");
        let secrets = Scrubber::new()
            .with_secret(&get("CLICKHOUSE_PASSWORD"))
            .with_url(&get("CLICKHOUSE_URL"));
        // The built-in default's guest:guest is public, and hiding it would hide the user.
        if rabbitmq_url == defaults::RABBITMQ_URL {
            secrets
        } else {
            secrets.with_url(&rabbitmq_url)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn flags_reach_the_config_and_bad_ones_name_their_variable() {
        let cli = Cli::try_parse_from([
            "click-consumer",
            "--rabbitmq-queue",
            "q1",
            "--batch-size",
            "250",
        ])
        .expect("parses");
        let config = cli.settings.config().expect("valid");
        assert!(format!("{config:?}").contains("queue: \"q1\""));

        let cli = Cli::try_parse_from(["click-consumer", "--batch-size", "0"]).expect("parses");
        let err = cli.settings.config().expect_err("0 is refused").to_string();
        assert!(err.contains("BATCH_SIZE"), "{err}");
    }

    #[test]
    fn secrets_are_the_password_settings() {
        let cli = Cli::try_parse_from([
            "click-consumer",
            "--rabbitmq-url",
            "amqp://u:r/m#q@host/",
            "--clickhouse-url",
            "http://d:c@h?@host:8123",
            "--clickhouse-password",
            "pw 3",
        ])
        .expect("parses");
        let scrubbed = cli
            .settings
            .secrets()
            .scrub("r/m#q c@h? pw 3 host")
            .into_owned();
        assert_eq!(scrubbed, "*** *** *** host");
    }

    #[test]
    fn help_lists_every_variable_with_its_default() {
        let help = Cli::command().render_long_help().to_string();
        for needle in [
            "RABBITMQ_URL",
            "RABBITMQ_EXCHANGE",
            "RABBITMQ_QUEUE",
            "CLICKHOUSE_HOST",
            "CLICKHOUSE_PORT",
            "CLICKHOUSE_DATABASE",
            "CLICKHOUSE_USER",
            "CLICKHOUSE_PASSWORD",
            "LOG_LEVEL",
            "BATCH_SIZE",
            "BATCH_TIMEOUT_MS",
            "METRICS_ADDR",
            "[default: 8123]",
            "[default: click_events]",
            "[default: url_shortener]",
        ] {
            assert!(help.contains(needle), "--help lacks {needle}:\n{help}");
        }
    }
}
