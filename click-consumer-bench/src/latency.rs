//! The steady-rate phase: click-consumer at its defaults on a fresh queue and database;
//! clicks published at a fixed rate (each short code carries its sequence number, each
//! publish time is recorded); ClickHouse polled every few milliseconds for the newly
//! visible sequence numbers. Latency = first seen in ClickHouse - published.

use std::{
    sync::mpsc::{self, Receiver, TryRecvError},
    thread,
    time::{Duration, Instant},
};

use anyhow::Context;
use lapin::{
    BasicProperties, Confirmation, Connection, ConnectionProperties, PublisherConfirm,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::ShortString,
};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::bench::Bench;
use crate::events;
use crate::service::{INSERTS, Service};
use crate::stack::Target;
use crate::stats::percentile;
use crate::table::Table;

/// Interval of the ClickHouse polls.
const POLL: Duration = Duration::from_millis(25);
/// How long, after the last publish, the rows may take to show up before the phase fails.
const GRACE: Duration = Duration::from_secs(30);
const READY_LIMIT: Duration = Duration::from_secs(30);

/// What the latency phase measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Latency {
    pub(crate) target_rate: u32,
    pub(crate) target_seconds: u64,
    pub(crate) published: u64,
    /// Messages per second between the first and the last publish.
    pub(crate) achieved_rate: f64,
    /// Largest delay of a publish behind its schedule.
    pub(crate) max_behind_schedule_ms: f64,
    /// Publishes the broker refused (basic.nack).
    pub(crate) nacked: u64,
    pub(crate) seen: u64,
    pub(crate) poll_interval_ms: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
    /// `click_consumer_inserts_total` at the end.
    pub(crate) inserts: u64,
    /// The consumer's CPU over its life, as a share of one core.
    pub(crate) consumer_cpu_percent: f64,
    pub(crate) consumer_peak_rss_mib: f64,
}

/// Runs the phase: `--latency-rate` messages per second for `--latency-seconds`.
pub(crate) fn measure(bench: &Bench) -> anyhow::Result<Latency> {
    let rate = bench.args.latency_rate;
    let total = u64::from(rate) * bench.args.latency_seconds;
    let target = Target::new("latency");
    let table = target.table(&bench.servers.clickhouse);
    let mut service = Service::start(
        &bench.consumer_binary,
        &bench.servers,
        &target,
        &bench.args.consumer_env,
    )?;
    service.wait_ready(READY_LIMIT)?;
    let (deadline, deadline_rx) = mpsc::channel();
    let (published, seen) = thread::scope(|scope| {
        let poller = scope.spawn(|| poll_visible(&table, total, deadline_rx));
        let url = bench.servers.lapin_url();
        let published = bench
            .runtime
            .block_on(publish_steadily(&url, &target, rate, total));
        let _ = deadline.send(Instant::now() + GRACE);
        (published, poller.join())
    });
    let published = published?;
    let seen = seen.map_err(std::panic::resume_unwind)?;
    service.ensure_running()?;
    let inserts = service.metric(INSERTS)? as u64;
    let spawned = service.spawned();
    let stopped = service.stop()?;
    let reaped = stopped.reaped;
    table.drop_database();
    bench
        .runtime
        .block_on(bench.broker.delete(&target.queues()))?;
    let lifetime = reaped.at.duration_since(spawned).as_secs_f64();
    let mut latencies = latencies_ms(&published.times, &seen);
    latencies.sort_by(f64::total_cmp);
    let statistic = |p| percentile(&latencies, p).unwrap_or(f64::NAN);
    Ok(Latency {
        target_rate: rate,
        target_seconds: bench.args.latency_seconds,
        published: published.times.len() as u64,
        achieved_rate: published.achieved_rate(),
        max_behind_schedule_ms: published.max_behind.as_secs_f64() * 1e3,
        nacked: published.nacked,
        seen: latencies.len() as u64,
        poll_interval_ms: POLL.as_secs_f64() * 1e3,
        p50_ms: statistic(50.0),
        p99_ms: statistic(99.0),
        max_ms: statistic(100.0),
        inserts,
        consumer_cpu_percent: reaped.cpu.as_secs_f64() / lifetime * 100.0,
        consumer_peak_rss_mib: stopped.peak_rss_kib as f64 / 1024.0,
    })
}

/// The publishes of the phase: `times[seq]` is when click `seq` was published.
struct Published {
    times: Vec<Instant>,
    max_behind: Duration,
    nacked: u64,
}

