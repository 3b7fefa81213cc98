//! Filling a queue before a drain: the library's `ClickPublisher` (the consumer's
//! topology, persistent messages, publisher confirms), `publish_all` in chunks from a few
//! tasks at once, so that the broker always has publishes and confirms in flight.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use anyhow::Context;
use click_consumer::{ClickEvent, ClickPublisher, Config};
use serde::Serialize;

use crate::events;

/// Events per `publish_all` call (each waits for its confirms before the next).
const CHUNK: u64 = 2_000;
/// Chunks published at once.
const TASKS: usize = 16;

/// How a prefill went.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Prefill {
    pub(crate) messages: u64,
    pub(crate) seconds: f64,
    pub(crate) rate: f64,
}

/// Declares the consumer's topology for `config`'s queue and publishes events
/// `0..messages` ([`events::click`]) to it, every one confirmed by the broker.
pub(crate) async fn prefill(config: &Config, messages: u64) -> anyhow::Result<Prefill> {
    let started = Instant::now();
    let publisher = ClickPublisher::connect(config)
        .await
        .context("prefill: cannot connect the publisher")?;
    let next_chunk = Arc::new(AtomicU64::new(0));
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            tokio::spawn(publish_chunks(
                publisher.clone(),
                next_chunk.clone(),
                messages,
            ))
        })
        .collect();
    for task in tasks {
        task.await.context("prefill task panicked")??;
    }
    publisher.close().await.context("prefill: closing")?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(Prefill {
        messages,
        seconds,
        rate: messages as f64 / seconds,
    })
}

/// Takes chunks until there are none left, publishing each with `publish_all`.
async fn publish_chunks(
    publisher: ClickPublisher,
    next_chunk: Arc<AtomicU64>,
    messages: u64,
) -> anyhow::Result<()> {
    loop {
        let start = next_chunk.fetch_add(1, Ordering::Relaxed) * CHUNK;
        if start >= messages {
            return Ok(());
        }
        if crate::extra::enabled() {
            let range = start..messages.min(start + CHUNK);
            crate::extra::publish(&publisher, range).await?;
            continue;
        }
        let chunk: Vec<ClickEvent> = (start..messages.min(start + CHUNK))
            .map(events::click)
            .collect();
        publisher
            .publish_all(&chunk)
            .await
            .with_context(|| format!("prefill: publishing events {start}.."))?;
    }
}
