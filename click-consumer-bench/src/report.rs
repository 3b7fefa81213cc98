//! The results: their JSON form, the printed report (every run, the medians, the
//! targets with pass/fail) and a Markdown table for the README.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context;
use click_consumer::config::defaults;
use serde::Serialize;

use crate::bench::Bench;
use crate::drain::{Comparison, DrainRun};
use crate::latency::{self, Latency};
use crate::machine::{self, Machine, RunDate};
use crate::stats::median;
use crate::table::SMALL_INSERT_ROWS;

/// click-consumer's drain rate must be at least this share of the reference's.
const MIN_RATE_RATIO: f64 = 0.9;
/// click-consumer's CPU per message may be at most this multiple of the reference's.
const MAX_CPU_RATIO: f64 = 2.0;
const MAX_RSS_MIB: f64 = 64.0;
/// INSERTs allowed beyond ceil(N / BATCH_SIZE) in one drain.
const INSERT_TAIL: u64 = 2;

#[derive(Debug, Serialize)]
pub(crate) struct Results {
    date: RunDate,
    git_commit: Option<String>,
    machine: Machine,
    settings: Settings,
    drain: Drain,
    latency: Option<Latency>,
    targets: Vec<Check>,
}

#[derive(Debug, Serialize)]
struct Settings {
    messages: u64,
    repeats: u32,
    batch_size: usize,
    batch_timeout_ms: u64,
    prefetch: u16,
    latency_rate: Option<u32>,
    latency_seconds: Option<u64>,
    reference: bool,
    consumer_binary: String,
    consumer_version: Option<String>,
}

#[derive(Debug, Serialize)]
struct Drain {
    runs: Vec<Comparison>,
    medians: Medians,
}

#[derive(Debug, Serialize)]
struct Medians {
    click_consumer: Summary,
    reference: Option<Summary>,
    /// Median of the runs' ratios (each measured within one repeat).
    rate_ratio: Option<f64>,
    cpu_ratio: Option<f64>,
}

/// Medians of one consumer's drains.
#[derive(Debug, Serialize)]
struct Summary {
    seconds: f64,
    rate: f64,
    cpu_seconds_per_million: f64,
    peak_rss_mib: f64,
    /// The largest peak RSS of all runs.
    worst_peak_rss_mib: f64,
    inserts: Option<f64>,
    mean_insert_ms: Option<f64>,
    median_rows_per_insert: Option<f64>,
}

/// A target and whether this run met it.
#[derive(Debug, Serialize)]
struct Check {
    target: String,
    measured: String,
    /// `None`: not measured in this run.
    pass: Option<bool>,
}

impl Results {
    pub(crate) fn new(
        bench: &Bench,
        date: RunDate,
        machine: Machine,
        runs: Vec<Comparison>,
        latency: Option<Latency>,
    ) -> Results {
        let args = &bench.args;
        let settings = Settings {
            messages: args.messages,
            repeats: args.repeats,
            batch_size: defaults::BATCH_SIZE,
            batch_timeout_ms: defaults::BATCH_TIMEOUT_MS,
            prefetch: bench.prefetch,
            latency_rate: latency.as_ref().map(|l| l.target_rate),
            latency_seconds: latency.as_ref().map(|l| l.target_seconds),
            reference: !args.skip_reference,
            consumer_binary: bench.consumer_binary.display().to_string(),
            consumer_version: machine::version_of(&bench.consumer_binary),
        };
        let drain = Drain {
            medians: Medians::of(&runs),
            runs,
        };
        let targets = checks(&settings, &drain, latency.as_ref());
        Results {
            date,
            git_commit: machine::git_commit(),
            machine,
            settings,
            drain,
            latency,
            targets,
        }
    }
}

impl Medians {
    fn of(runs: &[Comparison]) -> Medians {
        let clicks: Vec<&DrainRun> = runs.iter().map(|c| &c.click_consumer).collect();
        let references: Vec<&DrainRun> = runs.iter().filter_map(|c| c.reference.as_ref()).collect();
        Medians {
            click_consumer: Summary::of(&clicks),
            reference: (!references.is_empty()).then(|| Summary::of(&references)),
            rate_ratio: median(runs.iter().filter_map(|c| c.rate_ratio)),
            cpu_ratio: median(runs.iter().filter_map(|c| c.cpu_ratio)),
        }
    }
}

