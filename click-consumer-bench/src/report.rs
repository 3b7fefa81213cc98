//! The results: their JSON form, the printed report (every run, the spread of each
//! figure, the targets with pass/fail) and a Markdown table for the README.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::Context;
use serde::Serialize;

use crate::bench::Bench;
use crate::drain::{
    Comparison, DrainRun, LargeDrain, REFERENCE, REFERENCE_SMALL, Ratios, SMALL_ACK_EVERY,
    SMALL_PREFETCH,
};
use crate::latency::{self, Latency};
use crate::machine::{self, Machine, RunDate};
use crate::stats::median;
use crate::table::SMALL_INSERT_ROWS;

/// click-consumer's drain rate must be at least this share of the reference's.
const MIN_RATE_RATIO: f64 = 0.95;
/// click-consumer's CPU per message may be at most this multiple of the reference's.
const MAX_CPU_RATIO: f64 = 1.1;
/// Peak RSS draining normal clicks.
const MAX_RSS_MIB: f64 = 24.0;
/// Peak RSS draining large clicks, at the defaults (a 256 MiB container).
const MAX_LARGE_RSS_MIB: f64 = 256.0;
/// INSERTs allowed beyond ceil(N / BATCH_SIZE) in one drain.
const INSERT_TAIL: u64 = 2;

#[derive(Debug, Serialize)]
pub(crate) struct Results {
    date: RunDate,
    git_commit: Option<String>,
    machine: Machine,
    settings: Settings,
    drain: Drain,
    large: Vec<LargeDrain>,
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
    consumer_env: Vec<String>,
    latency_rate: Option<u32>,
    latency_seconds: Option<u64>,
    reference: bool,
    consumer_binary: String,
    consumer_version: Option<String>,
}

#[derive(Debug, Serialize)]
struct Drain {
    runs: Vec<Comparison>,
    summaries: Summaries,
}

/// Minimum, median and maximum of one figure over the repeats.
#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Spread {
    min: f64,
    median: f64,
    max: f64,
}

impl Spread {
    fn of(values: impl IntoIterator<Item = f64>) -> Option<Spread> {
        let values: Vec<f64> = values.into_iter().collect();
        Some(Spread {
            median: median(values.iter().copied())?,
            min: values.iter().copied().fold(f64::INFINITY, f64::min),
            max: values.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        })
    }

    fn show(self, decimals: usize) -> String {
        format!(
            "{:.d$} / {:.d$} / {:.d$}",
            self.min,
            self.median,
            self.max,
            d = decimals
        )
    }
}

#[derive(Debug, Serialize)]
struct Summaries {
    click_consumer: Summary,
    reference: Option<Summary>,
    reference_small: Option<Summary>,
    /// Spread of the runs' ratios (each measured within one repeat).
    ratios: Option<RatioSpread>,
    ratios_small: Option<RatioSpread>,
}

#[derive(Debug, Serialize)]
struct RatioSpread {
    rate: Spread,
    cpu: Spread,
    broker_cpu: Option<Spread>,
}

impl RatioSpread {
    fn of(ratios: &[Ratios]) -> Option<RatioSpread> {
        Some(RatioSpread {
            rate: Spread::of(ratios.iter().map(|r| r.rate))?,
            cpu: Spread::of(ratios.iter().map(|r| r.cpu))?,
            broker_cpu: Spread::of(ratios.iter().filter_map(|r| r.broker_cpu)),
        })
    }
}

/// One consumer's drains.
#[derive(Debug, Serialize)]
struct Summary {
    seconds: Spread,
    rate: Spread,
    cpu_seconds_per_million: Spread,
    broker_cpu_seconds_per_million: Option<Spread>,
    clickhouse_cpu_seconds_per_million: Option<Spread>,
    steal_percent: Option<Spread>,
    peak_rss_mib: Spread,
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
        large: Vec<LargeDrain>,
        latency: Option<Latency>,
    ) -> Results {
        let args = &bench.args;
        let settings = Settings {
            messages: args.messages,
            repeats: args.repeats,
            batch_size: bench.batch_size,
            batch_timeout_ms: bench.batch_timeout_ms,
            prefetch: bench.prefetch,
            consumer_env: args.consumer_env.clone(),
            latency_rate: latency.as_ref().map(|l| l.target_rate),
            latency_seconds: latency.as_ref().map(|l| l.target_seconds),
            reference: !args.skip_reference,
            consumer_binary: bench.consumer_binary.display().to_string(),
            consumer_version: machine::version_of(&bench.consumer_binary),
        };
        let drain = Drain {
            summaries: Summaries::of(&runs),
            runs,
        };
        let targets = checks(&settings, &drain, &large, latency.as_ref());
        Results {
            date,
            git_commit: machine::git_commit(),
            machine,
            settings,
            drain,
            large,
            latency,
            targets,
        }
    }
}

