//! Typed configuration: defaults, builders, validation in one place, and `from_env`.
//!
//! Every setting has an environment variable name (the Python service's names where it
//! had the setting); [`Error::InvalidSetting`] names that variable when a value is refused.

use std::{fmt, path::PathBuf, str::FromStr, time::Duration};

use crate::endpoints::redact_list;
use crate::error::{Error, Result};
use crate::secret::Secret;

/// The largest byte size a setting may have (1 TiB): larger ones are typos, and would
/// overflow the byte arithmetic.
const MAX_BYTES_SETTING: u64 = 1 << 40;

/// Default values, public so that a command line can show them in its help.
pub mod defaults {
    /// `RABBITMQ_URL`: the Python service's default.
    pub const RABBITMQ_URL: &str = "amqp://guest:guest@localhost:5672/";
    /// `RABBITMQ_EXCHANGE`
    pub const EXCHANGE: &str = "url_shortener";
    /// `RABBITMQ_EXCHANGE_TYPE`: what the Python service declares.
    pub const EXCHANGE_TYPE: &str = "topic";
    /// `RABBITMQ_QUEUE`
    pub const QUEUE: &str = "click_events";
    /// `RABBITMQ_QUEUE_TYPE`
    pub const QUEUE_TYPE: &str = "classic";
    /// Suffix appended to the queue name to name the dead-letter queue.
    pub const DEAD_LETTER_SUFFIX: &str = ".dead-letter";
    /// `CLICKHOUSE_HOST`
    pub const CLICKHOUSE_HOST: &str = "localhost";
    /// `CLICKHOUSE_PORT`: ClickHouse's HTTP interface.
    pub const CLICKHOUSE_PORT: u16 = 8123;
    /// `CLICKHOUSE_DATABASE`
    pub const CLICKHOUSE_DATABASE: &str = "url_shortener";
    /// `CLICKHOUSE_TABLE`
    pub const CLICKHOUSE_TABLE: &str = "click_events";
    /// `CLICKHOUSE_USER`
    pub const CLICKHOUSE_USER: &str = "default";
    /// `CLICKHOUSE_TABLE_ENGINE`: the engine of the table created when missing.
    pub const CLICKHOUSE_TABLE_ENGINE: &str = "MergeTree()";
    /// `BATCH_SIZE`: rows per INSERT. ClickHouse wants thousands of rows per INSERT (each
    /// INSERT makes a part); 3,500 clicks of under 1 KB is under 3.5 MB, cheap to hold and
    /// retry. The consumer holds two batches (one written while the next fills): the
    /// largest part of its memory that it controls while it drains a backlog. Measured
    /// (`scripts/bench.sh`, 200,000 clicks, 2026-11-30): peak RSS 25.3 MiB at 5,000
    /// against 22.8 at 3,500, with no loss of rate or CPU (10,000 had held 9 MiB more
    /// than 5,000 the day before); the broker spends less CPU per message on smaller
    /// windows. At normal traffic a batch is written by `BATCH_TIMEOUT_MS` long before it
    /// fills.
    pub const BATCH_SIZE: usize = 3_500;
    /// `BATCH_TIMEOUT_MS`: the longest a row waits for its batch to fill. One second keeps
    /// rows visible quickly at low traffic while ClickHouse sees at most one INSERT a
    /// second per replica.
    pub const BATCH_TIMEOUT_MS: u64 = 1_000;
    /// `BATCH_MAX_BYTES`: a batch is also written once it holds this many bytes (rows
    /// plus the bodies kept to dead-letter rows ClickHouse refuses), which bounds the
    /// memory of a batch and of its retries when messages are large.
    pub const BATCH_MAX_BYTES: usize = 32 * 1024 * 1024;
    /// `MAX_MESSAGE_BYTES`: larger bodies are dead-lettered unread.
    pub const MAX_MESSAGE_BYTES: usize = 1024 * 1024;
    /// `MAX_INFLIGHT_BYTES`: message bytes received and not yet acknowledged, at most. The
    /// prefetch window shrinks below `PREFETCH_COUNT` when messages are large enough to
    /// exceed it. 64 MiB keeps a consumer of 700 KB messages well under a 256 MiB container
    /// (bodies are held about twice: the delivery and the encoded row) and never limits
    /// normal clicks (7,000 clicks of under 1 KB is under 7 MB).
    pub const MAX_INFLIGHT_BYTES: usize = 64 * 1024 * 1024;
    /// `SHUTDOWN_TIMEOUT_MS`: below Docker's 10 s stop timeout.
    pub const SHUTDOWN_TIMEOUT_MS: u64 = 8_000;
    /// `STARTUP_TIMEOUT_MS`: how long start-up waits for both servers.
    pub const STARTUP_TIMEOUT_MS: u64 = 30_000;
    /// `RETRY_INITIAL_BACKOFF_MS`: first wait after a failed INSERT or lost connection.
    pub const RETRY_INITIAL_BACKOFF_MS: u64 = 200;
    /// `RETRY_MAX_BACKOFF_MS`: the longest wait between two attempts.
    pub const RETRY_MAX_BACKOFF_MS: u64 = 10_000;
    /// `INSERT_RELEASE_AFTER_MS`: after failing this long, a batch's messages go back to
    /// the queue (well below RabbitMQ's 30 min consumer timeout).
    pub const INSERT_RELEASE_AFTER_MS: u64 = 5 * 60 * 1000;
    /// `RECONNECT_LIMIT_MS`: how long the consumer tries to get a lost broker back.
    pub const RECONNECT_LIMIT_MS: u64 = 10 * 60 * 1000;
    /// `STATS_INTERVAL_MS`: the interval of the throughput log line.
    pub const STATS_INTERVAL_MS: u64 = 10_000;
}