impl Summary {
    fn of(runs: &[&DrainRun]) -> Summary {
        let med = |of: fn(&DrainRun) -> f64| median(runs.iter().map(|r| of(r))).unwrap_or(f64::NAN);
        Summary {
            seconds: med(|r| r.seconds),
            rate: med(|r| r.rate),
            cpu_seconds_per_million: med(|r| r.cpu_seconds_per_million),
            peak_rss_mib: med(|r| r.peak_rss_mib),
            worst_peak_rss_mib: runs.iter().map(|r| r.peak_rss_mib).fold(f64::NAN, f64::max),
            inserts: median(runs.iter().filter_map(|r| r.inserts.map(|i| i as f64))),
            mean_insert_ms: median(runs.iter().filter_map(|r| r.mean_insert_ms)),
            median_rows_per_insert: median(
                runs.iter()
                    .filter_map(|r| r.parts.as_ref().map(|p| p.median_rows)),
            ),
        }
    }
}

fn checks(settings: &Settings, drain: &Drain, latency: Option<&Latency>) -> Vec<Check> {
    let medians = &drain.medians;
    let max_inserts = settings.messages.div_ceil(settings.batch_size as u64) + INSERT_TAIL;
    let worst_inserts = drain
        .runs
        .iter()
        .filter_map(|c| {
            let run = &c.click_consumer;
            Some(run.inserts?.max(run.parts.as_ref()?.count))
        })
        .max();
    let small_inserts = drain
        .runs
        .iter()
        .filter_map(|c| c.click_consumer.parts.as_ref())
        .map(|p| p.small_not_last())
        .max();
    let mut worst_rss = medians.click_consumer.worst_peak_rss_mib;
    if let Some(latency) = latency {
        worst_rss = worst_rss.max(latency.consumer_peak_rss_mib);
    }
    let p99_limit = latency::p99_limit_ms();
    vec![
        Check::new(
            format!("drain rate >= {MIN_RATE_RATIO} x reference"),
            medians
                .rate_ratio
                .map(|r| (format!("median ratio {r:.2}"), r >= MIN_RATE_RATIO)),
        ),
        Check::new(
            format!("CPU per message <= {MAX_CPU_RATIO} x reference"),
            medians
                .cpu_ratio
                .map(|r| (format!("median ratio {r:.2}"), r <= MAX_CPU_RATIO)),
        ),
        Check::new(
            format!("peak RSS <= {MAX_RSS_MIB} MiB"),
            Some((
                format!("largest {worst_rss:.1} MiB"),
                worst_rss <= MAX_RSS_MIB,
            )),
        ),
        Check::new(
            format!("p99 latency <= BATCH_TIMEOUT_MS + 250 = {p99_limit:.0} ms"),
            latency.map(|l| (format!("{:.0} ms", l.p99_ms), l.p99_ms <= p99_limit)),
        ),
        Check::new(
            format!("rows per INSERT >= {SMALL_INSERT_ROWS}, except the last"),
            small_inserts.map(|n| {
                (
                    format!("{n} smaller INSERTs before the last (worst drain)"),
                    n == 0,
                )
            }),
        ),
        Check::new(
            format!("INSERTs <= ceil(N / BATCH_SIZE) + {INSERT_TAIL} = {max_inserts}"),
            worst_inserts.map(|n| (format!("{n} (worst drain)"), n <= max_inserts)),
        ),
    ]
}

impl Check {
    fn new(target: String, outcome: Option<(String, bool)>) -> Check {
        let (measured, pass) = match outcome {
            Some((measured, pass)) => (measured, Some(pass)),
            None => ("not measured".to_owned(), None),
        };
        Check {
            target,
            measured,
            pass,
        }
    }
}

