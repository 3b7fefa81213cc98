//! The consumer: start-up checks, then broker sessions, reconnecting when one is lost,
//! until the caller's shutdown signal.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::commit::{CommitHook, CommitReport};
use crate::config::Config;
use crate::error::{Error, Result};
use crate::metrics::{Metrics, StatsLog, Summary};
use crate::session::{End, OpenError, Session, Shared};
use crate::store::{Severity, Store, severity};

/// Longest a single connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A session that lasted this long resets the reconnect backoff; one that fails sooner
/// (a broker that accepts connections, then drops them) keeps backing off.
const HEALTHY_SESSION: Duration = Duration::from_secs(30);
/// A session lost sooner than this is a broker (or a message) that ends every session at
/// once: the next one waits for the backoff. A longer one reconnects at once, so a node
/// going down costs no waiting.
const FLAPPING_SESSION: Duration = Duration::from_secs(1);

/// Consumers created in this process, to give each a distinct default tag.
static CREATED: AtomicUsize = AtomicUsize::new(0);

/// Moves click events from a RabbitMQ queue into a ClickHouse table.
///
/// Create it with [`Consumer::new`], then drive it with [`Consumer::run`] and a shutdown
/// future you own. Messages are decoded as [`ClickEvent`](crate::ClickEvent)s, written in
/// batches, and acknowledged only after their batch is committed; invalid ones go to the
/// dead-letter queue. Several consumers may run in one process.
///
/// ```no_run
/// use click_consumer::{Config, Consumer};
///
/// # async fn example() -> click_consumer::Result<()> {
/// let consumer = Consumer::new(Config::from_env()?)?;
/// let summary = consumer
///     .run(async { tokio::signal::ctrl_c().await.ok(); })
///     .await?;
/// println!("stored {} rows", summary.stored);
/// # Ok(())
/// # }
/// ```
pub struct Consumer {
    shared: Shared,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("config", &self.shared.config)
            .field("consumer_tag", &self.shared.consumer_tag)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// Validates `config`. Nothing is connected until [`Consumer::run`].
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] naming the first bad setting.
    pub fn new(config: Config) -> Result<Self> {
        config.validate()?;
        let nth = CREATED.fetch_add(1, Ordering::Relaxed);
        let consumer_tag = match (&config.consumer_tag, nth) {
            (Some(tag), _) => tag.clone(),
            (None, 0) => config.consumer_tag(),
            (None, n) => format!("{}-{}", config.consumer_tag(), n + 1),
        };
        let metrics = Arc::new(Metrics::new());
        let store = Store::new(&config)?;
        store.report_to(&metrics.nodes_in_use);
        let brokers = Arc::new(crate::broker::nodes(&config.rabbitmq_url)?);
        brokers.report_to(&metrics.nodes_in_use);
        Ok(Consumer {
            shared: Shared {
                store,
                brokers,
                config: Arc::new(config),
                metrics,
                consumer_tag,
                on_commit: None,
                columns: Arc::default(),
            },
        })
    }

    /// Calls `hook` after every batch that was committed and acknowledged (from the
    /// consumer's own task: keep it short, e.g. send on a channel).
    pub fn on_commit(mut self, hook: impl Fn(&CommitReport) + Send + Sync + 'static) -> Self {
        let hook: CommitHook = Arc::new(hook);
        self.shared.on_commit = Some(hook);
        self
    }

    /// The consumer's live metrics (for a `/metrics` endpoint or a readiness probe).
    pub fn metrics(&self) -> Arc<Metrics> {
        self.shared.metrics.clone()
    }

    /// The consumer tag used on the broker.
    pub fn consumer_tag(&self) -> &str {
        &self.shared.consumer_tag
    }

    /// Runs until `shutdown` completes, then stops taking deliveries, stores and
    /// acknowledges what is buffered, and closes the connection, within
    /// `SHUTDOWN_TIMEOUT_MS`. Whatever is not stored by then stays in RabbitMQ.
    ///
    /// Start-up creates the ClickHouse database and table if missing and declares the
    /// RabbitMQ topology, waiting up to `STARTUP_TIMEOUT_MS` for both servers. After
    /// that, ClickHouse outages and broker restarts are ridden out (retried with backoff).
    ///
    /// # Errors
    /// - [`Error::ClickHouseUnreachable`] / [`Error::BrokerUnreachable`]: a server did
    ///   not answer within the start-up window (or the broker within
    ///   `RECONNECT_LIMIT_MS` after a lost connection).
    /// - [`Error::Topology`]: the exchange or queue exists with other properties.
    /// - [`Error::TableShape`] / [`Error::ClickHouse`]: the table does not fit, or
    ///   ClickHouse refuses us for good (credentials, permissions).
    /// - [`Error::Broker`]: the broker refused us for good (credentials, vhost).
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<Summary> {
        let stop = CancellationToken::new();
        let work = self.work(stop.clone());
        tokio::pin!(work);
        tokio::pin!(shutdown);
        tokio::select! {
            result = &mut work => result,
            () = &mut shutdown => {
                log::info!("shutdown requested: no more deliveries, flushing what is buffered");
                stop.cancel();
                let backstop = self.shared.config.shutdown_timeout + Duration::from_secs(1);
                match tokio::time::timeout(backstop, work).await {
                    Ok(result) => result,
                    Err(_) => {
                        log::warn!("shutdown took longer than {backstop:?}; giving up");
                        Ok(self.shared.metrics.summary())
                    }
                }
            }
        }
    }

    async fn work(&self, stop: CancellationToken) -> Result<Summary> {
        let started = Instant::now();
        self.log_settings();
        if !self.start_clickhouse(&stop, started).await? {
            return Ok(self.finish());
        }
        // Columns added or dropped while running are picked up without a restart.
        let _refresh = AbortOnDrop(tokio::spawn(crate::columns::keep_fresh(
            self.shared.columns.clone(),
            self.shared.store.clone(),
        )));
        let config = &self.shared.config;
        let metrics = &self.shared.metrics;
        let mut stats = StatsLog::new(metrics.clone());
        let mut backoff = Backoff::new(config.retry_initial_backoff, config.retry_max_backoff);
        // Until the first session opens, the start-up window applies; after a loss,
        // the reconnect limit, counted from the loss.
        let mut retrying_since = (started, config.startup_timeout);
        let mut last_end: Option<&'static str> = None;
        loop {
            if stop.is_cancelled() {
                return Ok(self.finish());
            }
            let session = match Session::open(self.shared.clone(), CONNECT_TIMEOUT).await {
                Ok(session) => session,
                Err(OpenError::Fatal(e)) => return Err(e),
                Err(OpenError::Retry(e)) => {
                    let (since, limit) = retrying_since;
                    if since.elapsed() >= limit {
                        return Err(Error::BrokerUnreachable {
                            url: config.rabbitmq_url_redacted(),
                            waited: since.elapsed(),
                            source: e,
                        });
                    }
                    let delay = backoff.next_delay();
                    log::warn!(
                        "cannot connect to RabbitMQ at {}: {e}; retrying in {delay:?}",
                        config.rabbitmq_url_redacted()
                    );
                    if !sleep_or_stop(delay, &stop).await {
                        return Ok(self.finish());
                    }
                    continue;
                }
            };
            match last_end {
                Some("lost") => {
                    metrics.reconnects.inc();
                    log::info!(
                        "reconnected to RabbitMQ node {}; consuming from `{}` again",
                        self.shared.brokers.in_use().1,
                        config.queue
                    );
                }
                Some(_) => log::info!("consuming from `{}` again", config.queue),
                None => {
                    log::info!(
                        "consuming from `{}` on RabbitMQ node {} as `{}` (prefetch up to {}, in-flight bytes up to {}, batches of {} rows or {:?})",
                        config.queue,
                        self.shared.brokers.in_use().1,
                        self.shared.consumer_tag,
                        config.prefetch(),
                        config.max_inflight_bytes(),
                        config.batch_size,
                        config.batch_timeout
                    );
                }
            }
            metrics.set_broker_up(true);
            let opened = Instant::now();
            let end = session.run(&stop, &mut stats).await;
            metrics.set_broker_up(false);
            metrics.unacked.set(0);
            metrics.inflight_bytes.set(0);
            if opened.elapsed() >= HEALTHY_SESSION {
                backoff.reset();
            }
            last_end = Some(match end {
                End::Shutdown => return Ok(self.finish()),
                End::Fatal(e) => return Err(e),
                End::BrokerLost(reason) => {
                    let (lost, _, _) = self.shared.brokers.in_use();
                    self.shared.brokers.advance(lost, &"connection lost");
                    let lasted = opened.elapsed();
                    if lasted < FLAPPING_SESSION {
                        let delay = backoff.next_delay();
                        log::warn!(
                            "lost the RabbitMQ session {lasted:?} after it opened: {reason}; reconnecting in {delay:?}"
                        );
                        if !sleep_or_stop(delay, &stop).await {
                            return Ok(self.finish());
                        }
                    } else {
                        log::warn!("lost the RabbitMQ session: {reason}; reconnecting");
                    }
                    "lost"
                }
                End::Redeclare => {
                    metrics.redeclares.inc();
                    log::warn!("declaring the topology again");
                    "redeclare"
                }
                End::ClickHouseDown => {
                    metrics.clickhouse_pauses.inc();
                    if !self.wait_for_clickhouse(&stop).await {
                        return Ok(self.finish());
                    }
                    "pause"
                }
            });
            // Whatever ended the session, the broker gets RECONNECT_LIMIT_MS from now.
            retrying_since = (Instant::now(), config.reconnect_limit);
        }
    }

    fn finish(&self) -> Summary {
        let summary = self.shared.metrics.summary();
        log::info!(
            "stopped: {} messages received, {} rows stored, {} dead-lettered, {} insert retries",
            summary.received,
            summary.stored,
            summary.dead_lettered,
            summary.insert_retries
        );
        summary
    }

    fn log_settings(&self) {
        let c = &self.shared.config;
        log::info!(
            "starting: RabbitMQ {} exchange `{}` ({}) -> queue `{}` (key `{}`, {:?}), dead letters -> {}; ClickHouse {} table {} as `{}`",
            c.rabbitmq_url_redacted(),
            c.exchange,
            c.exchange_type,
            c.queue,
            c.routing_key(),
            c.queue_type,
            c.dead_letter_queue().map_or(
                "rejected (DEAD_LETTER_ENABLED=false)".to_owned(),
                |q| format!("`{q}`")
            ),
            crate::endpoints::redact_list(&c.clickhouse_url()),
            self.shared.store.qualified_table(),
            c.clickhouse_user,
        );
        log::debug!("configuration: {c:?}");
    }

    /// Waits for ClickHouse within the start-up window, then prepares the table.
    /// `Ok(false)` when stopped meanwhile.
    async fn start_clickhouse(&self, stop: &CancellationToken, started: Instant) -> Result<bool> {
        let config = &self.shared.config;
        let store = &self.shared.store;
        let mut backoff = Backoff::new(config.retry_initial_backoff, config.retry_max_backoff);
        loop {
            match store.version().await {
                Ok(version) => {
                    if let Err(e) = store.ensure_schema().await {
                        // A replica lost between the two calls: retry in the window.
                        match e {
                            Error::ClickHouse { source, .. }
                                if severity(&source) == Severity::Transient
                                    && started.elapsed() < config.startup_timeout =>
                            {
                                let delay = backoff.next_delay();
                                log::warn!(
                                    "cannot prepare the table: {source}; retrying in {delay:?}"
                                );
                                if !sleep_or_stop(delay, stop).await {
                                    return Ok(false);
                                }
                                continue;
                            }
                            other => return Err(other),
                        }
                    }
                    log::info!(
                        "connected to ClickHouse {version} at {} (replica in use: {})",
                        crate::endpoints::redact_list(store.url()),
                        store.replica_in_use()
                    );
                    break;
                }
                Err(e) => {
                    let fatal = severity(&e) == Severity::Fatal;
                    if fatal || started.elapsed() >= config.startup_timeout {
                        return Err(Error::ClickHouseUnreachable {
                            url: crate::endpoints::redact_list(store.url()),
                            waited: started.elapsed(),
                            source: e,
                        });
                    }
                    let delay = backoff.next_delay();
                    log::warn!("cannot reach ClickHouse: {e}; retrying in {delay:?}");
                    if !sleep_or_stop(delay, stop).await {
                        return Ok(false);
                    }
                }
            }
        }
        self.shared.columns.refresh(store).await?;
        self.shared.metrics.set_clickhouse_up(true);
        log::info!("table {} is ready", store.qualified_table());
        Ok(true)
    }

    /// After a release: probes ClickHouse with a write (see `Store::write_probe`), with
    /// backoff, until it succeeds. `false` when stopped meanwhile.
    async fn wait_for_clickhouse(&self, stop: &CancellationToken) -> bool {
        let config = &self.shared.config;
        let mut backoff = Backoff::new(config.retry_initial_backoff, config.retry_max_backoff);
        log::warn!("consumption paused until ClickHouse answers again");
        loop {
            let delay = backoff.next_delay();
            if !sleep_or_stop(delay, stop).await {
                return false;
            }
            match self.shared.store.write_probe().await {
                Ok(()) => {
                    log::info!("ClickHouse takes writes again: resuming consumption");
                    self.shared.metrics.set_clickhouse_up(true);
                    return true;
                }
                Err(e) => log::warn!("ClickHouse still failing: {e}"),
            }
        }
    }
}

/// Aborts a background task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `false` if `stop` fired first.
async fn sleep_or_stop(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        () = stop.cancelled() => false,
        () = tokio::time::sleep(delay) => true,
    }
}