/// The AMQP exchange type (`RABBITMQ_EXCHANGE_TYPE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ExchangeType {
    /// `direct`
    Direct,
    /// `fanout`
    Fanout,
    /// `topic` (the default, as the Python service declares it)
    #[default]
    Topic,
    /// `headers`
    Headers,
}

impl ExchangeType {
    /// The AMQP name of the type.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeType::Direct => "direct",
            ExchangeType::Fanout => "fanout",
            ExchangeType::Topic => "topic",
            ExchangeType::Headers => "headers",
        }
    }
}

impl FromStr for ExchangeType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "direct" => Ok(ExchangeType::Direct),
            "fanout" => Ok(ExchangeType::Fanout),
            "topic" => Ok(ExchangeType::Topic),
            "headers" => Ok(ExchangeType::Headers),
            other => Err(Error::setting(
                "RABBITMQ_EXCHANGE_TYPE",
                format!("expected direct, fanout, topic or headers, got `{other}`"),
            )),
        }
    }
}

impl fmt::Display for ExchangeType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The RabbitMQ queue type (`RABBITMQ_QUEUE_TYPE`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum QueueType {
    /// A classic durable queue (what the Python service declares).
    #[default]
    Classic,
    /// A replicated quorum queue, for brokers in a cluster. Declared with
    /// `x-queue-type: quorum`, a delivery limit, and the dead-letter queue (a quorum
    /// queue too, so that it survives the loss of a node) as its dead-letter target.
    Quorum,
}

impl FromStr for QueueType {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "classic" => Ok(QueueType::Classic),
            "quorum" => Ok(QueueType::Quorum),
            other => Err(Error::setting(
                "RABBITMQ_QUEUE_TYPE",
                format!("expected classic or quorum, got `{other}`"),
            )),
        }
    }
}

/// Everything the consumer needs to know. Build it with [`Config::default`] (the Python
/// service's defaults) and the `with_*` methods, or with [`Config::from_env`]; it is
/// validated once, by [`Config::validate`] (which [`Consumer::new`](crate::Consumer::new)
/// calls).
///
/// `Debug` never shows the ClickHouse password or the password inside the RabbitMQ URL.
#[derive(Clone)]
pub struct Config {
    pub(crate) rabbitmq_url: String,
    pub(crate) rabbitmq_ca_file: Option<PathBuf>,
    pub(crate) exchange: String,
    pub(crate) exchange_type: ExchangeType,
    pub(crate) queue: String,
    pub(crate) queue_type: QueueType,
    pub(crate) routing_key: Option<String>,
    pub(crate) dead_letter_queue: Option<String>,
    pub(crate) dead_letter_enabled: bool,
    pub(crate) clickhouse_url: Option<String>,
    pub(crate) clickhouse_ca_file: Option<PathBuf>,
    pub(crate) clickhouse_host: String,
    pub(crate) clickhouse_port: u16,
    pub(crate) clickhouse_database: String,
    pub(crate) clickhouse_table: String,
    pub(crate) clickhouse_table_engine: String,
    pub(crate) clickhouse_cluster: Option<String>,
    pub(crate) clickhouse_user: String,
    pub(crate) clickhouse_password: Secret,
    pub(crate) batch_size: usize,
    pub(crate) batch_timeout: Duration,
    pub(crate) batch_max_bytes: usize,
    pub(crate) prefetch: Option<u16>,
    pub(crate) max_message_bytes: usize,
    pub(crate) max_inflight_bytes: Option<usize>,
    pub(crate) consumer_tag: Option<String>,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) startup_timeout: Duration,
    pub(crate) retry_initial_backoff: Duration,
    pub(crate) retry_max_backoff: Duration,
    pub(crate) insert_release_after: Duration,
    pub(crate) reconnect_limit: Duration,
    pub(crate) stats_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        use defaults::*;
        Config {
            rabbitmq_url: RABBITMQ_URL.to_owned(),
            rabbitmq_ca_file: None,
            exchange: EXCHANGE.to_owned(),
            exchange_type: ExchangeType::Topic,
            queue: QUEUE.to_owned(),
            queue_type: QueueType::Classic,
            routing_key: None,
            dead_letter_queue: None,
            dead_letter_enabled: true,
            clickhouse_url: None,
            clickhouse_ca_file: None,
            clickhouse_host: CLICKHOUSE_HOST.to_owned(),
            clickhouse_port: CLICKHOUSE_PORT,
            clickhouse_database: CLICKHOUSE_DATABASE.to_owned(),
            clickhouse_table: CLICKHOUSE_TABLE.to_owned(),
            clickhouse_table_engine: CLICKHOUSE_TABLE_ENGINE.to_owned(),
            clickhouse_cluster: None,
            clickhouse_user: CLICKHOUSE_USER.to_owned(),
            clickhouse_password: Secret::default(),
            batch_size: BATCH_SIZE,
            batch_timeout: Duration::from_millis(BATCH_TIMEOUT_MS),
            batch_max_bytes: BATCH_MAX_BYTES,
            prefetch: None,
            max_message_bytes: MAX_MESSAGE_BYTES,
            max_inflight_bytes: None,
            consumer_tag: None,
            shutdown_timeout: Duration::from_millis(SHUTDOWN_TIMEOUT_MS),
            startup_timeout: Duration::from_millis(STARTUP_TIMEOUT_MS),
            retry_initial_backoff: Duration::from_millis(RETRY_INITIAL_BACKOFF_MS),
            retry_max_backoff: Duration::from_millis(RETRY_MAX_BACKOFF_MS),
            insert_release_after: Duration::from_millis(INSERT_RELEASE_AFTER_MS),
            reconnect_limit: Duration::from_millis(RECONNECT_LIMIT_MS),
            stats_interval: Duration::from_millis(STATS_INTERVAL_MS),
        }
    }
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("rabbitmq_url", &redact_list(&self.rabbitmq_url))
            .field("rabbitmq_ca_file", &self.rabbitmq_ca_file)
            .field("exchange", &self.exchange)
            .field("exchange_type", &self.exchange_type)
            .field("queue", &self.queue)
            .field("queue_type", &self.queue_type)
            .field("routing_key", &self.routing_key())
            .field("dead_letter_queue", &self.dead_letter_queue())
            .field("clickhouse_url", &redact_list(&self.clickhouse_url()))
            .field("clickhouse_ca_file", &self.clickhouse_ca_file)
            .field("clickhouse_database", &self.clickhouse_database)
            .field("clickhouse_table", &self.clickhouse_table)
            .field("clickhouse_table_engine", &self.clickhouse_table_engine)
            .field("clickhouse_cluster", &self.clickhouse_cluster)
            .field("clickhouse_user", &self.clickhouse_user)
            .field("clickhouse_password", &self.clickhouse_password)
            .field("batch_size", &self.batch_size)
            .field("batch_timeout", &self.batch_timeout)
            .field("batch_max_bytes", &self.batch_max_bytes)
            .field("prefetch", &self.prefetch())
            .field("max_message_bytes", &self.max_message_bytes)
            .field("max_inflight_bytes", &self.max_inflight_bytes())
            .field("consumer_tag", &self.consumer_tag)
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("startup_timeout", &self.startup_timeout)
            .field("retry_initial_backoff", &self.retry_initial_backoff)
            .field("retry_max_backoff", &self.retry_max_backoff)
            .field("insert_release_after", &self.insert_release_after)
            .field("reconnect_limit", &self.reconnect_limit)
            .field("stats_interval", &self.stats_interval)
            .finish()
    }
}

