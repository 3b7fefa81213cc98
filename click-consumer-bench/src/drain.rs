//! One timed drain: a queue prefilled with N clicks, then one consumer started as a
//! child process, timed from its spawn until the queue is drained. For click-consumer,
//! the table is created beforehand (by a short run of click-consumer itself) and its
//! merges stopped, so that ClickHouse's parts count the INSERTs.
//!
//! click-consumer is done when ClickHouse counts all N rows, the queue has nothing ready
//! and its `click_consumer_messages_unacked` is 0; it is then stopped with SIGTERM. The
//! reference consumer is done when it exits, having acknowledged N messages. Either way
//! the process is reaped with its rusage: CPU time over its whole life. Peak RSS is the
//! process's own `VmHWM` (see `child`): read just before SIGTERM for click-consumer,
//! reported at exit by the reference consumer.

use std::{
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use click_consumer::config::defaults;
use serde::Serialize;

use crate::bench::Bench;
use crate::child::{Reaped, Watched};
use crate::prefill::{Prefill, prefill};
use crate::reference;
use crate::service::{INSERTS, Service, UNACKED};
use crate::stack::Target;
use crate::table::{Parts, Table};

/// Pause between the prefill and the consumer's start, for the broker to settle.
const SETTLE: Duration = Duration::from_secs(1);
/// Longest click-consumer may take to connect to both servers.
const READY_LIMIT: Duration = Duration::from_secs(30);
/// Interval of the done check of click-consumer.
const POLL: Duration = Duration::from_millis(20);

pub(crate) const CLICK_CONSUMER: &str = "click-consumer";
pub(crate) const REFERENCE: &str = "reference";

/// What one drain measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DrainRun {
    pub(crate) consumer: &'static str,
    pub(crate) messages: u64,
    /// From the consumer's spawn until done.
    pub(crate) seconds: f64,
    pub(crate) rate: f64,
    /// User plus system CPU of the consumer process over its whole life.
    pub(crate) cpu_seconds: f64,
    pub(crate) cpu_seconds_per_million: f64,
    pub(crate) peak_rss_mib: f64,
    /// click-consumer only: `click_consumer_inserts_total` when done.
    pub(crate) inserts: Option<u64>,
    /// click-consumer only: mean INSERT duration, from its histogram.
    pub(crate) mean_insert_ms: Option<f64>,
    /// click-consumer only: rows in ClickHouse when done (more than N: duplicates).
    pub(crate) rows: Option<u64>,
    /// click-consumer only: ClickHouse's parts of the table (merges stopped).
    pub(crate) parts: Option<Parts>,
    pub(crate) prefill: Prefill,
}

impl DrainRun {
    fn new(
        consumer: &'static str,
        prefill: Prefill,
        spawned: Instant,
        done: Instant,
        reaped: &Reaped,
        peak_rss_kib: u64,
    ) -> Self {
        let seconds = done.duration_since(spawned).as_secs_f64();
        let messages = prefill.messages;
        let cpu_seconds = reaped.cpu.as_secs_f64();
        DrainRun {
            consumer,
            messages,
            seconds,
            rate: messages as f64 / seconds,
            cpu_seconds,
            cpu_seconds_per_million: cpu_seconds / messages as f64 * 1e6,
            peak_rss_mib: peak_rss_kib as f64 / 1024.0,
            inserts: None,
            mean_insert_ms: None,
            rows: None,
            parts: None,
            prefill,
        }
    }
}

/// The click-consumer binary drains a prefilled queue into a fresh table.
pub(crate) fn click_consumer(bench: &Bench) -> anyhow::Result<DrainRun> {
    let target = Target::new("drain");
    let table = target.table(&bench.servers.clickhouse);
    create_table(bench, &target)?;
    if crate::extra::enabled() {
        crate::extra::add_columns(&bench.servers.clickhouse, &table);
    }
    table.stop_merges();
    let prefill = fill(bench, &target)?;
    let mut service = Service::start(&bench.consumer_binary, &bench.servers, &target)?;
    let spawned = service.spawned();
    let done = wait_drained(bench, &mut service, &table, &target)?;
    let inserts = service.metric(INSERTS)? as u64;
    let mean_insert_ms = service.mean_insert_ms()?;
    let stopped = service.stop()?;
    let mut run = DrainRun::new(
        CLICK_CONSUMER,
        prefill,
        spawned,
        done,
        &stopped.reaped,
        stopped.peak_rss_kib,
    );
    run.inserts = Some(inserts);
    run.mean_insert_ms = Some(mean_insert_ms);
    let rows = table.count();
    if rows != run.messages {
        eprintln!(
            "  warning: {rows} rows in ClickHouse for {} messages",
            run.messages
        );
    }
    run.rows = Some(rows);
    if crate::extra::enabled() {
        crate::extra::check_filled(&bench.servers.clickhouse, &table, rows)?;
    }
    run.parts = Some(table.parts());
    table.drop_database();
    bench
        .runtime
        .block_on(bench.broker.delete(&target.queues()))?;
    Ok(run)
}

