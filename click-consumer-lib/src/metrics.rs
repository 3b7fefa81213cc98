//! Counters and gauges of one consumer, in Prometheus form, and the summary it returns.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
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

/// Live metrics of a [`Consumer`](crate::Consumer). Cheap to share (`Arc`); every field
/// is updated as the consumer works.
///
/// [`Metrics::encode`] renders them in the Prometheus/OpenMetrics text format under the
/// `click_consumer_` prefix; [`Metrics::is_ready`] is what a readiness probe wants.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub(crate) received: Counter,
    pub(crate) redelivered: Counter,
    pub(crate) rows_inserted: Counter,
    pub(crate) dead_lettered: Family<ReasonLabel, Counter>,
    pub(crate) inserts: Counter,
    pub(crate) insert_retries: Counter,
    pub(crate) released: Counter,
    pub(crate) reconnects: Counter,
    pub(crate) duplicate_risk: Counter,
    pub(crate) batch_rows: Histogram,
    pub(crate) insert_seconds: Histogram,
    pub(crate) unacked: Gauge,
    pub(crate) queue_depth: Gauge,
    pub(crate) last_insert: Gauge<f64, AtomicU64>,
    pub(crate) nodes_in_use: crate::endpoints::NodeGauge,
    broker_up: AtomicBool,
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
            redelivered: Counter::default(),
            rows_inserted: Counter::default(),
            dead_lettered: Family::default(),
            inserts: Counter::default(),
            insert_retries: Counter::default(),
            released: Counter::default(),
            reconnects: Counter::default(),
            duplicate_risk: Counter::default(),
            batch_rows: Histogram::new(exponential_buckets(1.0, 4.0, 9)),
            insert_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            unacked: Gauge::default(),
            queue_depth: Gauge::default(),
            last_insert: Gauge::default(),
            nodes_in_use: Default::default(),
            broker_up: AtomicBool::new(false),
            clickhouse_up: AtomicBool::new(false),
        };
        m.register();
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
            "Reconnections to RabbitMQ after a lost connection",
            self.reconnects.clone(),
        );
        r.register(
            "unconfirmed_batches",
            "Batches stored whose acknowledgement was lost: they come back as duplicates",
            self.duplicate_risk.clone(),
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
    }

    pub(crate) fn set_clickhouse_up(&self, up: bool) {
        self.clickhouse_up.store(up, Ordering::Relaxed);
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
    last_at: Instant,
}

impl StatsLog {
    pub(crate) fn new(metrics: Arc<Metrics>) -> Self {
        StatsLog {
            last: metrics.summary(),
            metrics,
            last_at: Instant::now(),
        }
    }

    pub(crate) fn log(&mut self) {
        let now = self.metrics.summary();
        let secs = self.last_at.elapsed().as_secs_f64().max(0.001);
        log::info!(
            "throughput: {:.0} msg/s received, {:.0} rows/s stored ({} messages, {} rows, {} dead-lettered, {} insert retries in the last {:.0}s; {} unacked, queue depth {})",
            (now.received - self.last.received) as f64 / secs,
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
        self.last_at = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_uses_prometheus_names() {
        let m = Metrics::new();
        m.received.inc_by(3);
        m.dead_lettered(InvalidKind::NotJson);
        m.inserted(2, Duration::from_millis(5));
        let text = m.encode();
        for line in [
            "click_consumer_messages_received_total 3",
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
