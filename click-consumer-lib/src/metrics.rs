//! Counters and gauges of one consumer, in Prometheus form, and the summary it returns.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::event::InvalidKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// The states of the broker connection, as the `state` label of
/// `click_consumer_broker_connection_state` (exactly one is 1).
const BROKER_STATES: [&str; 3] = ["connected", "blocked", "reconnecting"];

/// Live metrics of a [`Consumer`](crate::Consumer). Cheap to share (`Arc`); every field
/// is updated as the consumer works.
///
/// [`Metrics::encode`] renders them in the Prometheus/OpenMetrics text format under the
/// `click_consumer_` prefix; [`Metrics::is_ready`] is what a readiness probe wants.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub(crate) received: Counter,
    pub(crate) received_bytes: Counter,
    pub(crate) redelivered: Counter,
    pub(crate) rows_inserted: Counter,
    pub(crate) dead_lettered: Family<ReasonLabel, Counter>,
    pub(crate) inserts: Counter,
    pub(crate) insert_retries: Counter,
    pub(crate) released: Counter,
    pub(crate) reconnects: Counter,
    pub(crate) clickhouse_pauses: Counter,
    pub(crate) redeclares: Counter,
    pub(crate) duplicate_risk: Counter,
    pub(crate) dead_letter_retries: Counter,
    pub(crate) dead_letters_refused: Counter,
    pub(crate) insert_retries_not_deduplicated: Counter,
    pub(crate) end_to_end_seconds: Histogram,
    broker_state: Family<StateLabel, Gauge>,
    ready: Gauge,
    pub(crate) batch_rows: Histogram,
    pub(crate) insert_seconds: Histogram,
    pub(crate) unacked: Gauge,
    pub(crate) inflight_bytes: Gauge,
    pub(crate) prefetch_window: Gauge,
    pub(crate) window_changes: Counter,
    pub(crate) queue_depth: Gauge,
    pub(crate) last_insert: Gauge<f64, AtomicU64>,
    pub(crate) nodes_in_use: crate::endpoints::NodeGauge,
    broker_up: AtomicBool,
    /// Dead-letter connections blocked by the broker now (an old one may still be
    /// closing while its successor is blocked).
    broker_blocked: AtomicUsize,
    clickhouse_up: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh set of metrics, registered under the `click_consumer` prefix.
    pub fn new() -> Self {
        let mut m = Metrics {
            registry: Registry::with_prefix("click_consumer"),
            received: Counter::default(),
            received_bytes: Counter::default(),
            redelivered: Counter::default(),
            rows_inserted: Counter::default(),
            dead_lettered: Family::default(),
            inserts: Counter::default(),
            insert_retries: Counter::default(),
            released: Counter::default(),
            reconnects: Counter::default(),
            clickhouse_pauses: Counter::default(),
            redeclares: Counter::default(),
            duplicate_risk: Counter::default(),
            dead_letter_retries: Counter::default(),
            dead_letters_refused: Counter::default(),
            insert_retries_not_deduplicated: Counter::default(),
            end_to_end_seconds: Histogram::new([
                0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
            ]),
            broker_state: Family::default(),
            ready: Gauge::default(),
            batch_rows: Histogram::new(exponential_buckets(1.0, 4.0, 9)),
            insert_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            unacked: Gauge::default(),
            inflight_bytes: Gauge::default(),
            prefetch_window: Gauge::default(),
            window_changes: Counter::default(),
            queue_depth: Gauge::default(),
            last_insert: Gauge::default(),
            nodes_in_use: Default::default(),
            broker_up: AtomicBool::new(false),
            broker_blocked: AtomicUsize::new(0),
            clickhouse_up: AtomicBool::new(false),
        };
        m.register();
        m.set_broker_state();
        m
    }

    fn register(&mut self) {
        let r = &mut self.registry;
        r.register(
            "messages_received",
            "Messages delivered by RabbitMQ",
            self.received.clone(),
        );
        r.register(
            "message_bytes_received",
            "Bytes of message bodies delivered by RabbitMQ",
            self.received_bytes.clone(),
        );
        r.register(
            "messages_redelivered",
            "Deliveries flagged as redelivered (possibly stored before a fault)",
            self.redelivered.clone(),
        );
        r.register(
            "rows_inserted",
            "Rows committed to ClickHouse",
            self.rows_inserted.clone(),
        );
        r.register(
            "messages_dead_lettered",
            "Messages sent to the dead-letter queue (or rejected), by reason",
            self.dead_lettered.clone(),
        );
        r.register(
            "inserts",
            "Successful INSERT statements",
            self.inserts.clone(),
        );
        r.register(
            "insert_retries",
            "Failed INSERT attempts that were retried",
            self.insert_retries.clone(),
        );
        r.register(
            "messages_released",
            "Messages handed back to the queue after ClickHouse failed for INSERT_RELEASE_AFTER_MS",
            self.released.clone(),
        );
        r.register(
            "broker_reconnects",
            "Reconnections to RabbitMQ after a lost connection (not pauses or redeclarations)",
            self.reconnects.clone(),
        );
        r.register(
            "clickhouse_pauses",
            "Pauses of consumption after a batch was released during a ClickHouse outage",
            self.clickhouse_pauses.clone(),
        );
        r.register(
            "topology_redeclarations",
            "New sessions opened to declare the topology again (dead-letter queue gone)",
            self.redeclares.clone(),
        );
        r.register(
            "unconfirmed_batches",
            "Batches stored whose acknowledgement failed or was abandoned: they come back as duplicates",
            self.duplicate_risk.clone(),
        );
        r.register(
            "dead_letter_retries",
            "Dead-letter copies published again after their confirm was lost or timed out",
            self.dead_letter_retries.clone(),
        );
        r.register(
            "dead_letters_refused",
            "Dead-letter copies returned or refused by RabbitMQ (originals requeued)",
            self.dead_letters_refused.clone(),
        );
        r.register(
            "insert_retries_not_deduplicated",
            "INSERTs that succeeded after an attempt that may have been committed, into a table that does not deduplicate retries",
            self.insert_retries_not_deduplicated.clone(),
        );
        r.register(
            "end_to_end_latency_seconds",
            "Time from publish (AMQP timestamp) or, without one, from the event's timestamp to the commit of its row",
            self.end_to_end_seconds.clone(),
        );
        r.register(
            "ready",
            "1 when connected to RabbitMQ and ClickHouse and not backing off (what /ready answers 200 for), else 0",
            self.ready.clone(),
        );
        r.register(
            "broker_connection_state",
            "State of the RabbitMQ connection: connected, blocked (resource alarm) or reconnecting; 1 for the current state",
            self.broker_state.clone(),
        );
        r.register("batch_rows", "Rows per INSERT", self.batch_rows.clone());
        r.register(
            "node_in_use",
            "1 for the RabbitMQ node and the ClickHouse replica in use, 0 for the other listed ones",
            self.nodes_in_use.clone(),
        );
        r.register(
            "insert_duration_seconds",
            "Duration of successful INSERTs",
            self.insert_seconds.clone(),
        );
        r.register(
            "messages_unacked",
            "Messages received and not yet acknowledged",
            self.unacked.clone(),
        );
        r.register(
            "inflight_bytes",
            "Bytes of the messages received and not yet acknowledged (bounded by MAX_INFLIGHT_BYTES)",
            self.inflight_bytes.clone(),
        );
        r.register(
            "prefetch_window",
            "Prefetch count of the current consumer: PREFETCH_COUNT, or less while messages are large",
            self.prefetch_window.clone(),
        );
        r.register(
            "prefetch_window_changes",
            "Times the consumer was restarted with another prefetch window (message sizes changed)",
            self.window_changes.clone(),
        );
        r.register(
            "queue_depth",
            "Ready messages in the queue when last looked at",
            self.queue_depth.clone(),
        );
        r.register(
            "last_insert_timestamp_seconds",
            "Unix time of the last successful INSERT",
            self.last_insert.clone(),
        );
        for kind in InvalidKind::ALL {
            let _ = self.dead_lettered.get_or_create(&ReasonLabel {
                reason: kind.as_str(),
            });
        }
    }

    /// The metrics in the OpenMetrics text format (which Prometheus reads); serve it with
    /// the content type [`Metrics::CONTENT_TYPE`].
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }

    /// The content type of [`Metrics::encode`]'s output.
    pub const CONTENT_TYPE: &'static str =
        "application/openmetrics-text; version=1.0.0; charset=utf-8";

    /// Connected to both RabbitMQ and ClickHouse, consuming, not backing off.
    pub fn is_ready(&self) -> bool {
        self.broker_up.load(Ordering::Relaxed) && self.clickhouse_up.load(Ordering::Relaxed)
    }

    pub(crate) fn set_broker_up(&self, up: bool) {
        self.broker_up.store(up, Ordering::Relaxed);
        self.set_broker_state();
    }

    /// The dead-letter connection was blocked (resource alarm) or unblocked.
    /// A dead-letter connection was blocked (resource alarm), or its block ended
    /// (unblocked, or the connection closed); each call with `false` undoes one `true`.
    pub(crate) fn set_broker_blocked(&self, blocked: bool) {
        if blocked {
            self.broker_blocked.fetch_add(1, Ordering::Relaxed);
        } else {
            let _ = self
                .broker_blocked
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
        self.set_broker_state();
    }

    pub(crate) fn broker_blocked(&self) -> bool {
        self.broker_blocked.load(Ordering::Relaxed) > 0
    }

    fn set_broker_state(&self) {
        self.ready.set(i64::from(self.is_ready()));
        let state = match (
            self.broker_up.load(Ordering::Relaxed),
            self.broker_blocked(),
        ) {
            (false, _) => "reconnecting",
            (true, true) => "blocked",
            (true, false) => "connected",
        };
        for name in BROKER_STATES {
            self.broker_state
                .get_or_create(&StateLabel { state: name })
                .set(i64::from(name == state));
        }
    }

    pub(crate) fn set_clickhouse_up(&self, up: bool) {
        self.clickhouse_up.store(up, Ordering::Relaxed);
        self.ready.set(i64::from(self.is_ready()));
    }

    pub(crate) fn dead_lettered(&self, kind: InvalidKind) {
        self.dead_lettered
            .get_or_create(&ReasonLabel {
                reason: kind.as_str(),
            })
            .inc();
    }

    pub(crate) fn inserted(&self, rows: usize, took: Duration) {
        self.rows_inserted.inc_by(rows as u64);
        self.inserts.inc();
        self.batch_rows.observe(rows as f64);
        self.insert_seconds.observe(took.as_secs_f64());
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.last_insert.set(now.as_secs_f64());
    }

    fn dead_lettered_total(&self) -> u64 {
        InvalidKind::ALL
            .iter()
            .map(|kind| {
                self.dead_lettered
                    .get_or_create(&ReasonLabel {
                        reason: kind.as_str(),
                    })
                    .get()
            })
            .sum()
    }

    /// A snapshot of the counters.
    pub fn summary(&self) -> Summary {
        Summary {
            received: self.received.get(),
            stored: self.rows_inserted.get(),
            dead_lettered: self.dead_lettered_total(),
            insert_retries: self.insert_retries.get(),
            inserts: self.inserts.get(),
            released: self.released.get(),
            redelivered: self.redelivered.get(),
            reconnects: self.reconnects.get(),
        }
    }
}

