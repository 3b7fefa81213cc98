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

/// Events per `publish_all` call (each waits for its confirms before the next), at most.
const CHUNK: u64 = 2_000;
/// Bytes per `publish_all` call, at most (for large messages).
const CHUNK_BYTES: u64 = 8 << 20;
/// Chunks published at once.
const TASKS: usize = 16;

/// How a prefill went.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Prefill {
    pub(crate) messages: u64,
    /// Large clicks: their bytes in all (about).
    pub(crate) bytes: Option<u64>,
    pub(crate) seconds: f64,
    pub(crate) rate: f64,
}

/// What a queue is filled with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Clicks {
    /// Realistic clicks ([`events::click`]), a few hundred bytes each.
    Normal,
    /// Valid clicks of about this many bytes each ([`events::large_click`]).
    Large(usize),
}

impl Clicks {
    fn event(self, index: u64) -> ClickEvent {
        match self {
            Clicks::Normal => events::click(index),
            Clicks::Large(bytes) => events::large_click(index, bytes),
        }
    }

    fn chunk(self) -> u64 {
        match self {
            Clicks::Normal => CHUNK,
            Clicks::Large(bytes) => (CHUNK_BYTES / bytes.max(1) as u64).clamp(1, CHUNK),
        }
    }
}

/// Declares the consumer's topology for `config`'s queue and publishes events
/// `0..messages` to it, every one confirmed by the broker.
pub(crate) async fn prefill(
    config: &Config,
    messages: u64,
    clicks: Clicks,
) -> anyhow::Result<Prefill> {
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
                clicks,
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
        bytes: match clicks {
            Clicks::Normal => None,
            Clicks::Large(each) => Some(messages * each as u64),
        },
        seconds,
        rate: messages as f64 / seconds,
    })
}

/// Takes chunks until there are none left, publishing each with `publish_all`.
async fn publish_chunks(
    publisher: ClickPublisher,
    next_chunk: Arc<AtomicU64>,
    messages: u64,
    clicks: Clicks,
) -> anyhow::Result<()> {
    let size = clicks.chunk();
    loop {
        let start = next_chunk.fetch_add(1, Ordering::Relaxed) * size;
        if start >= messages {
            return Ok(());
        }
        if crate::extra::enabled() {
            let range = start..messages.min(start + size);
            crate::extra::publish(&publisher, range).await?;
            continue;
        }
        let chunk: Vec<ClickEvent> = (start..messages.min(start + size))
            .map(|index| clicks.event(index))
            .collect();
        publisher
            .publish_all(&chunk)
            .await
            .with_context(|| format!("prefill: publishing events {start}.."))?;
    }
}
