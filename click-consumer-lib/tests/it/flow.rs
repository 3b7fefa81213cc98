//! The bound in bytes on what is received and not yet acknowledged (`MAX_INFLIGHT_BYTES`):
//! a backlog of large messages drains completely with a small budget, and never more
//! than the budget's worth of messages is held at once; small messages after them
//! flow again under the ordinary prefetch.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use click_consumer::{ClickEvent, Consumer, Metrics};

use crate::common::{Names, config, event, publisher, queue_counts, start, wait_for_rows};

/// A valid click of about `bytes` bytes of JSON (a long `original_url`).
fn large_event(i: usize, bytes: usize) -> ClickEvent {
    let mut event = event(i);
    event.original_url = format!("https://example.com/{i}?t={}", "x".repeat(bytes));
    event
}

/// Samples `click_consumer_messages_unacked` until `stop`, returns the largest value.
fn watch_unacked(metrics: Arc<Metrics>, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let largest = AtomicU64::new(0);
        while !stop.load(Ordering::Relaxed) {
            let text = metrics.encode();
            let unacked = text
                .lines()
                .find_map(|l| l.strip_prefix("click_consumer_messages_unacked "))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .expect("the unacked gauge is exported");
            largest.fetch_max(unacked as u64, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        largest.into_inner()
    })
}

#[tokio::test]
async fn large_messages_drain_within_the_byte_budget() {
    const BUDGET: usize = 2 << 20;
    const SIZE: usize = 100_000;
    const LARGE: usize = 150;
    const SMALL: usize = 3_000;
    let names = Names::new("flow");
    let config = config(&names)
        .with_batch_size(1_000)
        .with_batch_max_bytes(1 << 20)
        .with_max_inflight_bytes(BUDGET);
    // The backlog is there before the consumer starts, as after a crash.
    let publisher = publisher(&config).await;
    let consumer = Consumer::new(config.clone()).unwrap();
    let metrics = consumer.metrics();
    let large: Vec<ClickEvent> = (0..LARGE).map(|i| large_event(i, SIZE)).collect();
    publisher.publish_all(&large).await.unwrap();
    assert_eq!(queue_counts(&names.queue).await.0, LARGE as u64);

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = watch_unacked(metrics.clone(), stop.clone());
    let running = start(consumer);
    wait_for_rows(&names, LARGE as u64).await;
    stop.store(true, Ordering::Relaxed);
    let largest = watcher.await.unwrap();
    // Messages are held from receipt to acknowledgement: never more than the budget.
    let held = largest as usize * SIZE;
    assert!(
        largest > 0 && held <= BUDGET + SIZE,
        "{largest} messages of {SIZE} bytes held at once, budget {BUDGET}"
    );

    // Small messages afterwards are not held back by the large ones' window: were it
    // stuck at ~20 messages, each batch would be flushed by its timeout at ~20 rows
    // (150 INSERTs); lifted, they fill batches of 1,000.
    let inserts_before = metrics.summary().inserts;
    let small: Vec<ClickEvent> = (LARGE..LARGE + SMALL).map(event).collect();
    publisher.publish_all(&small).await.unwrap();
    wait_for_rows(&names, (LARGE + SMALL) as u64).await;
    let small_inserts = metrics.summary().inserts - inserts_before;
    assert!(
        small_inserts <= 25,
        "{small_inserts} INSERTs for {SMALL} small messages"
    );
    let summary = running.stop().await.unwrap();
    assert_eq!(summary.stored, (LARGE + SMALL) as u64, "{summary:?}");
    assert_eq!(summary.dead_lettered, 0);
    assert_eq!(queue_counts(&names.queue).await, (0, 0));
}