/// What a consumer did, returned by [`Consumer::run`](crate::Consumer::run) and available
/// any time from [`Metrics::summary`]. Counts are since the consumer was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Summary {
    /// Messages delivered (including redeliveries).
    pub received: u64,
    /// Rows committed to ClickHouse.
    pub stored: u64,
    /// Messages dead-lettered (or rejected when dead-lettering is off).
    pub dead_lettered: u64,
    /// INSERT attempts that failed and were retried.
    pub insert_retries: u64,
    /// Successful INSERT statements.
    pub inserts: u64,
    /// Messages released back to the queue during a long ClickHouse outage.
    pub released: u64,
    /// Deliveries flagged as redelivered by the broker.
    pub redelivered: u64,
    /// Reconnections to RabbitMQ.
    pub reconnects: u64,
}

/// Logs a throughput line at `info` every stats interval.
#[derive(Debug)]
pub(crate) struct StatsLog {
    metrics: Arc<Metrics>,
    last: Summary,
    last_bytes: u64,
    last_at: Instant,
}

impl StatsLog {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        StatsLog {
            last: metrics.summary(),
            last_bytes: metrics.received_bytes.get(),
            metrics,
            last_at: Instant::now(),
        }
    }

    pub(crate) fn log(&mut self) {
        let now = self.metrics.summary();
        let bytes = self.metrics.received_bytes.get();
        let secs = self.last_at.elapsed().as_secs_f64().max(0.001);
        log::info!(
            "throughput: {:.0} msg/s ({}/s) received, {:.0} rows/s stored ({} messages, {} rows, {} dead-lettered, {} insert retries in the last {:.0}s; {} unacked, queue depth {})",
            (now.received - self.last.received) as f64 / secs,
            human_bytes((bytes - self.last_bytes) as f64 / secs),
            (now.stored - self.last.stored) as f64 / secs,
            now.received - self.last.received,
            now.stored - self.last.stored,
            now.dead_lettered - self.last.dead_lettered,
            now.insert_retries - self.last.insert_retries,
            secs,
            self.metrics.unacked.get(),
            self.metrics.queue_depth.get(),
        );
        self.last = now;
        self.last_bytes = bytes;
        self.last_at = Instant::now();
    }
}

