//! Lists of addresses (`RABBITMQ_URL`, `CLICKHOUSE_URL`): a stopped node is left for the
//! next one in the list, and nothing is lost on the way.

use std::time::Duration;

use click_consumer::{ClickEvent, Consumer, Metrics};
use click_consumer_testkit::{ClickHouse, RabbitMq};

use crate::common::*;

/// The node that `click_consumer_node_in_use` marks with 1 for `service`.
fn node_in_use(metrics: &Metrics, service: &str) -> Option<String> {
    let prefix = format!("click_consumer_node_in_use{{service=\"{service}\",node=\"");
    metrics.encode().lines().find_map(|line| {
        let rest = line.strip_prefix(&prefix)?;
        let (node, value) = rest.split_once("\"} ")?;
        (value.trim() == "1").then(|| node.to_owned())
    })
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

#[tokio::test]
async fn a_stopped_broker_is_left_for_the_next_in_the_list() {
    let (first, second) = blocking(|| {
        std::thread::scope(|s| {
            let a = s.spawn(RabbitMq::start);
            let b = s.spawn(RabbitMq::start);
            (a.join().unwrap(), b.join().unwrap())
        })
    })
    .await;
    let names = Names::new("broker_list");
    let list = format!("{},{}", first.amqp_url(), second.amqp_url());
    let first = blocking(move || {
        first.stop();
        first
    })
    .await;
    let config = config(&names)
        .with_rabbitmq_url(&list)
        .with_reconnect_limit(Duration::from_secs(60));
    let consumer = Consumer::new(config.clone()).unwrap();
    let metrics = consumer.metrics();
    let running = start(consumer).await;
    wait_until(
        "the consumer on the second broker",
        Duration::from_secs(30),
        || async { metrics.is_ready() },
    )
    .await;
    let second_node = format!("127.0.0.1:{}", second.port());
    assert_eq!(
        node_in_use(&metrics, "RabbitMQ").as_deref(),
        Some(second_node.as_str())
    );
    let events: Vec<ClickEvent> = (0..2000).map(event).collect();
    let on_second = publisher(&config.clone().with_rabbitmq_url(second.amqp_url())).await;
    on_second.publish_all(&events[..1000]).await.unwrap();
    on_second.close().await.unwrap();
    wait_for_rows(&names, 1000).await;

    // The node in use goes away: the consumer moves on to the first one, back up now.
    let (first, second) = blocking(move || {
        first.restart();
        second.stop();
        (first, second)
    })
    .await;
    let first_node = format!("127.0.0.1:{}", first.port());
    wait_until(
        "the consumer on the first broker",
        Duration::from_secs(30),
        || async {
            metrics.is_ready() && node_in_use(&metrics, "RabbitMQ").as_deref() == Some(&first_node)
        },
    )
    .await;
    let on_first = publisher(&config.clone().with_rabbitmq_url(first.amqp_url())).await;
    on_first.publish_all(&events[1000..]).await.unwrap();
    on_first.close().await.unwrap();
    wait_for_rows(&names, 2000).await;
    let summary = running.stop().await.unwrap();
    assert_eq!(summary.stored, 2000, "{summary:?}");
    assert!(summary.reconnects >= 1, "{summary:?}");
    let distinct = query(format!(
        "SELECT uniqExact(short_code), count() FROM {}",
        names.table()
    ))
    .await;
    assert_eq!(distinct.trim(), "2000\t2000", "every event once");
    drop(second);
}

#[tokio::test]
async fn inserts_move_to_the_next_replica_when_one_stops() {
    let (a, b) = blocking(|| {
        std::thread::scope(|s| {
            let a = s.spawn(ClickHouse::start);
            let b = s.spawn(ClickHouse::start);
            (a.join().unwrap(), b.join().unwrap())
        })
    })
    .await;
    let names = Names::new("ch_list");
    // Two independent servers stand for two replicas: the table exists on both (as
    // `ON CLUSTER` makes it on a real cluster); rows land where the INSERT went.
    let ddl = [
        format!("CREATE DATABASE {}", names.database),
        format!(
            "CREATE TABLE {} (short_code String, timestamp DateTime, user_agent String, ip_address String, referrer String, original_url String) ENGINE = MergeTree() ORDER BY (short_code, timestamp)",
            names.table()
        ),
    ];
    let (a, b) = blocking(move || {
        for sql in &ddl {
            a.query(sql);
            b.query(sql);
        }
        (a, b)
    })
    .await;
    let config = config(&names).with_clickhouse_url(format!("{}, {}", a.url(), b.url()));
    let consumer = Consumer::new(config.clone()).unwrap();
    let metrics = consumer.metrics();
    let running = start(consumer).await;
    let publisher = publisher(&config).await;
    let events: Vec<ClickEvent> = (0..4000).map(event).collect();
    publisher.publish_all(&events[..1000]).await.unwrap();
    wait_until("the first rows", Duration::from_secs(30), || async {
        metrics.summary().stored >= 1000
    })
    .await;
    let in_use = node_in_use(&metrics, "ClickHouse").expect("a replica in use");
    let a_node = format!("127.0.0.1:{}", a.http_port());
    let (stopped, other) = if in_use == a_node { (a, b) } else { (b, a) };
    let other_node = format!("127.0.0.1:{}", other.http_port());

    // Kill the replica in use while the stream goes on (a SIGTERM'd 18.16 keeps serving
    // open keep-alive connections for its 15 s grace: a kill is the clean cut).
    let publishing = {
        let publisher = publisher.clone();
        let rest = events[1000..].to_vec();
        tokio::spawn(async move {
            for chunk in rest.chunks(100) {
                publisher.publish_all(chunk).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopped = blocking(move || {
        stopped.kill();
        stopped
    })
    .await;
    publishing.await.unwrap();
    wait_until(
        "all 4000 rows stored after the failover",
        Duration::from_secs(60),
        || async { metrics.summary().stored >= 4000 },
    )
    .await;
    assert_eq!(
        node_in_use(&metrics, "ClickHouse").as_deref(),
        Some(other_node.as_str())
    );
    let summary = running.stop().await.unwrap();
    assert_eq!(summary.dead_lettered, 0, "{summary:?}");
    assert_eq!(queue_counts(&names.queue).await, (0, 0));

    // Count over both replicas: every event somewhere, none lost.
    let (stopped, other) = blocking(move || {
        stopped.restart();
        (stopped, other)
    })
    .await;
    let rows = |ch: &ClickHouse| {
        ch.query(&format!(
            "SELECT short_code FROM {} FORMAT TSV",
            names.table()
        ))
        .lines()
        .map(str::to_owned)
        .collect::<Vec<_>>()
    };
    let mut all = rows(&stopped);
    let on_other = rows(&other);
    assert!(!on_other.is_empty(), "the other replica took INSERTs");
    all.extend(on_other);
    let total = all.len();
    all.sort();
    all.dedup();
    assert_eq!(
        all.len(),
        4000,
        "every event is stored (lost = {})",
        4000 - all.len()
    );
    eprintln!(
        "failover between two ClickHouse servers: 4000 events, {} rows stored twice",
        total - 4000
    );
}