/// The reference consumer (this binary's subcommand) drains a prefilled queue.
pub(crate) fn reference(bench: &Bench) -> anyhow::Result<DrainRun> {
    let target = Target::new("reference");
    let prefill = fill(bench, &target)?;
    let mut command = Command::new(&bench.own_binary);
    command
        .arg("reference-consumer")
        .args(["--url", &bench.servers.lapin_url()])
        .args(["--queue", &target.queue])
        .args(["--messages", &bench.args.messages.to_string()])
        .args(["--prefetch", &bench.prefetch.to_string()])
        .args(["--ack-every", &defaults::BATCH_SIZE.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut process = Watched::spawn("the reference consumer", command)?;
    let reaped = process
        .wait_exit(bench.drain_timeout())?
        .context("the reference consumer did not finish in time")?;
    if !reaped.status.success() {
        bail!("the reference consumer failed ({})", reaped.status);
    }
    let output = process.read_stdout()?;
    let peak_rss_kib = reference::reported_peak_rss_kib(&output).with_context(|| {
        format!("the reference consumer did not report its peak RSS: {output:?}")
    })?;
    let ready = bench.runtime.block_on(bench.broker.ready(&target.queue))?;
    anyhow::ensure!(
        ready == 0,
        "{ready} messages left after the reference consumer"
    );
    bench
        .runtime
        .block_on(bench.broker.delete(&target.queues()))?;
    Ok(DrainRun::new(
        REFERENCE,
        prefill,
        process.spawned(),
        reaped.at,
        &reaped,
        peak_rss_kib,
    ))
}

/// Has click-consumer create its table (and declare its topology) with a short run on
/// the still empty queue, so that merges can be stopped before the first INSERT, with
/// the consumer's own DDL whatever it is.
fn create_table(bench: &Bench, target: &Target) -> anyhow::Result<()> {
    let mut service = Service::start(&bench.consumer_binary, &bench.servers, target)?;
    service.wait_ready(READY_LIMIT)?;
    service.stop().context("stopping the table-creating run")?;
    Ok(())
}

/// Prefills the target's queue and checks that it holds exactly N ready messages.
fn fill(bench: &Bench, target: &Target) -> anyhow::Result<Prefill> {
    let messages = bench.args.messages;
    let config = target.config(&bench.servers);
    let done = bench.runtime.block_on(prefill(&config, messages))?;
    eprintln!(
        "  prefilled {} messages in {:.1} s ({:.0} msg/s)",
        messages, done.seconds, done.rate
    );
    thread::sleep(SETTLE);
    let ready = bench.runtime.block_on(bench.broker.ready(&target.queue))?;
    anyhow::ensure!(
        ready == messages,
        "the queue holds {ready} messages, not {messages}"
    );
    Ok(done)
}

/// Polls until all N rows are in ClickHouse, nothing is ready in the queue and nothing
/// is unacknowledged; returns when that was seen.
fn wait_drained(
    bench: &Bench,
    service: &mut Service,
    table: &Table<'_>,
    target: &Target,
) -> anyhow::Result<Instant> {
    let messages = bench.args.messages;
    let deadline = Instant::now() + bench.drain_timeout();
    loop {
        service.ensure_running()?;
        if table.count() >= messages
            && bench.runtime.block_on(bench.broker.ready(&target.queue))? == 0
            && service.metric(UNACKED).ok() == Some(0.0)
        {
            return Ok(Instant::now());
        }
        if Instant::now() > deadline {
            bail!(
                "click-consumer did not drain {messages} messages within {:?} ({} rows stored)",
                bench.drain_timeout(),
                table.count()
            );
        }
        thread::sleep(POLL);
    }
}

/// One repeat of the drain comparison.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Comparison {
    pub(crate) repeat: u32,
    /// Which consumer drained first.
    pub(crate) first: &'static str,
    pub(crate) click_consumer: DrainRun,
    pub(crate) reference: Option<DrainRun>,
    /// click-consumer's drain rate / the reference's.
    pub(crate) rate_ratio: Option<f64>,
    /// click-consumer's CPU per message / the reference's.
    pub(crate) cpu_ratio: Option<f64>,
}

/// Runs repeat `repeat`: both drains (the reference unless skipped), click-consumer
/// first on odd repeats.
pub(crate) fn compare(bench: &Bench, repeat: u32) -> anyhow::Result<Comparison> {
    let skip_reference = bench.args.skip_reference;
    let click_first = skip_reference || repeat % 2 == 1;
    let (click_consumer, reference) = if click_first {
        let click = measured(CLICK_CONSUMER, || click_consumer(bench))?;
        let reference = if skip_reference {
            None
        } else {
            Some(measured(REFERENCE, || reference(bench))?)
        };
        (click, reference)
    } else {
        let reference = measured(REFERENCE, || reference(bench))?;
        (
            measured(CLICK_CONSUMER, || click_consumer(bench))?,
            Some(reference),
        )
    };
    let ratio = |of: fn(&DrainRun) -> f64| reference.as_ref().map(|r| of(&click_consumer) / of(r));
    Ok(Comparison {
        repeat,
        first: if click_first {
            CLICK_CONSUMER
        } else {
            REFERENCE
        },
        rate_ratio: ratio(|run| run.rate),
        cpu_ratio: ratio(|run| run.cpu_seconds_per_million),
        click_consumer,
        reference,
    })
}

/// Runs one drain, saying so on stderr.
fn measured(
    consumer: &str,
    drain: impl FnOnce() -> anyhow::Result<DrainRun>,
) -> anyhow::Result<DrainRun> {
    eprintln!("  {consumer}:");
    let run = drain().with_context(|| format!("drain by {consumer}"))?;
    eprintln!(
        "  {consumer} drained {} messages in {:.2} s: {:.0} msg/s, {:.2} CPU-s per 1M, peak RSS {:.1} MiB",
        run.messages, run.seconds, run.rate, run.cpu_seconds_per_million, run.peak_rss_mib
    );
    Ok(run)
}