impl Published {
    fn achieved_rate(&self) -> f64 {
        match (self.times.first(), self.times.last()) {
            (Some(first), Some(last)) if last > first => {
                (self.times.len() - 1) as f64 / last.duration_since(*first).as_secs_f64()
            }
            _ => f64::NAN,
        }
    }
}

/// Publishes `total` sequenced clicks, click `seq` due at `seq / rate` seconds after the
/// start (a publish that falls behind is sent at once, so the average rate holds), as
/// persistent messages on a confirm-mode channel; confirms are checked as they come.
async fn publish_steadily(
    url: &str,
    target: &Target,
    rate: u32,
    total: u64,
) -> anyhow::Result<Published> {
    let connection = Connection::connect(url, ConnectionProperties::default())
        .await
        .context("latency publisher: cannot connect")?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let (confirms, confirms_rx) = tokio::sync::mpsc::unbounded_channel();
    let nacks = tokio::spawn(count_nacks(confirms_rx));
    let properties = BasicProperties::default()
        .with_content_type(ShortString::from("application/json"))
        .with_delivery_mode(2);
    let mut times = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    let mut max_behind = Duration::ZERO;
    let start = tokio::time::Instant::now();
    for seq in 0..total {
        let due = start + Duration::from_nanos(seq * 1_000_000_000 / u64::from(rate));
        if due > tokio::time::Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        let body = serde_json::to_vec(&events::sequenced_click(seq))?;
        let sent = tokio::time::Instant::now();
        max_behind = max_behind.max(sent.duration_since(due));
        let confirm = channel
            .basic_publish(
                ShortString::from(target.exchange.as_str()),
                ShortString::from(target.queue.as_str()),
                BasicPublishOptions::default(),
                &body,
                properties.clone(),
            )
            .await?;
        times.push(sent.into_std());
        let _ = confirms.send(confirm);
    }
    drop(confirms);
    let nacked = nacks.await.context("confirm task panicked")??;
    let _ = channel.close(200, ShortString::from("done")).await;
    let _ = connection.close(200, ShortString::from("done")).await;
    Ok(Published {
        times,
        max_behind,
        nacked,
    })
}

/// Awaits every confirm; counts the refused ones.
async fn count_nacks(mut confirms: UnboundedReceiver<PublisherConfirm>) -> anyhow::Result<u64> {
    let mut nacked = 0;
    while let Some(confirm) = confirms.recv().await {
        match confirm.await.context("publish not confirmed")? {
            Confirmation::Ack(_) | Confirmation::NotRequested => {}
            Confirmation::Nack(_) => nacked += 1,
        }
    }
    Ok(nacked)
}

/// When each sequence number `0..total` was first seen in ClickHouse. Stops when all
/// were seen, or at the deadline the publisher sends once it is done.
fn poll_visible(
    table: &Table<'_>,
    total: u64,
    deadline: Receiver<Instant>,
) -> Vec<Option<Instant>> {
    let mut seen = vec![None; usize::try_from(total).unwrap_or(0)];
    let mut lowest = 0;
    let mut stop_at = None;
    while lowest < seen.len() {
        if stop_at.is_none() {
            stop_at = match deadline.try_recv() {
                Ok(at) => Some(at),
                Err(TryRecvError::Empty) => None,
                Err(TryRecvError::Disconnected) => Some(Instant::now()),
            };
        }
        if stop_at.is_some_and(|at| Instant::now() >= at) {
            break;
        }
        let asked = Instant::now();
        let numbers = table.sequence_numbers_from(lowest as u64);
        let answered = Instant::now();
        for number in numbers {
            if let Some(slot) = usize::try_from(number).ok().and_then(|i| seen.get_mut(i)) {
                slot.get_or_insert(answered);
            }
        }
        while lowest < seen.len() && seen[lowest].is_some() {
            lowest += 1;
        }
        thread::sleep(POLL.saturating_sub(asked.elapsed()));
    }
    seen
}

/// Latency of every click seen, in milliseconds.
fn latencies_ms(published: &[Instant], seen: &[Option<Instant>]) -> Vec<f64> {
    published
        .iter()
        .zip(seen)
        .filter_map(|(sent, seen)| Some(seen.as_ref()?.duration_since(*sent).as_secs_f64() * 1e3))
        .collect()
}

/// The target: p99 at most the consumer's `BATCH_TIMEOUT_MS` + 250 ms.
pub(crate) fn p99_limit_ms(batch_timeout_ms: u64) -> f64 {
    batch_timeout_ms as f64 + 250.0
}
