//! Faults during a run: nothing is acknowledged before it is stored.

use std::time::Duration;

use click_consumer::{ClickEvent, Consumer};
use click_consumer_testkit::ClickHouse;

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

    let clickhouse = tokio::task::spawn_blocking(move || {
        clickhouse.stop();
        clickhouse
    })
    .await
    .unwrap();
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

    let clickhouse = tokio::task::spawn_blocking(move || {
        clickhouse.restart();
        clickhouse
    })
    .await
    .unwrap();
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