/// Writes the JSON file (default `bench-results/<UTC timestamp>.json`); returns its path.
pub(crate) fn write(results: &Results, path: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = path.map_or_else(
        || PathBuf::from(format!("bench-results/{}.json", results.date.compact)),
        Path::to_path_buf,
    );
    if let Some(dir) = path.parent().filter(|dir| !dir.as_os_str().is_empty()) {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let json = serde_json::to_string_pretty(results)?;
    fs::write(&path, json + "\n").with_context(|| format!("cannot write {}", path.display()))?;
    Ok(path)
}

/// Prints the whole report on stdout.
pub(crate) fn print(results: &Results) {
    print_header(results);
    print_drains(&results.drain);
    if let Some(latency) = &results.latency {
        print_latency(latency);
    }
    print_targets(&results.targets);
    print_markdown(results);
}

fn print_header(results: &Results) {
    let m = &results.machine;
    let s = &results.settings;
    println!();
    println!("== click-consumer benchmark ==");
    println!(
        "date {}, commit {}, {}",
        results.date.utc,
        results.git_commit.as_deref().unwrap_or("unknown"),
        s.consumer_version.as_deref().unwrap_or("click-consumer")
    );
    println!(
        "machine: {}, {} cores, {:.1} GiB, Linux {}",
        m.cpu_model, m.nproc, m.memory_gib, m.kernel
    );
    println!(
        "servers: RabbitMQ {}, ClickHouse {} (private, on the same machine)",
        m.rabbitmq, m.clickhouse
    );
    println!(
        "click-consumer at its defaults: BATCH_SIZE {}, BATCH_TIMEOUT_MS {}, prefetch {}",
        s.batch_size, s.batch_timeout_ms, s.prefetch
    );
}

const DRAIN_HEADER: &str = "run  consumer          seconds      msg/s  CPU-s/1M  RSS MiB  INSERTs  ms/INSERT  parts  rows/part min/med/max  prefill msg/s";

fn print_drains(drain: &Drain) {
    let runs = &drain.runs;
    let messages = runs.first().map_or(0, |c| c.click_consumer.messages);
    println!();
    println!(
        "Drain of {} queued clicks: time from the consumer's start until the queue is drained",
        grouped(messages as f64)
    );
    println!(
        "(click-consumer: all rows in ClickHouse and acknowledged; CPU: user+sys of the consumer \
         process over its life; RSS: its peak, VmHWM; * = drained first)"
    );
    println!("{DRAIN_HEADER}");
    for comparison in runs {
        let first = comparison.first;
        let label = comparison.repeat.to_string();
        print_run(&label, &comparison.click_consumer, first);
        if let Some(reference) = &comparison.reference {
            print_run(&label, reference, first);
        }
        print_ratios(&label, comparison.rate_ratio, comparison.cpu_ratio);
    }
    let medians = &drain.medians;
    print_summary("click-consumer", &medians.click_consumer);
    if let Some(reference) = &medians.reference {
        print_summary("reference", reference);
    }
    print_ratios("med", medians.rate_ratio, medians.cpu_ratio);
}

fn print_run(label: &str, run: &DrainRun, first: &str) {
    let mark = if run.consumer == first { "*" } else { " " };
    let parts = run.parts.as_ref().map_or("-".to_owned(), |p| {
        format!("{}/{}/{}", p.min_rows, p.median_rows, p.max_rows)
    });
    println!(
        "{label:<4} {:<16} {:>8.2} {:>10} {:>9.2} {:>8.1} {:>8} {:>10} {:>6}  {:<22} {:>13}",
        format!("{}{mark}", run.consumer),
        run.seconds,
        grouped(run.rate),
        run.cpu_seconds_per_million,
        run.peak_rss_mib,
        run.inserts.map_or("-".to_owned(), |n| n.to_string()),
        run.mean_insert_ms
            .map_or("-".to_owned(), |ms| format!("{ms:.1}")),
        run.parts
            .as_ref()
            .map_or("-".to_owned(), |p| p.count.to_string()),
        parts,
        grouped(run.prefill.rate),
    );
}

fn print_summary(consumer: &str, summary: &Summary) {
    println!(
        "{:<4} {consumer:<16} {:>8.2} {:>10} {:>9.2} {:>8.1} {:>8} {:>10}",
        "med",
        summary.seconds,
        grouped(summary.rate),
        summary.cpu_seconds_per_million,
        summary.peak_rss_mib,
        summary
            .inserts
            .map_or("-".to_owned(), |n| format!("{n:.0}")),
        summary
            .mean_insert_ms
            .map_or("-".to_owned(), |ms| format!("{ms:.1}")),
    );
}

fn print_ratios(label: &str, rate: Option<f64>, cpu: Option<f64>) {
    if let (Some(rate), Some(cpu)) = (rate, cpu) {
        println!(
            "{label:<4} {:<16} {:>8} {:>10.2} {:>9.2}",
            "ratio c-c/ref", "", rate, cpu
        );
    }
}

fn print_latency(l: &Latency) {
    println!();
    println!(
        "Latency at a steady {} msg/s for {} s: publish -> first seen in ClickHouse (polled every {:.0} ms)",
        grouped(f64::from(l.target_rate)),
        l.target_seconds,
        l.poll_interval_ms
    );
    println!(
        "  published {} at {:.1} msg/s (at most {:.1} ms behind schedule, {} nacked); seen {}",
        grouped(l.published as f64),
        l.achieved_rate,
        l.max_behind_schedule_ms,
        l.nacked,
        grouped(l.seen as f64)
    );
    println!(
        "  p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; {} INSERTs; click-consumer used {:.1} % of a core, peak RSS {:.1} MiB",
        l.p50_ms, l.p99_ms, l.max_ms, l.inserts, l.consumer_cpu_percent, l.consumer_peak_rss_mib
    );
}

fn print_targets(checks: &[Check]) {
    println!();
    println!("Targets");
    for check in checks {
        let verdict = match check.pass {
            Some(true) => "PASS",
            Some(false) => "FAIL",
            None => "----",
        };
        println!("  {verdict}  {:<52} {}", check.target, check.measured);
    }
}

fn print_markdown(results: &Results) {
    let s = &results.settings;
    let m = &results.drain.medians;
    let c = &m.click_consumer;
    let r = m.reference.as_ref();
    let dash = || "—".to_owned();
    println!();
    println!("Markdown (for the README):");
    println!();
    println!(
        "| {} queued clicks, median of {} | click-consumer | reference (lapin, no work) | ratio (median of the runs' ratios) |",
        grouped(s.messages as f64),
        s.repeats
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| drain rate (msg/s) | {} | {} | {} |",
        grouped(c.rate),
        r.map_or_else(dash, |r| grouped(r.rate)),
        m.rate_ratio.map_or_else(dash, |x| format!("{x:.2}"))
    );
    println!(
        "| CPU-seconds per 1M messages | {:.2} | {} | {} |",
        c.cpu_seconds_per_million,
        r.map_or_else(dash, |r| format!("{:.2}", r.cpu_seconds_per_million)),
        m.cpu_ratio.map_or_else(dash, |x| format!("{x:.2}"))
    );
    println!(
        "| peak RSS (MiB) | {:.1} | {} | |",
        c.peak_rss_mib,
        r.map_or_else(dash, |r| format!("{:.1}", r.peak_rss_mib))
    );
    println!(
        "| INSERTs (median rows, mean duration per INSERT) | {} ({} rows, {} ms) | | |",
        c.inserts.map_or_else(dash, |n| format!("{n:.0}")),
        c.median_rows_per_insert.map_or_else(dash, grouped),
        c.mean_insert_ms.map_or_else(dash, |ms| format!("{ms:.0}"))
    );
    if let Some(l) = &results.latency {
        println!(
            "| latency at {} msg/s, p50 / p99 / max (ms) | {:.0} / {:.0} / {:.0} | | |",
            grouped(f64::from(l.target_rate)),
            l.p50_ms,
            l.p99_ms,
            l.max_ms
        );
    }
    let machine = &results.machine;
    println!();
    println!(
        "Measured {} with `scripts/bench.sh` on {} ({} cores), RabbitMQ {} and ClickHouse {} on the same machine, commit {}.",
        &results.date.utc[..10],
        machine.cpu_model,
        machine.nproc,
        machine.rabbitmq,
        machine.clickhouse,
        results.git_commit.as_deref().unwrap_or("unknown")
    );
}

/// `1234567.8` as `1,234,568`.
fn grouped(value: f64) -> String {
    if !value.is_finite() {
        return value.to_string();
    }
    let digits = format!("{:.0}", value.abs());
    let mut out = String::new();
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    if value < -0.5 {
        out.insert(0, '-');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::grouped;

    #[test]
    fn groups_thousands() {
        assert_eq!(grouped(0.0), "0");
        assert_eq!(grouped(999.4), "999");
        assert_eq!(grouped(1000.0), "1,000");
        assert_eq!(grouped(1_234_567.8), "1,234,568");
    }
}