impl Summaries {
    fn of(runs: &[Comparison]) -> Summaries {
        let clicks: Vec<&DrainRun> = runs.iter().map(|c| &c.click_consumer).collect();
        let of = |pick: fn(&Comparison) -> Option<&DrainRun>| {
            let picked: Vec<&DrainRun> = runs.iter().filter_map(pick).collect();
            Summary::of(&picked)
        };
        let ratios = |pick: fn(&Comparison) -> Option<Ratios>| {
            let picked: Vec<Ratios> = runs.iter().filter_map(pick).collect();
            RatioSpread::of(&picked)
        };
        Summaries {
            click_consumer: Summary::of(&clicks).expect("at least one repeat"),
            reference: of(|c| c.reference.as_ref()),
            reference_small: of(|c| c.reference_small.as_ref()),
            ratios: ratios(|c| c.ratios),
            ratios_small: ratios(|c| c.ratios_small),
        }
    }
}

impl Summary {
    fn of(runs: &[&DrainRun]) -> Option<Summary> {
        let spread = |of: fn(&DrainRun) -> f64| Spread::of(runs.iter().map(|r| of(r)));
        Some(Summary {
            seconds: spread(|r| r.seconds)?,
            rate: spread(|r| r.rate)?,
            cpu_seconds_per_million: spread(|r| r.cpu_seconds_per_million)?,
            broker_cpu_seconds_per_million: Spread::of(
                runs.iter().filter_map(|r| r.broker_cpu_seconds_per_million),
            ),
            clickhouse_cpu_seconds_per_million: Spread::of(
                runs.iter()
                    .filter_map(|r| r.clickhouse_cpu_seconds_per_million),
            ),
            steal_percent: Spread::of(runs.iter().filter_map(|r| r.steal_percent)),
            peak_rss_mib: spread(|r| r.peak_rss_mib)?,
            inserts: median(runs.iter().filter_map(|r| r.inserts.map(|i| i as f64))),
            mean_insert_ms: median(runs.iter().filter_map(|r| r.mean_insert_ms)),
            median_rows_per_insert: median(
                runs.iter()
                    .filter_map(|r| r.parts.as_ref().map(|p| p.median_rows)),
            ),
        })
    }
}