/// `1536.0` as `1.5 KB`: decimal units, as bytes/s are usually read.
fn human_bytes(bytes: f64) -> String {
    match bytes {
        b if b >= 1e9 => format!("{:.1} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        b => format!("{b:.0} B"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_rates_read_well() {
        assert_eq!(human_bytes(0.0), "0 B");
        assert_eq!(human_bytes(950.0), "950 B");
        assert_eq!(human_bytes(1_536.0), "1.5 kB");
        assert_eq!(human_bytes(48_200_000.0), "48.2 MB");
        assert_eq!(human_bytes(2.5e9), "2.5 GB");
    }

    #[test]
    fn a_closing_connection_does_not_unblock_its_blocked_successor() {
        let m = Metrics::new();
        m.set_broker_up(true);
        m.set_broker_blocked(true); // the old dead-letter connection
        m.set_broker_blocked(true); // its successor, blocked too
        m.set_broker_blocked(false); // the old one closes
        assert!(m.broker_blocked(), "the successor is still blocked");
        assert!(
            m.encode()
                .contains("click_consumer_broker_connection_state{state=\"blocked\"} 1")
        );
        m.set_broker_blocked(false);
        m.set_broker_blocked(false); // one undo too many is ignored
        assert!(!m.broker_blocked());
        m.set_broker_blocked(true);
        assert!(m.broker_blocked());
    }

    #[test]
    fn exposition_uses_prometheus_names() {
        let m = Metrics::new();
        m.received.inc_by(3);
        m.received_bytes.inc_by(900);
        m.dead_lettered(InvalidKind::NotJson);
        m.inserted(2, Duration::from_millis(5));
        let text = m.encode();
        for line in [
            "click_consumer_messages_received_total 3",
            "click_consumer_message_bytes_received_total 900",
            "click_consumer_rows_inserted_total 2",
            "click_consumer_inserts_total 1",
            "click_consumer_messages_dead_lettered_total{reason=\"not_json\"} 1",
            "click_consumer_messages_dead_lettered_total{reason=\"too_large\"} 0",
            "click_consumer_insert_duration_seconds_count 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        let s = m.summary();
        assert_eq!(
            (s.received, s.stored, s.dead_lettered, s.inserts),
            (3, 2, 1, 1)
        );
    }
}
