//! One timed drain: a queue prefilled with N clicks, then one consumer started as a
//! child process, timed from its spawn until the last message is stored (click-consumer:
//! when ClickHouse wrote the part of the last INSERT, see `wait_drained`) or
//! acknowledged (reference: its exit). The broker's CPU time (`/proc/<pid>/stat` of its
//! beam process) is read over the same span, to compare what each consumer costs the
//! broker per message. For click-consumer, the table is created beforehand (by a short
//! run of click-consumer itself) and its merges stopped, so that ClickHouse's parts
//! count the INSERTs.
//!
//! click-consumer is done when its `/metrics` counts N rows inserted, the queue has
//! nothing ready and its `click_consumer_messages_unacked` is 0 (ClickHouse must then
//! count exactly N rows); it is then stopped with SIGTERM. The
//! reference consumer is done when it exits, having acknowledged N messages. Either way
//! the process is reaped with its rusage: CPU time over its whole life. Peak RSS is the
//! process's own `VmHWM` (see `child`): read just before SIGTERM for click-consumer,
//! reported at exit by the reference consumer.

use std::{
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::bench::Bench;
use crate::child::{Reaped, Watched, cpu_time};
use crate::machine::CpuTimes;
use crate::prefill::{Clicks, Prefill, prefill};
use crate::reference;
use crate::service::{INSERTS, LAST_INSERT, ROWS_INSERTED, Service, UNACKED};
use crate::stack::Target;
use crate::table::{Parts, Table};

/// Pause between the prefill and the consumer's start, for the broker to settle.
const SETTLE: Duration = Duration::from_secs(1);
/// Longest click-consumer may take to connect to both servers.
const READY_LIMIT: Duration = Duration::from_secs(30);
/// Interval of the done check of click-consumer (a `/metrics` sample).
const POLL: Duration = Duration::from_millis(200);
/// Interval of the CPU samples.
const SAMPLE: Duration = Duration::from_millis(20);
/// How long before click-consumer's last INSERT was answered its part may have been
/// written: the benchmark's INSERTs take tens of milliseconds (large batches, up to a
/// second or two).
const INSERT_ANSWER_LIMIT: f64 = 5.0;
/// How far after that answer the part's time may seem to be: the tick added for the
/// coarse clock, beyond which the file time would be later than the answer.
const PART_TIME_SLACK: f64 = 0.011;

pub(crate) const CLICK_CONSUMER: &str = "click-consumer";
pub(crate) const REFERENCE: &str = "reference";
/// The reference with a small window and frequent acks (an independent harness's).
pub(crate) const REFERENCE_SMALL: &str = "ref-1k/100";
/// The small-window reference's prefetch and acknowledgement interval.
pub(crate) const SMALL_PREFETCH: u16 = 1_000;
pub(crate) const SMALL_ACK_EVERY: u64 = 100;

/// What one drain measured.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct DrainRun {
    pub(crate) consumer: &'static str,
    pub(crate) messages: u64,
    /// From the consumer's spawn until the last message was stored (or acknowledged).
    pub(crate) seconds: f64,
    pub(crate) rate: f64,
    /// Large drains: bytes of the clicks drained, per second.
    pub(crate) bytes_per_second: Option<f64>,
    /// The broker's CPU time over the same span.
    pub(crate) broker_cpu_seconds: Option<f64>,
    pub(crate) broker_cpu_seconds_per_million: Option<f64>,
    /// ClickHouse's CPU time over the same span, per million messages (the INSERTs, and
    /// whatever else the server does meanwhile: about nothing while a reference drains).
    pub(crate) clickhouse_cpu_seconds_per_million: Option<f64>,
    /// The share of the machine's CPU time that the hypervisor gave to others over the
    /// same span (`steal` in `/proc/stat`), in percent: a drain slowed by it is slow
    /// for reasons outside both consumers.
    pub(crate) steal_percent: Option<f64>,
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
        start: Sample,
        end: Sample,
        reaped: &Reaped,
        peak_rss_kib: u64,
    ) -> Self {
        let seconds = end.at.duration_since(spawned).as_secs_f64();
        let spent = |of: fn(&Sample) -> Option<Duration>| {
            of(&start)
                .zip(of(&end))
                .map(|(before, after)| after.saturating_sub(before).as_secs_f64())
        };
        let broker_cpu_seconds = spent(|s| s.broker);
        let clickhouse_cpu_seconds = spent(|s| s.clickhouse);
        let messages = prefill.messages;
        let cpu_seconds = reaped.cpu.as_secs_f64();
        DrainRun {
            consumer,
            messages,
            seconds,
            rate: messages as f64 / seconds,
            bytes_per_second: prefill.bytes.map(|bytes| bytes as f64 / seconds),
            broker_cpu_seconds,
            broker_cpu_seconds_per_million: broker_cpu_seconds
                .map(|cpu| cpu / messages as f64 * 1e6),
            clickhouse_cpu_seconds_per_million: clickhouse_cpu_seconds
                .map(|cpu| cpu / messages as f64 * 1e6),
            steal_percent: start
                .machine
                .zip(end.machine)
                .and_then(|(before, after)| before.steal_percent(after)),
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

/// What is read at a drain's start and end, from `/proc` (no request to any server):
/// the broker's, ClickHouse's and the machine's CPU time.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    broker: Option<Duration>,
    clickhouse: Option<Duration>,
    machine: Option<CpuTimes>,
}

impl Sample {
    fn now(bench: &Bench) -> Sample {
        Sample {
            at: Instant::now(),
            broker: bench.servers.rabbitmq.pid().and_then(cpu_time),
            clickhouse: bench.servers.clickhouse.pid().and_then(cpu_time),
            machine: CpuTimes::now(),
        }
    }
}

/// The click-consumer binary drains a queue prefilled with `messages` `clicks` into a
/// fresh table.
pub(crate) fn click_consumer(
    bench: &Bench,
    messages: u64,
    clicks: Clicks,
) -> anyhow::Result<DrainRun> {
    let target = Target::new("drain");
    let table = target.table(&bench.servers.clickhouse);
    create_table(bench, &target)?;
    if crate::extra::enabled() {
        crate::extra::add_columns(&bench.servers.clickhouse, &table);
    }
    table.stop_merges();
    let prefill = fill(bench, &target, messages, clicks)?;
    let start = Sample::now(bench);
    let mut service = Service::start(
        &bench.consumer_binary,
        &bench.servers,
        &target,
        &bench.args.consumer_env,
    )?;
    let spawned = service.spawned();
    let end = wait_drained(bench, &mut service, &table, &target, messages)?;
    let inserts = service.metric(INSERTS)? as u64;
    let mean_insert_ms = service.mean_insert_ms()?;
    let stopped = service.stop()?;
    let mut run = DrainRun::new(
        CLICK_CONSUMER,
        prefill,
        spawned,
        start,
        end,
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

/// The reference consumer (this binary's subcommand) drains a prefilled queue: with
/// click-consumer's default prefetch and a multiple-ack per `BATCH_SIZE` messages
/// ([`REFERENCE`]), or with the small window ([`REFERENCE_SMALL`]).
pub(crate) fn reference(bench: &Bench, name: &'static str) -> anyhow::Result<DrainRun> {
    let (prefetch, ack_every) = if name == REFERENCE_SMALL {
        (SMALL_PREFETCH, SMALL_ACK_EVERY)
    } else {
        (bench.prefetch, bench.batch_size as u64)
    };
    let target = Target::new("reference");
    let prefill = fill(bench, &target, bench.args.messages, Clicks::Normal)?;
    let start = Sample::now(bench);
    let mut command = Command::new(&bench.own_binary);
    command
        .arg("reference-consumer")
        .args(["--url", &bench.servers.lapin_url()])
        .args(["--queue", &target.queue])
        .args(["--messages", &bench.args.messages.to_string()])
        .args(["--prefetch", &prefetch.to_string()])
        .args(["--ack-every", &ack_every.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    let mut process = Watched::spawn("the reference consumer", command)?;
    // Sampled like click-consumer's drain (see `wait_drained`), so that the benchmark's
    // own reads of /proc load the machine alike during both.
    let deadline = Instant::now() + bench.drain_timeout();
    let reaped = loop {
        let _ = Sample::now(bench);
        if let Some(reaped) = process.wait_exit(SAMPLE)? {
            break reaped;
        }
        anyhow::ensure!(
            Instant::now() <= deadline,
            "the reference consumer did not finish in time"
        );
    };
    let end = Sample {
        at: reaped.at,
        ..Sample::now(bench)
    };
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
        name,
        prefill,
        process.spawned(),
        start,
        end,
        &reaped,
        peak_rss_kib,
    ))
}

/// Has click-consumer create its table (and declare its topology) with a short run on
/// the still empty queue, so that merges can be stopped before the first INSERT, with
/// the consumer's own DDL whatever it is.
fn create_table(bench: &Bench, target: &Target) -> anyhow::Result<()> {
    let mut service = Service::start(
        &bench.consumer_binary,
        &bench.servers,
        target,
        &bench.args.consumer_env,
    )?;
    service.wait_ready(READY_LIMIT)?;
    service.stop().context("stopping the table-creating run")?;
    Ok(())
}

/// Prefills the target's queue and checks that it holds exactly N ready messages.
fn fill(bench: &Bench, target: &Target, messages: u64, clicks: Clicks) -> anyhow::Result<Prefill> {
    let config = target.config(&bench.servers);
    let done = bench.runtime.block_on(prefill(&config, messages, clicks))?;
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

/// Waits until all N rows are in ClickHouse, nothing is ready in the queue and nothing
/// is unacknowledged. Returns when the last rows were stored, with the CPU times then.
///
/// When the last rows were stored is read afterwards, from ClickHouse's files: the
/// newest part's write time ([`Table::last_part_written`]). Nothing asks ClickHouse
/// during the drain: a `SELECT count()` every 20 ms cost ClickHouse 0.12 of a core
/// on a 2-core machine (measured), CPU taken from the broker during click-consumer's
/// drains only. The end is noticed by sampling click-consumer's
/// `click_consumer_rows_inserted_total` every 200 ms (0.33 ms of its CPU per sample,
/// measured, charged to it); once nothing is ready or unacknowledged, ClickHouse must
/// count exactly N rows (a duplicate fails the drain), and the part's write time must
/// agree with click-consumer's `click_consumer_last_insert_timestamp_seconds` (see
/// [`plausible`]). The CPU times are sampled every 20 ms from `/proc` (no request to
/// anyone; the reference's drain is sampled the same way), and the first sample at or
/// after the last part's write is the one used.
fn wait_drained(
    bench: &Bench,
    service: &mut Service,
    table: &Table<'_>,
    target: &Target,
    messages: u64,
) -> anyhow::Result<Sample> {
    let deadline = Instant::now() + bench.drain_timeout();
    let mut samples = Vec::new();
    let mut asked: Option<Instant> = None;
    let mut inserted = false;
    loop {
        samples.push(Sample::now(bench));
        if asked.is_none_or(|asked| asked.elapsed() >= POLL) {
            asked = Some(Instant::now());
            service.ensure_running()?;
            inserted = inserted || service.metric(ROWS_INSERTED).unwrap_or(0.0) >= messages as f64;
            if inserted
                && bench.runtime.block_on(bench.broker.ready(&target.queue))? == 0
                && service.metric(UNACKED).ok() == Some(0.0)
            {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "click-consumer did not drain {messages} messages within {:?} ({} rows stored)",
                    bench.drain_timeout(),
                    table.count()
                );
            }
        }
        thread::sleep(SAMPLE);
    }
    // The end was seen after the last sample: one more, which is after it.
    let noticed = Sample::now(bench);
    samples.push(noticed);
    let rows = table.count();
    anyhow::ensure!(
        rows == messages,
        "click-consumer drained {messages} messages, but ClickHouse counts {rows} rows"
    );
    let written = table.last_part_written()?;
    let last_insert = service.metric(LAST_INSERT)?;
    plausible(written, last_insert)?;
    let stored = service
        .at(written)
        .context("the table's newest part is older than the consumer")?;
    let noticed = noticed.at;
    anyhow::ensure!(
        stored <= noticed,
        "the table's newest part was written after the drain was seen to end"
    );
    eprintln!(
        "  the last part was written {:.0} ms before the end of the drain was noticed",
        (noticed - stored).as_secs_f64() * 1e3
    );
    let then = samples
        .iter()
        .find(|sample| sample.at >= stored)
        .copied()
        .context("no CPU sample after the last part was written")?;
    Ok(Sample { at: stored, ..then })
}

/// An error unless `written` (a part's write time, with the coarse clock's tick added)
/// and `last_insert` (the consumer's wall clock when its last INSERT was answered, Unix
/// seconds) tell the same story: the part was written before the answer, and not long
/// before. Guards the drain's end against file times of a coarser filesystem, a stale
/// clock or a part touched later, each of which would misplace it.
fn plausible(written: SystemTime, last_insert: f64) -> anyhow::Result<()> {
    let written = written
        .duration_since(UNIX_EPOCH)
        .context("a part written before 1970")?
        .as_secs_f64();
    let early = last_insert - written;
    anyhow::ensure!(
        (-PART_TIME_SLACK..=INSERT_ANSWER_LIMIT).contains(&early),
        "the newest part's file time is {early:.3} s before click-consumer's last INSERT \
         was answered; expected between -{PART_TIME_SLACK} and {INSERT_ANSWER_LIMIT} s"
    );
    Ok(())
}

/// One repeat of the drain comparison.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Comparison {
    pub(crate) repeat: u32,
    /// The order the consumers drained in.
    pub(crate) order: Vec<&'static str>,
    pub(crate) click_consumer: DrainRun,
    /// Same window as click-consumer (prefetch 2 x BATCH_SIZE, ack per BATCH_SIZE).
    pub(crate) reference: Option<DrainRun>,
    /// Prefetch 1,000, a multiple-ack per 100 messages.
    pub(crate) reference_small: Option<DrainRun>,
    /// click-consumer against [`Comparison::reference`].
    pub(crate) ratios: Option<Ratios>,
    /// click-consumer against [`Comparison::reference_small`].
    pub(crate) ratios_small: Option<Ratios>,
}

/// click-consumer's figures over a reference's, within one repeat.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Ratios {
    /// Drain rate (higher is better for click-consumer).
    pub(crate) rate: f64,
    /// CPU per message of the consumer process.
    pub(crate) cpu: f64,
    /// The broker's CPU per message.
    pub(crate) broker_cpu: Option<f64>,
}

impl Ratios {
    fn of(click: &DrainRun, reference: &DrainRun) -> Ratios {
        Ratios {
            rate: click.rate / reference.rate,
            cpu: click.cpu_seconds_per_million / reference.cpu_seconds_per_million,
            broker_cpu: click
                .broker_cpu_seconds_per_million
                .zip(reference.broker_cpu_seconds_per_million)
                .map(|(c, r)| c / r),
        }
    }
}

/// Runs repeat `repeat`: click-consumer and both references (unless skipped), the
/// first one rotating from repeat to repeat, so each goes first, second and last.
pub(crate) fn compare(bench: &Bench, repeat: u32) -> anyhow::Result<Comparison> {
    let mut order = vec![CLICK_CONSUMER];
    if !bench.args.skip_reference {
        order.extend([REFERENCE, REFERENCE_SMALL]);
    }
    let first = (repeat as usize).saturating_sub(1) % order.len();
    order.rotate_left(first);
    let mut click = None;
    let mut reference_run = None;
    let mut small = None;
    for &consumer in &order {
        match consumer {
            CLICK_CONSUMER => {
                click = Some(measured(consumer, || {
                    click_consumer(bench, bench.args.messages, Clicks::Normal)
                })?);
            }
            REFERENCE => reference_run = Some(measured(consumer, || reference(bench, consumer))?),
            _ => small = Some(measured(consumer, || reference(bench, consumer))?),
        }
    }
    let click_consumer = click.expect("click-consumer always drains");
    Ok(Comparison {
        repeat,
        ratios: reference_run
            .as_ref()
            .map(|r| Ratios::of(&click_consumer, r)),
        ratios_small: small.as_ref().map(|r| Ratios::of(&click_consumer, r)),
        order,
        click_consumer,
        reference: reference_run,
        reference_small: small,
    })
}

/// One large-message drain by click-consumer at its defaults.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct LargeDrain {
    pub(crate) bytes_each: usize,
    pub(crate) run: DrainRun,
}