fn checks(
    settings: &Settings,
    drain: &Drain,
    large: &[LargeDrain],
    latency: Option<&Latency>,
) -> Vec<Check> {
    let summaries = &drain.summaries;
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
    let rss = summaries.click_consumer.peak_rss_mib.median;
    let worst_large = large
        .iter()
        .map(|l| l.run.peak_rss_mib)
        .fold(None, |worst: Option<f64>, rss| {
            Some(worst.map_or(rss, |w| w.max(rss)))
        });
    let ratios = summaries.ratios.as_ref();
    let p99_limit = latency::p99_limit_ms(settings.batch_timeout_ms);
    vec![
        Check::new(
            format!("drain rate >= {MIN_RATE_RATIO} x reference (median)"),
            ratios.map(|r| {
                (
                    format!("ratio min/med/max {}", r.rate.show(2)),
                    r.rate.median >= MIN_RATE_RATIO,
                )
            }),
        ),
        Check::new(
            format!("CPU per message <= {MAX_CPU_RATIO} x reference (median)"),
            ratios.map(|r| {
                (
                    format!("ratio min/med/max {}", r.cpu.show(2)),
                    r.cpu.median <= MAX_CPU_RATIO,
                )
            }),
        ),
        Check::new(
            format!("peak RSS draining normal clicks <= {MAX_RSS_MIB} MiB (median)"),
            Some((
                format!(
                    "min/med/max {} MiB",
                    summaries.click_consumer.peak_rss_mib.show(1)
                ),
                rss <= MAX_RSS_MIB,
            )),
        ),
        Check::new(
            format!("peak RSS draining large clicks <= {MAX_LARGE_RSS_MIB} MiB (every drain)"),
            worst_large.map(|worst| {
                (
                    format!("largest {worst:.1} MiB"),
                    worst <= MAX_LARGE_RSS_MIB,
                )
            }),
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
    print_large(&results.large);
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
        "click-consumer: BATCH_SIZE {}, BATCH_TIMEOUT_MS {}, prefetch {}{}",
        s.batch_size,
        s.batch_timeout_ms,
        s.prefetch,
        if s.consumer_env.is_empty() {
            String::new()
        } else {
            format!("; overridden: {}", s.consumer_env.join(" "))
        }
    );
    println!(
        "references (lapin, no work): `{REFERENCE}` prefetch {} with a multiple-ack per {}; `{REFERENCE_SMALL}` prefetch {SMALL_PREFETCH} with one per {SMALL_ACK_EVERY}",
        s.prefetch, s.batch_size
    );
}

const DRAIN_HEADER: &str = "run  consumer          seconds      msg/s  CPU-s/1M  broker CPU-s/1M  CH CPU-s/1M  steal %  RSS MiB  INSERTs  ms/INSERT  parts  rows/part min/med/max  prefill msg/s";

fn print_drains(drain: &Drain) {
    let runs = &drain.runs;
    let messages = runs.first().map_or(0, |c| c.click_consumer.messages);
    println!();
    println!(
        "Drain of {} queued clicks: time from the consumer's start until the last message is stored (reference: acknowledged)",
        grouped(messages as f64)
    );
    println!(
        "(CPU: user+sys of the consumer process over its life; broker CPU: the RabbitMQ node's \
         over the drain; CH CPU: ClickHouse's over the drain; steal: the machine's CPU time \
         taken by the hypervisor over the drain; \
         RSS: the consumer's peak, VmHWM; * = drained first)"
    );
    println!("{DRAIN_HEADER}");
    for comparison in runs {
        let first = comparison.order.first().copied().unwrap_or_default();
        let label = comparison.repeat.to_string();
        print_run(&label, &comparison.click_consumer, first);
        for reference in [&comparison.reference, &comparison.reference_small]
            .into_iter()
            .flatten()
        {
            print_run(&label, reference, first);
        }
        print_ratios(&label, REFERENCE, comparison.ratios);
        print_ratios(&label, REFERENCE_SMALL, comparison.ratios_small);
    }
    let summaries = &drain.summaries;
    println!();
    println!("Spread over the repeats: min / median / max");
    print_summary("click-consumer", &summaries.click_consumer);
    if let Some(reference) = &summaries.reference {
        print_summary(REFERENCE, reference);
    }
    if let Some(reference) = &summaries.reference_small {
        print_summary(REFERENCE_SMALL, reference);
    }
    for (name, ratios) in [
        (REFERENCE, &summaries.ratios),
        (REFERENCE_SMALL, &summaries.ratios_small),
    ] {
        if let Some(r) = ratios {
            println!(
                "  click-consumer / {name}: rate {}, CPU {}, broker CPU {}",
                r.rate.show(2),
                r.cpu.show(2),
                shown(r.broker_cpu, 2)
            );
        }
    }
}

fn print_run(label: &str, run: &DrainRun, first: &str) {
    let mark = if run.consumer == first { "*" } else { " " };
    let parts = run.parts.as_ref().map_or("-".to_owned(), |p| {
        format!("{}/{}/{}", p.min_rows, p.median_rows, p.max_rows)
    });
    println!(
        "{label:<4} {:<16} {:>8.2} {:>10} {:>9.2} {:>16} {:>12} {:>8} {:>8.1} {:>8} {:>10} {:>6}  {:<22} {:>13}",
        format!("{}{mark}", run.consumer),
        run.seconds,
        grouped(run.rate),
        run.cpu_seconds_per_million,
        fixed(run.broker_cpu_seconds_per_million, 2),
        fixed(run.clickhouse_cpu_seconds_per_million, 2),
        fixed(run.steal_percent, 1),
        run.peak_rss_mib,
        run.inserts.map_or("-".to_owned(), |n| n.to_string()),
        fixed(run.mean_insert_ms, 1),
        run.parts
            .as_ref()
            .map_or("-".to_owned(), |p| p.count.to_string()),
        parts,
        grouped(run.prefill.rate),
    );
}

/// `value` with `decimals` decimals, or `-` when it was not measured.
fn fixed(value: Option<f64>, decimals: usize) -> String {
    value.map_or_else(|| "-".to_owned(), |v| format!("{v:.decimals$}"))
}

/// A spread with `decimals` decimals, or `-` when it was not measured.
fn shown(spread: Option<Spread>, decimals: usize) -> String {
    spread.map_or_else(|| "-".to_owned(), |s| s.show(decimals))
}

fn print_summary(consumer: &str, summary: &Summary) {
    println!(
        "  {consumer:<16} seconds {}, msg/s {} / {} / {}, CPU-s/1M {}, broker CPU-s/1M {}, ClickHouse CPU-s/1M {}, steal % {}, RSS MiB {}",
        summary.seconds.show(2),
        grouped(summary.rate.min),
        grouped(summary.rate.median),
        grouped(summary.rate.max),
        summary.cpu_seconds_per_million.show(2),
        shown(summary.broker_cpu_seconds_per_million, 2),
        shown(summary.clickhouse_cpu_seconds_per_million, 2),
        shown(summary.steal_percent, 1),
        summary.peak_rss_mib.show(1),
    );
}

fn print_ratios(label: &str, name: &str, ratios: Option<Ratios>) {
    if let Some(r) = ratios {
        println!(
            "{label:<4} {:<16} rate {:.2}, CPU {:.2}, broker CPU {}",
            format!("c-c/{name}"),
            r.rate,
            r.cpu,
            fixed(r.broker_cpu, 2)
        );
    }
}

fn print_large(large: &[LargeDrain]) {
    if large.is_empty() {
        return;
    }
    println!();
    println!(
        "Large-message drains: click-consumer at the settings above, valid clicks of ~{} KB each",
        large[0].bytes_each / 1000
    );
    println!("messages  seconds   msg/s   MB/s  CPU-s  broker CPU-s  peak RSS MiB  INSERTs");
    for l in large {
        let r = &l.run;
        println!(
            "{:>8} {:>8.2} {:>7.0} {:>6.1} {:>6.2} {:>13} {:>13.1} {:>8}",
            r.messages,
            r.seconds,
            r.rate,
            r.bytes_per_second.unwrap_or(f64::NAN) / 1e6,
            r.cpu_seconds,
            fixed(r.broker_cpu_seconds, 2),
            r.peak_rss_mib,
            r.inserts.map_or("-".to_owned(), |n| n.to_string()),
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
        println!("  {verdict}  {:<60} {}", check.target, check.measured);
    }
}

fn print_markdown(results: &Results) {
    let s = &results.settings;
    let m = &results.drain.summaries;
    let c = &m.click_consumer;
    let dash = || "—".to_owned();
    let spread = |x: Option<Spread>, d: usize| x.map_or_else(dash, |x| x.show(d));
    let rates = |x: &Summary| {
        format!(
            "{} / {} / {}",
            grouped(x.rate.min),
            grouped(x.rate.median),
            grouped(x.rate.max)
        )
    };
    println!();
    println!("Markdown (for the README):");
    println!();
    println!(
        "| {} queued clicks, {} repeats, min / median / max | click-consumer | reference: prefetch {}, ack per {} | reference: prefetch {SMALL_PREFETCH}, ack per {SMALL_ACK_EVERY} |",
        grouped(s.messages as f64),
        s.repeats,
        grouped(f64::from(s.prefetch)),
        grouped(s.batch_size as f64),
    );
    println!("|---|---:|---:|---:|");
    let row = |name: &str, of: &dyn Fn(&Summary) -> String| {
        println!(
            "| {name} | {} | {} | {} |",
            of(c),
            m.reference.as_ref().map_or_else(dash, of),
            m.reference_small.as_ref().map_or_else(dash, of)
        );
    };
    row("drain rate (msg/s)", &rates);
    row("CPU-seconds per 1M messages", &|x| {
        x.cpu_seconds_per_million.show(2)
    });
    row("broker CPU-seconds per 1M messages", &|x| {
        spread(x.broker_cpu_seconds_per_million, 2)
    });
    row("ClickHouse CPU-seconds per 1M messages", &|x| {
        spread(x.clickhouse_cpu_seconds_per_million, 2)
    });
    row(
        "CPU time stolen by the hypervisor (% of the machine's)",
        &|x| spread(x.steal_percent, 1),
    );
    row("peak RSS (MiB)", &|x| x.peak_rss_mib.show(1));
    let ratio_row = |name: &str, of: fn(&RatioSpread) -> Option<Spread>| {
        println!(
            "| {name} | | {} | {} |",
            spread(m.ratios.as_ref().and_then(of), 2),
            spread(m.ratios_small.as_ref().and_then(of), 2)
        );
    };
    ratio_row("click-consumer / reference: drain rate", |r| Some(r.rate));
    ratio_row("click-consumer / reference: CPU per message", |r| {
        Some(r.cpu)
    });
    ratio_row("click-consumer / reference: broker CPU per message", |r| {
        r.broker_cpu
    });
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
    if !results.large.is_empty() {
        println!();
        println!(
            "| large clicks (~{} KB each), defaults | seconds | MB/s | msg/s | peak RSS (MiB) |",
            results.large[0].bytes_each / 1000
        );
        println!("|---|---:|---:|---:|---:|");
        for l in &results.large {
            let r = &l.run;
            println!(
                "| {} messages ({:.1} GB) | {:.1} | {:.1} | {:.0} | {:.1} |",
                grouped(r.messages as f64),
                (r.messages as f64 * l.bytes_each as f64) / 1e9,
                r.seconds,
                r.bytes_per_second.unwrap_or(f64::NAN) / 1e6,
                r.rate,
                r.peak_rss_mib
            );
        }
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
