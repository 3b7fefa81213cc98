//! Faults during a run: nothing is acknowledged before it is stored.

use std::time::Duration;

use click_consumer::{ClickEvent, Consumer};
use click_consumer_testkit::{ClickHouse, RabbitMq};

use crate::common::*;

#[tokio::test]
async fn a_clickhouse_outage_is_retried_without_losing_or_duplicating() {
    // A private ClickHouse that this test may stop.
    let clickhouse = tokio::task::spawn_blocking(ClickHouse::start)
        .await
        .unwrap();
    let names = Names::new("ch_outage");
    let config = config(&names).with_clickhouse_url(clickhouse.url());
    let consumer = Consumer::new(config.clone()).unwrap();
    let metrics = consumer.metrics();
    let running = start(consumer).await;
    let publisher = publisher(&config).await;
    let events: Vec<ClickEvent> = (0..3000).map(event).collect();
    publisher.publish_all(&events[..1000]).await.unwrap();
    let count = |ch: &ClickHouse| {
        ch.query(&format!("SELECT count() FROM {}", names.table()))
            .trim()
            .parse::<u64>()
            .unwrap()
    };
    wait_until("the first rows", Duration::from_secs(30), || async {
        metrics.summary().stored >= 1000
    })
    .await;

    let clickhouse = blocking(clickhouse, |server| server.stop()).await;
    publisher.publish_all(&events[1000..]).await.unwrap();
    wait_until(
        "failed INSERTs being retried",
        Duration::from_secs(30),
        || async { metrics.summary().insert_retries >= 2 },
    )
    .await;
    let stored_during_outage = metrics.summary().stored;
    let (_, unacked) = queue_counts(&names.queue).await;
    assert!(
        unacked > 0,
        "the failing batch stays unacknowledged during the outage"
    );

    let clickhouse = blocking(clickhouse, |server| server.restart()).await;
    wait_until(
        "all 3000 rows after the outage",
        Duration::from_secs(60),
        || async { metrics.summary().stored >= 3000 },
    )
    .await;
    let summary = running.stop().await.unwrap();
    assert_eq!(
        stored_during_outage, 1000,
        "nothing was stored while ClickHouse was down"
    );
    assert_eq!(summary.stored, 3000, "{summary:?}");
    assert_eq!(count(&clickhouse), 3000, "every event exactly once");
    assert_eq!(queue_counts(&names.queue).await, (0, 0));
}

#[tokio::test]
async fn a_broker_failure_right_after_a_clickhouse_pause_is_retried_not_fatal() {
    // Private servers: this test stops both.
    let (clickhouse, rabbitmq) =
        tokio::task::spawn_blocking(|| (ClickHouse::start(), RabbitMq::start()))
            .await
            .unwrap();
    let names = Names::new("pause_then_broker");
    // A short start-up window: it must not apply to a reconnect long after start-up.
    let config = config(&names)
        .with_rabbitmq_url(rabbitmq.amqp_url())
        .with_clickhouse_url(clickhouse.url())
        .with_startup_timeout(Duration::from_secs(2))
        .with_insert_release_after(Duration::from_millis(500))
        .with_reconnect_limit(Duration::from_secs(60));
    let consumer = Consumer::new(config.clone()).unwrap();
    let metrics = consumer.metrics();
    let running = start(consumer).await;
    let publisher = publisher(&config).await;
    let events: Vec<ClickEvent> = (0..200).map(event).collect();
    publisher.publish_all(&events[..100]).await.unwrap();
    wait_until("the first rows", Duration::from_secs(30), || async {
        metrics.summary().stored >= 100
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await; // well past the start-up window

    let clickhouse = blocking(clickhouse, |server| server.stop()).await;
    publisher.publish_all(&events[100..]).await.unwrap();
    drop(publisher);
    wait_until(
        "the batch released (a pause)",
        Duration::from_secs(30),
        || async { metrics.summary().released > 0 },
    )
    .await;
    // The broker goes away during the pause, then ClickHouse comes back: the consumer
    // must keep trying to reconnect (RECONNECT_LIMIT_MS), not give up with the start-up
    // window that ended long ago.
    let (clickhouse, rabbitmq) = tokio::task::spawn_blocking(move || {
        rabbitmq.stop();
        clickhouse.restart();
        (clickhouse, rabbitmq)
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        !running.is_finished(),
        "the consumer gave up while the broker was down for 4 s after a pause"
    );
    let rabbitmq = blocking(rabbitmq, |server| server.restart()).await;
    wait_until(
        "all 200 rows after the broker came back",
        Duration::from_secs(60),
        || async { metrics.summary().stored >= 200 },
    )
    .await;
    let summary = running.stop().await.expect("a clean stop");
    let rows = clickhouse
        .query(&format!(
            "SELECT count(), uniqExact(short_code) FROM {}",
            names.table()
        ))
        .trim()
        .to_owned();
    assert_eq!(rows, "200\t200", "every event exactly once; {summary:?}");
    drop(rabbitmq);
}

/// A delivery that ends every session at once (here: a header frame larger than the
/// frame size the consumer asked for, which RabbitMQ never splits and lapin refuses)
/// makes the consumer back off between sessions instead of reconnecting in a tight loop
/// (about 80 sessions a second were measured before the backoff).
#[tokio::test]
async fn a_session_lost_at_once_is_followed_by_a_backoff() {
    let names = Names::new("flapping");
    let small_frames = format!("{}?frame_max=16384", servers().rabbitmq.amqp_url());
    let config = config(&names).with_rabbitmq_url(small_frames);
    let consumer = Consumer::new(config.clone()).unwrap();
    let metrics = consumer.metrics();
    let running = start(consumer).await;

    // Published at the broker's frame size: a 20,000-byte header.
    let connection = connect().await;
    let channel = connection.create_channel().await.unwrap();
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "x-large".into(),
        lapin::types::AMQPValue::LongString("h".repeat(20_000).into()),
    );
    channel
        .basic_publish(
            "".into(),
            names.queue.as_str().into(),
            lapin::options::BasicPublishOptions::default(),
            br#"{"short_code":"big","timestamp":"2024-01-15T10:30:00Z"}"#,
            lapin::BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap();
    wait_until("the sessions failing", Duration::from_secs(10), || async {
        metrics.summary().reconnects >= 2
    })
    .await;
    let first = metrics.summary().reconnects;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let in_4s = metrics.summary().reconnects - first;
    // The backoff here is 50 ms doubling to 500 ms: at most about 10 sessions in 4 s.
    assert!(
        (1..=12).contains(&in_4s),
        "{in_4s} reconnects in 4 s: expected a few, spaced by the backoff"
    );
    assert!(!running.is_finished(), "the consumer keeps trying");
    channel
        .queue_purge(
            names.queue.as_str().into(),
            lapin::options::QueuePurgeOptions::default(),
        )
        .await
        .unwrap();
    running.stop().await.unwrap();
}