macro_rules! builder {
    ($(#[$doc:meta])* $name:ident, $field:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.$field = value;
            self
        }
    };
    ($(#[$doc:meta])* $name:ident, $field:ident: into $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, value: impl Into<$ty>) -> Self {
            self.$field = value.into();
            self
        }
    };
}

impl Config {
    builder!(
        /// `RABBITMQ_URL`, e.g. `amqp://user:pass@host:5672/vhost` or `amqps://…`. An empty
        /// path (`…:5672/`) means the vhost `/`, as in the Python clients. The nodes of a
        /// cluster: several URLs separated by commas; each process starts at a random one
        /// and moves to the next when its connection is lost or refused.
        with_rabbitmq_url, rabbitmq_url: into String);
    builder!(
        /// `RABBITMQ_EXCHANGE`: the exchange the shortener publishes clicks to.
        with_exchange, exchange: into String);
    builder!(
        /// `RABBITMQ_EXCHANGE_TYPE`: declared type of the exchange (default `topic`).
        with_exchange_type, exchange_type: ExchangeType);
    builder!(
        /// `RABBITMQ_QUEUE`: the durable queue the consumer reads.
        with_queue, queue: into String);
    builder!(
        /// `RABBITMQ_QUEUE_TYPE`: `classic` (default) or `quorum`.
        with_queue_type, queue_type: QueueType);
    builder!(
        /// `CLICKHOUSE_HOST`
        with_clickhouse_host, clickhouse_host: into String);
    builder!(
        /// `CLICKHOUSE_PORT`: the HTTP port (8123, or 8443 with TLS).
        with_clickhouse_port, clickhouse_port: u16);
    builder!(
        /// `CLICKHOUSE_DATABASE`: created if missing.
        with_clickhouse_database, clickhouse_database: into String);
    builder!(
        /// `CLICKHOUSE_TABLE`: created if missing, checked against the schema if present.
        with_clickhouse_table, clickhouse_table: into String);
    builder!(
        /// `CLICKHOUSE_USER`
        with_clickhouse_user, clickhouse_user: into String);
    builder!(
        /// `BATCH_SIZE`: rows per INSERT, at most 65,535 (the AMQP prefetch limit).
        with_batch_size, batch_size: usize);
    builder!(
        /// `BATCH_TIMEOUT_MS`: a batch is written at most this long after its first message
        /// (sooner at the end of a backlog: a pause of 50 ms in the deliveries right after
        /// a batch full in rows or bytes, with the queue empty, writes the next one at
        /// once).
        with_batch_timeout, batch_timeout: Duration);
    builder!(
        /// `BATCH_MAX_BYTES`: a batch is also written once it holds this many bytes.
        with_batch_max_bytes, batch_max_bytes: usize);
    builder!(
        /// `MAX_MESSAGE_BYTES`: bodies above this are dead-lettered without being parsed.
        with_max_message_bytes, max_message_bytes: usize);
    builder!(
        /// `SHUTDOWN_TIMEOUT_MS`: how long a shutdown may take to flush and close.
        with_shutdown_timeout, shutdown_timeout: Duration);
    builder!(
        /// `STARTUP_TIMEOUT_MS`: how long start-up waits for RabbitMQ and ClickHouse.
        with_startup_timeout, startup_timeout: Duration);
    builder!(
        /// `RETRY_INITIAL_BACKOFF_MS`: first wait before retrying a failed INSERT or
        /// reconnecting; doubles (with jitter) up to the maximum backoff.
        with_retry_initial_backoff, retry_initial_backoff: Duration);
    builder!(
        /// `RETRY_MAX_BACKOFF_MS`: the longest wait between two attempts.
        with_retry_max_backoff, retry_max_backoff: Duration);
    builder!(
        /// `INSERT_RELEASE_AFTER_MS`: when ClickHouse has failed a batch this long, its
        /// messages are released back to the queue and consumption pauses until
        /// ClickHouse answers again. Keep it below RabbitMQ's `consumer_timeout`.
        with_insert_release_after, insert_release_after: Duration);
    builder!(
        /// `RECONNECT_LIMIT_MS`: how long to keep reconnecting to a lost broker before
        /// [`Consumer::run`](crate::Consumer::run) returns an error.
        with_reconnect_limit, reconnect_limit: Duration);
    builder!(
        /// `STATS_INTERVAL_MS`: interval of the throughput line logged at `info`.
        with_stats_interval, stats_interval: Duration);

