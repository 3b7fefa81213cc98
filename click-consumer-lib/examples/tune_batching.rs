//! Choosing batch settings, and watching what they do.
//!
//! ```sh
//! RABBITMQ_URL=amqp://guest:guest@localhost:5672/ CLICKHOUSE_HOST=localhost \
//!     cargo run -p click-consumer --example tune_batching
//! ```
//!
//! - `batch_size`: rows per INSERT. ClickHouse makes one part per INSERT and merges them
//!   later; thousands of rows per INSERT keep merges cheap. It is also the most rows a
//!   fault can make the broker redeliver (and so store twice).
//! - `batch_timeout`: the longest a click waits before it is written, i.e. how stale the
//!   analytics may be at low traffic; at high traffic batches fill before it.
//! - `prefetch`: at least `batch_size`; twice lets the next batch arrive while the
//!   previous one is written. It bounds memory: prefetch x message size.
//!
//! This example publishes 5,000 clicks, consumes them with 1,000-row batches and a
//! 250 ms timeout, and prints each committed batch. Set `EXAMPLE_SELF_TEST=1` to exit
//! when they are all stored (used by CI).

use std::time::Duration;

use click_consumer::{ClickEvent, ClickPublisher, Config, Consumer};
use tokio_util::sync::CancellationToken;

const CLICKS: usize = 5_000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let config = Config::from_env()?
        .with_batch_size(1_000)
        .with_batch_timeout(Duration::from_millis(250))
        .with_prefetch(2_000);

    let publisher = ClickPublisher::connect(&config).await?;
    let clicks: Vec<ClickEvent> = (0..CLICKS)
        .map(|i| ClickEvent::now(format!("tune{}", i % 50)))
        .collect();
    publisher.publish_all(&clicks).await?;
    publisher.close().await?;

    let done = CancellationToken::new();
    let stop_when_done = done.clone();
    let self_test = std::env::var_os("EXAMPLE_SELF_TEST").is_some();
    let stored = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = stored.clone();
    let consumer = Consumer::new(config)?.on_commit(move |batch| {
        let total =
            counter.fetch_add(batch.rows, std::sync::atomic::Ordering::Relaxed) + batch.rows;
        println!(
            "batch: {:>5} rows, INSERT took {:?} ({total} stored)",
            batch.rows, batch.insert_duration
        );
        if self_test && total >= CLICKS {
            stop_when_done.cancel();
        }
    });
    let ctrl_c = done.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        ctrl_c.cancel();
    });
    let summary = consumer.run(done.cancelled()).await?;
    println!("{} rows in {} INSERTs", summary.stored, summary.inserts);
    if self_test {
        assert!(
            summary.inserts <= 10,
            "1,000-row batches: about 5 INSERTs for 5,000 clicks, got {}",
            summary.inserts
        );
    }
    Ok(())
}
