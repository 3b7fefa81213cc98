//! Helpers shared by the integration tests.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use click_consumer::{ClickEvent, ClickPublisher, Config, Consumer, Summary};
use click_consumer_testkit::{Servers, shared, unique_name};
use lapin::{
    Connection, ConnectionProperties,
    options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions},
    types::{AMQPValue, FieldTable},
};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A test's own names on the shared servers.
pub(crate) struct Names {
    pub(crate) exchange: String,
    pub(crate) queue: String,
    pub(crate) database: String,
}

impl Names {
    pub(crate) fn new(test: &str) -> Self {
        Names {
            exchange: unique_name(&format!("{test}_ex")),
            queue: unique_name(&format!("{test}_q")),
            database: unique_name(&format!("{test}_db")),
        }
    }

    pub(crate) fn dead_letter_queue(&self) -> String {
        format!("{}.dead-letter", self.queue)
    }

    pub(crate) fn table(&self) -> String {
        format!("{}.click_events", self.database)
    }
}

pub(crate) fn servers() -> &'static Servers {
    shared()
}

/// A configuration for `names` on the shared servers, with small, fast batches.
pub(crate) fn config(names: &Names) -> Config {
    let servers = servers();
    Config::default()
        .with_rabbitmq_url(servers.rabbitmq.amqp_url())
        .with_exchange(&names.exchange)
        .with_queue(&names.queue)
        .with_clickhouse_url(servers.clickhouse.url())
        .with_clickhouse_database(&names.database)
        .with_batch_size(500)
        .with_batch_timeout(Duration::from_millis(100))
        .with_retry_initial_backoff(Duration::from_millis(50))
        .with_retry_max_backoff(Duration::from_millis(500))
        .with_stats_interval(Duration::from_secs(1))
}

/// A consumer running in the background until [`Running::stop`].
pub(crate) struct Running {
    stop: CancellationToken,
    task: JoinHandle<click_consumer::Result<Summary>>,
}

/// Starts `consumer` in the background and waits until it is ready (its topology is
/// declared and it consumes), so that the test's publisher does not declare the same
/// binding at the same moment: RabbitMQ 4.0 can then confirm the publisher's
/// `queue.bind` before the binding routes, and the first click comes back NO_ROUTE
/// (topic exchanges only; measured 2 in 30 with 4.0.5, never with 3.10; see the README).
pub(crate) async fn start(consumer: Consumer) -> Running {
    let metrics = consumer.metrics();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move { consumer.run(token.cancelled_owned()).await });
    wait_until("the consumer is ready", Duration::from_secs(30), || async {
        metrics.is_ready() || task.is_finished()
    })
    .await;
    Running { stop, task }
}

impl Running {
    /// Whether the consumer has returned already (it gave up, or failed).
    pub(crate) fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Signals shutdown and returns the consumer's result.
    pub(crate) async fn stop(self) -> click_consumer::Result<Summary> {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.task)
            .await
            .expect("the consumer stops within 20 s of its shutdown signal")
            .expect("the consumer task does not panic")
    }
}

/// Runs `action` on a private server off the async threads (stopping or restarting one
/// blocks for a while) and hands the server back.
pub(crate) async fn blocking<S: Send + 'static>(
    server: S,
    action: impl FnOnce(&S) + Send + 'static,
) -> S {
    tokio::task::spawn_blocking(move || {
        action(&server);
        server
    })
    .await
    .expect("the server thread does not panic")
}

/// Waits until `check` returns true, failing the test with `what` after `limit`.
pub(crate) async fn wait_until<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let started = Instant::now();
    while !check().await {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Runs a query on the shared ClickHouse (off the async threads) and returns its output.
pub(crate) async fn query(sql: String) -> String {
    tokio::task::spawn_blocking(move || servers().clickhouse.query(&sql))
        .await
        .expect("query thread")
}

/// `SELECT count()` of the test's table.
pub(crate) async fn row_count(names: &Names) -> u64 {
    let out = query(format!("SELECT count() FROM {}", names.table())).await;
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("count() returned {out:?}"))
}

/// Whether the test's table exists (the consumer creates it at start-up).
pub(crate) async fn table_exists(names: &Names) -> bool {
    let out = query(format!(
        "SELECT count() FROM system.tables WHERE database = '{}' AND name = 'click_events'",
        names.database
    ))
    .await;
    out.trim() == "1"
}

/// Waits until the table exists and holds `n` rows.
pub(crate) async fn wait_for_rows(names: &Names, n: u64) {
    wait_until(
        &format!("{n} rows in {}", names.table()),
        Duration::from_secs(30),
        || async { table_exists(names).await && row_count(names).await >= n },
    )
    .await;
}

/// A valid event with a distinct short code.
pub(crate) fn event(i: usize) -> ClickEvent {
    ClickEvent::new(format!("code{i:05}"), "2024-01-15T10:30:00Z")
        .with_user_agent(format!("agent/{i}"))
        .with_ip_address(format!("198.51.100.{}", i % 250))
        .with_referrer("https://ref.example/")
        .with_original_url(format!("https://example.com/{i}"))
}

pub(crate) async fn publisher(config: &Config) -> ClickPublisher {
    ClickPublisher::connect(config)
        .await
        .expect("publisher connects")
}

/// A message taken from a queue.
#[derive(Debug)]
pub(crate) struct Taken {
    pub(crate) body: Vec<u8>,
    pub(crate) headers: FieldTable,
    pub(crate) properties: lapin::BasicProperties,
}

impl Taken {
    pub(crate) fn header(&self, name: &str) -> Option<String> {
        match self.headers.inner().get(name) {
            Some(AMQPValue::LongString(s)) => Some(s.to_string()),
            Some(other) => Some(format!("{other:?}")),
            None => None,
        }
    }
}

/// A test's own connection to the shared RabbitMQ.
pub(crate) async fn connect() -> Connection {
    Connection::connect(
        &servers().rabbitmq.amqp_url(),
        ConnectionProperties::default(),
    )
    .await
    .expect("test connection to RabbitMQ")
}

/// Takes (and acks) every message in `queue`.
pub(crate) async fn drain(queue: &str) -> Vec<Taken> {
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let mut taken = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions::default())
        .await
        .expect("basic.get")
    {
        let delivery = message.delivery;
        delivery.ack(BasicAckOptions::default()).await.expect("ack");
        taken.push(Taken {
            body: delivery.data.clone(),
            headers: delivery.properties.headers().clone().unwrap_or_default(),
            properties: delivery.properties.clone(),
        });
    }
    let _ = connection.close(200, "done".into()).await;
    taken
}

/// `(ready, unacknowledged)` messages of `queue`, from the broker's own bookkeeping.
pub(crate) async fn queue_counts(queue: &str) -> (u64, u64) {
    let queue = queue.to_owned();
    tokio::task::spawn_blocking(move || servers().rabbitmq.queue_counts(&queue))
        .await
        .expect("rabbitmqctl thread")
        .expect("the queue exists")
}

/// Whether `queue` exists (passive declare on a throwaway channel).
pub(crate) async fn queue_exists(queue: &str) -> bool {
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("channel");
    let exists = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .is_ok();
    let _ = connection.close(200, "done".into()).await;
    exists
}