    /// `RABBITMQ_ROUTING_KEY`: the binding key of the queue (default: the queue name).
    pub fn with_routing_key(mut self, key: impl Into<String>) -> Self {
        self.routing_key = Some(key.into());
        self
    }

    /// `DEAD_LETTER_QUEUE`: where invalid messages go (default `<queue>.dead-letter`).
    pub fn with_dead_letter_queue(mut self, queue: impl Into<String>) -> Self {
        self.dead_letter_queue = Some(queue.into());
        self
    }

    /// `DEAD_LETTER_ENABLED`: with `false`, invalid messages are rejected without requeue
    /// instead (RabbitMQ drops them, or routes them to the queue's own
    /// `x-dead-letter-exchange` if it has one).
    pub fn with_dead_letter_enabled(mut self, enabled: bool) -> Self {
        self.dead_letter_enabled = enabled;
        self
    }

    /// `RABBITMQ_CA_FILE`: PEM file of the CA that signed the broker's certificate, for
    /// `amqps://` with a private CA (by default the system's trusted roots are used).
    pub fn with_rabbitmq_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.rabbitmq_ca_file = Some(path.into());
        self
    }

    /// The PEM of `RABBITMQ_CA_FILE`, if set.
    pub(crate) fn rabbitmq_ca_pem(&self) -> Result<Option<String>> {
        read_ca("RABBITMQ_CA_FILE", self.rabbitmq_ca_file.as_ref())
    }

    /// `CLICKHOUSE_CA_FILE`: PEM file of the CA that signed ClickHouse's certificate,
    /// for `https://` with a private CA (by default Mozilla's roots, built into the
    /// binary, are trusted).
    pub fn with_clickhouse_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.clickhouse_ca_file = Some(path.into());
        self
    }

    /// The PEM of `CLICKHOUSE_CA_FILE`, if set.
    pub(crate) fn clickhouse_ca_pem(&self) -> Result<Option<String>> {
        read_ca("CLICKHOUSE_CA_FILE", self.clickhouse_ca_file.as_ref())
    }

    /// `CLICKHOUSE_TABLE_ENGINE`: the engine clause of the table created when missing,
    /// e.g. `ReplicatedMergeTree('/clickhouse/tables/{shard}/click_events', '{replica}')`
    /// (default `MergeTree()`). Ignored when the table exists.
    pub fn with_clickhouse_table_engine(mut self, engine: impl Into<String>) -> Self {
        self.clickhouse_table_engine = engine.into();
        self
    }

    /// `CLICKHOUSE_CLUSTER`: create the database and table `ON CLUSTER` this cluster.
    pub fn with_clickhouse_cluster(mut self, cluster: impl Into<String>) -> Self {
        self.clickhouse_cluster = Some(cluster.into());
        self
    }

    /// `CLICKHOUSE_PASSWORD`
    pub fn with_clickhouse_password(mut self, password: impl Into<String>) -> Self {
        self.clickhouse_password = Secret::new(password);
        self
    }

    /// `CLICKHOUSE_URL`: a full URL (`http://host:8123` or `https://host:8443`) that takes
    /// precedence over `CLICKHOUSE_HOST` and `CLICKHOUSE_PORT`. The replicas of a table:
    /// several URLs separated by commas; each process starts at a random one, and an INSERT
    /// that fails on one (connection error, timeout, read-only replica) is sent to the next.
    pub fn with_clickhouse_url(mut self, url: impl Into<String>) -> Self {
        self.clickhouse_url = Some(url.into());
        self
    }

    /// `PREFETCH_COUNT`: unacknowledged messages the broker may send ahead (default: twice
    /// the batch size, capped at 65,535, so that the next batch fills while the previous
    /// one is being written). At least the batch size.
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = Some(prefetch);
        self
    }

    /// `CONSUMER_TAG`: the consumer's name on the broker (default `<hostname>-<pid>`).
    pub fn with_consumer_tag(mut self, tag: impl Into<String>) -> Self {
        self.consumer_tag = Some(tag.into());
        self
    }

    /// The binding key: `RABBITMQ_ROUTING_KEY`, or the queue name.
    pub fn routing_key(&self) -> &str {
        self.routing_key.as_deref().unwrap_or(&self.queue)
    }

    /// The dead-letter queue's name, or `None` when dead-lettering is disabled.
    pub fn dead_letter_queue(&self) -> Option<String> {
        self.dead_letter_enabled.then(|| {
            self.dead_letter_queue
                .clone()
                .unwrap_or_else(|| format!("{}{}", self.queue, defaults::DEAD_LETTER_SUFFIX))
        })
    }

    /// `MAX_INFLIGHT_BYTES`: bytes of the messages received and not yet acknowledged, about
    /// at most (see the README); the prefetch window shrinks for large messages. At least
    /// `MAX_MESSAGE_BYTES`. Default: 64 MiB, or `MAX_MESSAGE_BYTES` if that is larger.
    pub fn with_max_inflight_bytes(mut self, bytes: usize) -> Self {
        self.max_inflight_bytes = Some(bytes);
        self
    }

    /// The in-flight byte budget in effect.
    pub fn max_inflight_bytes(&self) -> usize {
        self.max_inflight_bytes
            .unwrap_or(defaults::MAX_INFLIGHT_BYTES.max(self.max_message_bytes))
    }

    /// Rows per INSERT, at most.
    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// The longest a row waits for its batch to fill.
    pub fn batch_timeout(&self) -> Duration {
        self.batch_timeout
    }

    /// The prefetch count in effect.
    pub fn prefetch(&self) -> u16 {
        self.prefetch
            .unwrap_or_else(|| u16::try_from(self.batch_size.saturating_mul(2)).unwrap_or(u16::MAX))
    }

    /// The ClickHouse HTTP URL in effect.
    pub fn clickhouse_url(&self) -> String {
        self.clickhouse_url
            .clone()
            .unwrap_or_else(|| format!("http://{}:{}", self.clickhouse_host, self.clickhouse_port))
    }

    /// The consumer tag in effect.
    pub fn consumer_tag(&self) -> String {
        self.consumer_tag
            .clone()
            .unwrap_or_else(default_consumer_tag)
    }

    /// The RabbitMQ URL (or list of URLs) with its passwords replaced by `***`, for logs.
    pub fn rabbitmq_url_redacted(&self) -> String {
        redact_list(&self.rabbitmq_url)
    }

    /// Checks every setting at once.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] naming the first refused setting.
    pub fn validate(&self) -> Result<()> {
        crate::broker::nodes(&self.rabbitmq_url)?;
        self.rabbitmq_ca_pem()?;
        self.clickhouse_ca_pem()?;
        non_empty("RABBITMQ_EXCHANGE", &self.exchange)?;
        amqp_name("RABBITMQ_QUEUE", &self.queue)?;
        amqp_name("RABBITMQ_EXCHANGE", &self.exchange)?;
        amqp_name("RABBITMQ_ROUTING_KEY", self.routing_key())?;
        if let Some(dlq) = self.dead_letter_queue() {
            amqp_name("DEAD_LETTER_QUEUE", &dlq)?;
            if dlq == self.queue {
                return Err(Error::setting(
                    "DEAD_LETTER_QUEUE",
                    "must differ from RABBITMQ_QUEUE",
                ));
            }
        }
        identifier("CLICKHOUSE_DATABASE", &self.clickhouse_database)?;
        identifier("CLICKHOUSE_TABLE", &self.clickhouse_table)?;
        if let Some(cluster) = &self.clickhouse_cluster {
            identifier("CLICKHOUSE_CLUSTER", cluster)?;
        }
        table_engine(&self.clickhouse_table_engine)?;
        non_empty("CLICKHOUSE_USER", &self.clickhouse_user)?;
        let setting = if self.clickhouse_url.is_some() {
            "CLICKHOUSE_URL"
        } else {
            "CLICKHOUSE_HOST"
        };
        let urls = self.clickhouse_url();
        let urls = crate::endpoints::split(&urls);
        if urls.is_empty() {
            return Err(Error::setting(setting, "must hold at least one URL"));
        }
        for url in urls {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(Error::setting(
                    setting,
                    format!(
                        "expected an http:// or https:// URL, got `{}`",
                        redact_list(url)
                    ),
                ));
            }
        }
        non_empty("CLICKHOUSE_HOST", &self.clickhouse_host)?;
        if self.clickhouse_port == 0 {
            return Err(Error::setting("CLICKHOUSE_PORT", "must not be 0"));
        }
        if !(1..=usize::from(u16::MAX)).contains(&self.batch_size) {
            return Err(Error::setting(
                "BATCH_SIZE",
                format!("must be between 1 and 65535, got {}", self.batch_size),
            ));
        }
        if usize::from(self.prefetch()) < self.batch_size {
            return Err(Error::setting(
                "PREFETCH_COUNT",
                format!(
                    "must be at least BATCH_SIZE ({}), got {}",
                    self.batch_size,
                    self.prefetch()
                ),
            ));
        }
        positive("BATCH_TIMEOUT_MS", self.batch_timeout)?;
        positive("SHUTDOWN_TIMEOUT_MS", self.shutdown_timeout)?;
        positive("STARTUP_TIMEOUT_MS", self.startup_timeout)?;
        positive("RETRY_INITIAL_BACKOFF_MS", self.retry_initial_backoff)?;
        positive("STATS_INTERVAL_MS", self.stats_interval)?;
        if self.retry_max_backoff < self.retry_initial_backoff {
            return Err(Error::setting(
                "RETRY_MAX_BACKOFF_MS",
                "must be at least RETRY_INITIAL_BACKOFF_MS",
            ));
        }
        if self.batch_max_bytes == 0 {
            return Err(Error::setting("BATCH_MAX_BYTES", "must be at least 1"));
        }
        if self.max_message_bytes == 0 {
            return Err(Error::setting("MAX_MESSAGE_BYTES", "must be at least 1"));
        }
        if self.max_message_bytes as u64 > MAX_BYTES_SETTING {
            return Err(Error::setting(
                "MAX_MESSAGE_BYTES",
                format!("must be at most {MAX_BYTES_SETTING}"),
            ));
        }
        if self.max_inflight_bytes() < self.max_message_bytes {
            return Err(Error::setting(
                "MAX_INFLIGHT_BYTES",
                format!(
                    "must be at least MAX_MESSAGE_BYTES ({}), got {}",
                    self.max_message_bytes,
                    self.max_inflight_bytes()
                ),
            ));
        }
        if self.max_inflight_bytes() as u64 > MAX_BYTES_SETTING {
            return Err(Error::setting(
                "MAX_INFLIGHT_BYTES",
                format!("must be at most {MAX_BYTES_SETTING}"),
            ));
        }
        if let Some(tag) = &self.consumer_tag {
            amqp_name("CONSUMER_TAG", tag)?;
        }
        Ok(())
    }

    /// Reads the configuration from the process environment; unset variables keep their
    /// defaults. See the README for the table of variables.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] when a variable does not parse or does not validate.
    pub fn from_env() -> Result<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Like [`Config::from_env`], reading variables through `lookup`.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] when a variable does not parse or does not validate.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let env = Env(&lookup);
        let mut c = Config::default();
        env.set("RABBITMQ_URL", &mut c.rabbitmq_url);
        c.rabbitmq_ca_file = env.get("RABBITMQ_CA_FILE").map(PathBuf::from);
        env.set("RABBITMQ_EXCHANGE", &mut c.exchange);
        env.parse("RABBITMQ_EXCHANGE_TYPE", &mut c.exchange_type)?;
        env.set("RABBITMQ_QUEUE", &mut c.queue);
        env.parse("RABBITMQ_QUEUE_TYPE", &mut c.queue_type)?;
        c.routing_key = env.get("RABBITMQ_ROUTING_KEY");
        c.dead_letter_queue = env.get("DEAD_LETTER_QUEUE");
        env.parse("DEAD_LETTER_ENABLED", &mut c.dead_letter_enabled)?;
        c.clickhouse_url = env.get("CLICKHOUSE_URL");
        c.clickhouse_ca_file = env.get("CLICKHOUSE_CA_FILE").map(PathBuf::from);
        env.set("CLICKHOUSE_HOST", &mut c.clickhouse_host);
        env.parse("CLICKHOUSE_PORT", &mut c.clickhouse_port)?;
        env.set("CLICKHOUSE_DATABASE", &mut c.clickhouse_database);
        env.set("CLICKHOUSE_TABLE", &mut c.clickhouse_table);
        env.set("CLICKHOUSE_TABLE_ENGINE", &mut c.clickhouse_table_engine);
        c.clickhouse_cluster = env.get("CLICKHOUSE_CLUSTER");
        env.set("CLICKHOUSE_USER", &mut c.clickhouse_user);
        if let Some(password) = env.get("CLICKHOUSE_PASSWORD") {
            c.clickhouse_password = Secret::new(password);
        }
        env.parse("BATCH_SIZE", &mut c.batch_size)?;
        env.millis("BATCH_TIMEOUT_MS", &mut c.batch_timeout)?;
        env.parse("BATCH_MAX_BYTES", &mut c.batch_max_bytes)?;
        if let Some(prefetch) = env.get("PREFETCH_COUNT") {
            c.prefetch = Some(parse("PREFETCH_COUNT", &prefetch)?);
        }
        env.parse("MAX_MESSAGE_BYTES", &mut c.max_message_bytes)?;
        if let Some(bytes) = env.get("MAX_INFLIGHT_BYTES") {
            c.max_inflight_bytes = Some(parse("MAX_INFLIGHT_BYTES", &bytes)?);
        }
        c.consumer_tag = env.get("CONSUMER_TAG");
        env.millis("SHUTDOWN_TIMEOUT_MS", &mut c.shutdown_timeout)?;
        env.millis("STARTUP_TIMEOUT_MS", &mut c.startup_timeout)?;
        env.millis("RETRY_INITIAL_BACKOFF_MS", &mut c.retry_initial_backoff)?;
        env.millis("RETRY_MAX_BACKOFF_MS", &mut c.retry_max_backoff)?;
        env.millis("INSERT_RELEASE_AFTER_MS", &mut c.insert_release_after)?;
        env.millis("RECONNECT_LIMIT_MS", &mut c.reconnect_limit)?;
        env.millis("STATS_INTERVAL_MS", &mut c.stats_interval)?;
        c.validate()?;
        Ok(c)
    }
}