/// click-consumer drains `messages` valid clicks of `--large-bytes` each.
pub(crate) fn large(bench: &Bench, messages: u64) -> anyhow::Result<LargeDrain> {
    let bytes_each = bench.args.large_bytes;
    let run = measured(CLICK_CONSUMER, || {
        click_consumer(bench, messages, Clicks::Large(bytes_each))
    })?;
    Ok(LargeDrain { bytes_each, run })
}

/// Runs one drain, saying so on stderr.
fn measured(
    consumer: &str,
    drain: impl FnOnce() -> anyhow::Result<DrainRun>,
) -> anyhow::Result<DrainRun> {
    eprintln!("  {consumer}:");
    let run = drain().with_context(|| format!("drain by {consumer}"))?;
    eprintln!(
        "  {consumer} drained {} messages in {:.2} s: {:.0} msg/s{}, {:.2} CPU-s per 1M (broker {}), peak RSS {:.1} MiB",
        run.messages,
        run.seconds,
        run.rate,
        run.bytes_per_second
            .map_or(String::new(), |b| format!(" ({:.1} MB/s)", b / 1e6)),
        run.cpu_seconds_per_million,
        run.broker_cpu_seconds_per_million
            .map_or("?".to_owned(), |b| format!("{b:.2}")),
        run.peak_rss_mib
    );
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_must_be_written_shortly_before_the_last_insert_was_answered() {
        let at = |seconds: f64| UNIX_EPOCH + Duration::from_secs_f64(seconds);
        assert!(plausible(at(1000.0), 1000.02).is_ok());
        assert!(plausible(at(1000.005), 1000.0).is_ok(), "within a tick");
        assert!(
            plausible(at(1000.5), 1000.0).is_err(),
            "written after the answer"
        );
        assert!(
            plausible(at(990.0), 1000.0).is_err(),
            "long before the answer"
        );
    }
}
