//! The in-flight byte budget (`MAX_INFLIGHT_BYTES`): large messages shrink the prefetch
//! window so that what the broker sends ahead fits the budget, and normal clicks get the
//! whole `PREFETCH_COUNT` back.

use std::time::Duration;

use click_consumer::{ClickEvent, Consumer, Metrics, QueueType};
use click_consumer_testkit::ClickHouse;

use crate::common::*;

const MIB: usize = 1024 * 1024;

/// A valid click of about `bytes` bytes (a long user agent).
fn large_event(i: usize, bytes: usize) -> ClickEvent {
    event(i).with_user_agent("a".repeat(bytes))
}

/// The value of an unlabelled gauge or counter in the metrics' text.
fn metric(metrics: &Metrics, name: &str) -> u64 {
    let text = metrics.encode();
    text.lines()
        .find_map(|line| {
            let value = line.strip_prefix(name)?.strip_prefix(' ')?;
            value.trim().parse::<f64>().ok()
        })
        .unwrap_or_else(|| panic!("no metric {name} in:\n{text}")) as u64
}

#[tokio::test]
async fn large_messages_stay_within_the_byte_budget_while_clickhouse_is_down() {
    // A private ClickHouse that this test stops: nothing can be acknowledged, so the
    // broker sends ahead exactly what the window allows.
    let clickhouse = tokio::task::spawn_blocking(ClickHouse::start)
        .await
        .unwrap();
    let names = Names::new("flow_budget");
    let budget = 8 * MIB;
    let size = 700_000;
    let config = config(&names)
        .with_clickhouse_url(clickhouse.url())
        .with_max_inflight_bytes(budget);
    let consumer = Consumer::new(config.clone()).unwrap();
    let metrics = consumer.metrics();
    let running = start(consumer).await;
    let clickhouse = blocking(clickhouse, |server| server.stop()).await;

    let events: Vec<ClickEvent> = (0..60).map(|i| large_event(i, size)).collect();
    publisher(&config).await.publish_all(&events).await.unwrap();
    wait_until(
        "failed INSERTs being retried",
        Duration::from_secs(30),
        || async { metrics.summary().insert_retries >= 2 },
    )
    .await;
    // Let the broker send whatever the window allows, then read its own count.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (ready, unacked) = queue_counts(&names.queue).await;
    let held = metric(&metrics, "click_consumer_inflight_bytes");
    // The budget plus its quarter of slack, in messages of this size: 14.
    let most = (budget + budget / 4) / size;
    assert!(
        unacked as usize <= most,
        "{unacked} messages of {size} bytes sent ahead (ready {ready}); the budget allows {most}"
    );
    assert!(
        ready > 0,
        "the broker still holds what the window does not allow"
    );
    assert!(
        held <= (budget + budget / 4) as u64,
        "{held} bytes held, budget {budget}"
    );
    assert!(metric(&metrics, "click_consumer_prefetch_window") <= most as u64);

    let clickhouse = blocking(clickhouse, |server| server.restart()).await;
    wait_until("all 60 rows", Duration::from_secs(90), || async {
        metrics.summary().stored >= 60
    })
    .await;
    let summary = running.stop().await.unwrap();
    assert_eq!(summary.stored, 60, "{summary:?}");
    assert_eq!(summary.dead_lettered, 0, "{summary:?}");
    let count = clickhouse.query(&format!(
        "SELECT count(), uniqExact(short_code) FROM {}",
        names.table()
    ));
    assert_eq!(count.trim(), "60\t60", "each large click stored once");
}

#[tokio::test]
async fn the_window_follows_message_sizes_and_normal_clicks_get_the_whole_prefetch() {
    sizes_back_and_forth("flow_sizes", QueueType::Classic).await;
}

#[tokio::test]
async fn on_a_quorum_queue_consumer_restarts_lose_and_duplicate_nothing() {
    // A restart cancels a consumer with deliveries in flight. A quorum queue can return
    // the ones it had sent but the consumer had not received yet (seen: 1 in this test on
    // RabbitMQ 3.10.8 and 4.0.5): they come back flagged redelivered, and count once towards the
    // delivery limit, but reach the consumer once.
    sizes_back_and_forth("flow_quorum", QueueType::Quorum).await;
}

/// Small, then large, then small clicks: the window shrinks to the budget and grows back,
/// every click reaches the consumer once and is stored once.
async fn sizes_back_and_forth(test: &str, queue_type: QueueType) {
    let names = Names::new(test);
    let config = config(&names)
        .with_max_inflight_bytes(8 * MIB)
        .with_queue_type(queue_type);
    let prefetch = u64::from(config.prefetch());
    let consumer = Consumer::new(config.clone()).unwrap();
    let metrics = consumer.metrics();
    let running = start(consumer).await;
    // Before any message: sized for the largest message allowed (8 MiB / 1 MiB).
    assert_eq!(metric(&metrics, "click_consumer_prefetch_window"), 7);

    let publisher = publisher(&config).await;
    let small: Vec<ClickEvent> = (0..2000).map(event).collect();
    publisher.publish_all(&small).await.unwrap();
    wait_for_rows(&names, 2000).await;
    assert_eq!(
        metric(&metrics, "click_consumer_prefetch_window"),
        prefetch,
        "normal clicks get the whole PREFETCH_COUNT"
    );

    let large: Vec<ClickEvent> = (2000..2100).map(|i| large_event(i, 700_000)).collect();
    publisher.publish_all(&large).await.unwrap();
    wait_for_rows(&names, 2100).await;
    // 700 KB messages shrink the window from 1,000 to the budget: 8 MiB / 700 KB is 11,
    // and a window shrinks once it overshoots by an eighth.
    let most = (8 * MIB * 8 / 7 / 700_000) as u64;
    wait_until(
        "a window sized for 700 KB messages",
        Duration::from_secs(10),
        || async { metric(&metrics, "click_consumer_prefetch_window") <= most },
    )
    .await;

    let small: Vec<ClickEvent> = (2100..4100).map(event).collect();
    publisher.publish_all(&small).await.unwrap();
    wait_for_rows(&names, 4100).await;
    wait_until("the window grown back", Duration::from_secs(10), || async {
        metric(&metrics, "click_consumer_prefetch_window") == prefetch
    })
    .await;
    let changes = metric(&metrics, "click_consumer_prefetch_window_changes_total");
    let summary = running.stop().await.unwrap();
    assert_eq!(summary.stored, 4100, "{summary:?}");
    assert_eq!(
        summary.received, 4100,
        "each click received once: {summary:?}"
    );
    assert_eq!(summary.dead_lettered, 0, "{summary:?}");
    if queue_type == QueueType::Classic {
        assert_eq!(summary.redelivered, 0, "{summary:?}");
    }
    assert_eq!(row_count(&names).await, 4100, "each click stored once");
    assert!(
        (3..=12).contains(&changes),
        "grow, shrink, grow (a few steps at most), got {changes} window changes"
    );
}