/// Environment lookups that treat an empty value like an unset one (as Compose does
/// for `VAR=`), and name the variable in every error.
struct Env<'a>(&'a dyn Fn(&str) -> Option<String>);

impl Env<'_> {
    fn get(&self, name: &str) -> Option<String> {
        (self.0)(name).filter(|v| !v.trim().is_empty())
    }

    fn set(&self, name: &str, slot: &mut String) {
        if let Some(value) = self.get(name) {
            *slot = value;
        }
    }

    fn parse<T: FromStrSetting>(&self, name: &'static str, slot: &mut T) -> Result<()> {
        if let Some(value) = self.get(name) {
            *slot = T::from_setting(name, &value)?;
        }
        Ok(())
    }

    fn millis(&self, name: &'static str, slot: &mut Duration) -> Result<()> {
        if let Some(value) = self.get(name) {
            *slot = Duration::from_millis(parse(name, &value)?);
        }
        Ok(())
    }
}

/// Parsing of one setting's value, with the setting's name in the error.
pub(crate) trait FromStrSetting: Sized {
    fn from_setting(name: &'static str, value: &str) -> Result<Self>;
}

macro_rules! from_str_setting {
    ($($ty:ty),*) => {$(
        impl FromStrSetting for $ty {
            fn from_setting(name: &'static str, value: &str) -> Result<Self> {
                parse(name, value)
            }
        }
    )*};
}
from_str_setting!(u16, u64, usize);

impl FromStrSetting for bool {
    fn from_setting(name: &'static str, value: &str) -> Result<Self> {
        parse_bool(value)
            .ok_or_else(|| Error::setting(name, format!("expected true or false, got `{value}`")))
    }
}

impl FromStrSetting for ExchangeType {
    fn from_setting(_: &'static str, value: &str) -> Result<Self> {
        value.parse()
    }
}

impl FromStrSetting for QueueType {
    fn from_setting(_: &'static str, value: &str) -> Result<Self> {
        value.parse()
    }
}

/// Reads `true/false`, `1/0`, `yes/no`, `on/off`, any case.
pub fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn parse<T: FromStr>(name: &'static str, value: &str) -> Result<T>
where
    T::Err: fmt::Display,
{
    value
        .trim()
        .parse()
        .map_err(|e| Error::setting(name, format!("`{value}` is not a valid number: {e}")))
}

fn non_empty(name: &'static str, value: &str) -> Result<()> {
    if value.trim().is_empty() {
        return Err(Error::setting(name, "must not be empty"));
    }
    Ok(())
}

fn positive(name: &'static str, value: Duration) -> Result<()> {
    if value.is_zero() {
        return Err(Error::setting(name, "must be greater than 0"));
    }
    Ok(())
}

/// AMQP short strings: 1 to 255 bytes, printable, no control characters.
fn amqp_name(name: &'static str, value: &str) -> Result<()> {
    non_empty(name, value)?;
    if value.len() > 255 || value.chars().any(char::is_control) {
        return Err(Error::setting(
            name,
            format!(
                "`{}` must be at most 255 bytes without control characters",
                value.escape_debug()
            ),
        ));
    }
    Ok(())
}

/// ClickHouse identifiers we put into SQL: `[A-Za-z_][A-Za-z0-9_]*`, at most 64 bytes. No
/// quoting games, so no injection through settings.
pub(crate) fn identifier(name: &'static str, value: &str) -> Result<()> {
    let mut chars = value.chars();
    let valid_start = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !valid_start || value.len() > 64 || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(Error::setting(
            name,
            format!(
                "`{}` is not a valid identifier: use letters, digits and underscores, starting with a letter or underscore, at most 64 characters",
                value.escape_debug()
            ),
        ));
    }
    Ok(())
}

/// Reads a CA file setting: readable, and holding a PEM certificate.
fn read_ca(name: &'static str, path: Option<&PathBuf>) -> Result<Option<String>> {
    let Some(path) = path else {
        return Ok(None);
    };
    let pem = std::fs::read_to_string(path)
        .map_err(|e| Error::setting(name, format!("cannot read {}: {e}", path.display())))?;
    if !pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(Error::setting(
            name,
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(Some(pem))
}

/// An engine clause: a name and optional arguments, no statement separators, comments
/// or quoting tricks (`;`, `--`, `/*`, backticks, backslashes).
fn table_engine(value: &str) -> Result<()> {
    let starts_with_name = value
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic());
    let forbidden = [";", "--", "/*", "`", "\\", "\n", "\r"];
    if !starts_with_name || forbidden.iter().any(|f| value.contains(f)) {
        return Err(Error::setting(
            "CLICKHOUSE_TABLE_ENGINE",
            format!(
                "`{}` is not an engine clause like MergeTree() or ReplicatedMergeTree('/clickhouse/tables/{{shard}}/t', '{{replica}}')",
                value.escape_debug()
            ),
        ));
    }
    Ok(())
}

fn default_consumer_tag() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "click-consumer".to_owned());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<Config> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(|name| map.get(name).cloned())
    }

    fn refused_setting(vars: &[(&str, &str)]) -> &'static str {
        match from(vars) {
            Err(Error::InvalidSetting { setting, .. }) => setting,
            other => panic!("expected an invalid setting for {vars:?}, got {other:?}"),
        }
    }

    #[test]
    fn defaults_match_the_python_service() {
        let c = from(&[]).expect("defaults are valid");
        assert_eq!(c.rabbitmq_url, "amqp://guest:guest@localhost:5672/");
        assert_eq!(c.exchange, "url_shortener");
        assert_eq!(c.exchange_type, ExchangeType::Topic);
        assert_eq!(c.queue, "click_events");
        assert_eq!(c.routing_key(), "click_events");
        assert_eq!(
            c.dead_letter_queue().as_deref(),
            Some("click_events.dead-letter")
        );
        assert_eq!(c.clickhouse_url(), "http://localhost:8123");
        assert_eq!(c.clickhouse_database, "url_shortener");
        assert_eq!(c.clickhouse_table, "click_events");
        assert_eq!(c.clickhouse_user, "default");
        assert_eq!(c.batch_size, defaults::BATCH_SIZE);
        assert_eq!(c.prefetch(), 7_000);
    }

    #[test]
    fn environment_overrides_defaults() {
        let c = from(&[
            ("RABBITMQ_QUEUE", "clicks"),
            ("RABBITMQ_EXCHANGE_TYPE", "DIRECT"),
            ("CLICKHOUSE_HOST", "ch"),
            ("CLICKHOUSE_PORT", "18123"),
            ("BATCH_SIZE", "500"),
            ("BATCH_TIMEOUT_MS", "250"),
            ("DEAD_LETTER_ENABLED", "no"),
            ("PREFETCH_COUNT", "600"),
        ])
        .expect("valid");
        assert_eq!(c.queue, "clicks");
        assert_eq!(c.routing_key(), "clicks");
        assert_eq!(c.exchange_type, ExchangeType::Direct);
        assert_eq!(c.clickhouse_url(), "http://ch:18123");
        assert_eq!(c.batch_size, 500);
        assert_eq!(c.batch_timeout, Duration::from_millis(250));
        assert_eq!(c.dead_letter_queue(), None);
        assert_eq!(c.prefetch(), 600);
    }

    #[test]
    fn empty_variables_keep_defaults() {
        let c = from(&[("RABBITMQ_QUEUE", ""), ("BATCH_SIZE", " ")]).expect("valid");
        assert_eq!(c.queue, "click_events");
        assert_eq!(c.batch_size, defaults::BATCH_SIZE);
    }

    #[test]
    fn bad_values_name_their_setting() {
        assert_eq!(refused_setting(&[("BATCH_SIZE", "0")]), "BATCH_SIZE");
        assert_eq!(refused_setting(&[("BATCH_SIZE", "many")]), "BATCH_SIZE");
        assert_eq!(refused_setting(&[("BATCH_SIZE", "70000")]), "BATCH_SIZE");
        assert_eq!(
            refused_setting(&[("CLICKHOUSE_PORT", "99999")]),
            "CLICKHOUSE_PORT"
        );
        assert_eq!(
            refused_setting(&[("BATCH_TIMEOUT_MS", "0")]),
            "BATCH_TIMEOUT_MS"
        );
        assert_eq!(
            refused_setting(&[("RABBITMQ_EXCHANGE_TYPE", "fan")]),
            "RABBITMQ_EXCHANGE_TYPE"
        );
        assert_eq!(
            refused_setting(&[("BATCH_SIZE", "100"), ("PREFETCH_COUNT", "50")]),
            "PREFETCH_COUNT"
        );
        assert_eq!(
            refused_setting(&[("RABBITMQ_URL", "http://x")]),
            "RABBITMQ_URL"
        );
        assert_eq!(
            refused_setting(&[("DEAD_LETTER_ENABLED", "maybe")]),
            "DEAD_LETTER_ENABLED"
        );
        assert_eq!(
            refused_setting(&[("DEAD_LETTER_QUEUE", "click_events")]),
            "DEAD_LETTER_QUEUE"
        );
        assert_eq!(
            refused_setting(&[("CLICKHOUSE_URL", "ftp://x")]),
            "CLICKHOUSE_URL"
        );
        // The budget must hold at least one message of the largest size allowed.
        assert_eq!(
            refused_setting(&[("MAX_INFLIGHT_BYTES", "1000")]),
            "MAX_INFLIGHT_BYTES"
        );
        assert_eq!(
            refused_setting(&[
                ("MAX_MESSAGE_BYTES", "4096"),
                ("MAX_INFLIGHT_BYTES", "4095")
            ]),
            "MAX_INFLIGHT_BYTES"
        );
    }

    #[test]
    fn table_engine_and_cluster_are_checked() {
        let c = from(&[
            (
                "CLICKHOUSE_TABLE_ENGINE",
                "ReplicatedMergeTree('/clickhouse/tables/{shard}/clicks', '{replica}')",
            ),
            ("CLICKHOUSE_CLUSTER", "analytics"),
        ])
        .expect("valid");
        assert_eq!(c.clickhouse_cluster.as_deref(), Some("analytics"));
        for bad in [
            "MergeTree(); DROP TABLE x",
            "MergeTree() -- x",
            "`x`",
            "(x)",
        ] {
            assert_eq!(
                refused_setting(&[("CLICKHOUSE_TABLE_ENGINE", bad)]),
                "CLICKHOUSE_TABLE_ENGINE",
                "{bad}"
            );
        }
        assert_eq!(
            refused_setting(&[("CLICKHOUSE_CLUSTER", "a b")]),
            "CLICKHOUSE_CLUSTER"
        );
    }

    #[test]
    fn ca_file_must_be_a_readable_pem() {
        assert_eq!(
            refused_setting(&[("RABBITMQ_CA_FILE", "/nonexistent/ca.pem")]),
            "RABBITMQ_CA_FILE"
        );
        assert_eq!(
            refused_setting(&[("RABBITMQ_CA_FILE", "/etc/hostname")]),
            "RABBITMQ_CA_FILE"
        );
    }

    #[test]
    fn sql_identifiers_cannot_inject() {
        for bad in [
            "clicks; DROP TABLE x",
            "a.b",
            "`x`",
            "1abc",
            "click events",
            "ünï",
        ] {
            assert_eq!(
                refused_setting(&[("CLICKHOUSE_TABLE", bad)]),
                "CLICKHOUSE_TABLE",
                "table name {bad:?} must be refused"
            );
            assert_eq!(
                refused_setting(&[("CLICKHOUSE_DATABASE", bad)]),
                "CLICKHOUSE_DATABASE"
            );
        }
        let empty = Config::default().with_clickhouse_table("").validate();
        assert!(
            matches!(
                empty,
                Err(Error::InvalidSetting {
                    setting: "CLICKHOUSE_TABLE",
                    ..
                })
            ),
            "{empty:?}"
        );
        for good in ["click_events", "_t", "Clicks2024"] {
            from(&[("CLICKHOUSE_TABLE", good)]).expect("valid identifier");
        }
    }

    #[test]
    fn debug_hides_passwords() {
        let c = Config::default()
            .with_rabbitmq_url("amqp://app:rabbit-secret@broker:5672/")
            .with_clickhouse_url("https://ch-user:url-secret@ch:8443")
            .with_clickhouse_password("ch-secret");
        let debug = format!("{c:?}");
        for secret in ["rabbit-secret", "url-secret", "ch-secret"] {
            assert!(!debug.contains(secret), "{secret} leaked in {debug}");
        }
        assert!(debug.contains("amqp://app:***@broker:5672/"), "{debug}");
    }

    #[test]
    fn lists_of_urls_are_checked_entry_by_entry() {
        let c = from(&[
            (
                "RABBITMQ_URL",
                "amqp://u:list-secret@r1:5672/,amqp://u:list-secret@r2:5672/",
            ),
            (
                "CLICKHOUSE_URL",
                "http://ch1:8123, https://u:ch-secret@ch2:8443",
            ),
        ])
        .expect("valid lists");
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("list-secret") && !debug.contains("ch-secret"),
            "{debug}"
        );
        assert_eq!(
            c.rabbitmq_url_redacted(),
            "amqp://u:***@r1:5672/,amqp://u:***@r2:5672/"
        );
        for (setting, bad) in [
            (
                "RABBITMQ_URL",
                "amqp://u:list-secret@r1/,amqp://u:list-secret@r2:x/",
            ),
            ("RABBITMQ_URL", ","),
            ("CLICKHOUSE_URL", "http://ch1:8123,ftp://u:list-secret@ch2"),
            ("CLICKHOUSE_URL", " , "),
        ] {
            let err = from(&[(setting, bad)]).expect_err(bad);
            let text = format!("{err} {err:?}");
            assert!(text.contains(setting), "{text}");
            assert!(!text.contains("list-secret"), "{text}");
        }
    }

    #[test]
    fn invalid_url_error_hides_the_password() {
        let err =
            from(&[("RABBITMQ_URL", "amqp://user:s3cret@host:notaport/")]).expect_err("bad port");
        let text = format!("{err} {err:?}");
        assert!(text.contains("RABBITMQ_URL"), "{text}");
        assert!(!text.contains("s3cret"), "{text}");
    }
}
