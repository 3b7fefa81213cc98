//! A benchmark run from start to end: servers, the drain comparisons, the latency phase,
//! the report and the JSON file.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, bail};
use click_consumer::Config;
use tokio::runtime::Runtime;

use crate::cli::BenchArgs;
use crate::drain::{self, Comparison, LargeDrain};
use crate::latency;
use crate::machine::{Machine, RunDate};
use crate::report::{self, Results};
use crate::stack::{Broker, Servers};

/// Everything the phases share.
#[derive(Debug)]
pub(crate) struct Bench {
    pub(crate) args: BenchArgs,
    pub(crate) runtime: Runtime,
    pub(crate) servers: Servers,
    pub(crate) broker: Broker,
    pub(crate) consumer_binary: PathBuf,
    /// This binary, for the reference consumer subcommand.
    pub(crate) own_binary: PathBuf,
    /// The consumer's prefetch (its default, or `--consumer-env PREFETCH_COUNT`), which
    /// the same-window reference uses too.
    pub(crate) prefetch: u16,
    /// The consumer's `BATCH_SIZE` (default or overridden): the reference's ack interval.
    pub(crate) batch_size: usize,
    /// The consumer's `BATCH_TIMEOUT_MS` (default or overridden): the latency target's base.
    pub(crate) batch_timeout_ms: u64,
}

impl Bench {
    pub(crate) fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.args.drain_timeout)
    }
}

/// click-consumer's settings in this run: its defaults with `--consumer-env` on top.
fn consumer_config(args: &BenchArgs) -> anyhow::Result<Config> {
    let mut overrides = Vec::new();
    for entry in &args.consumer_env {
        let (name, value) = entry
            .split_once('=')
            .with_context(|| format!("--consumer-env `{entry}`: expected NAME=value"))?;
        overrides.push((name.to_owned(), value.to_owned()));
    }
    Config::from_lookup(|name| {
        overrides
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    })
    .context("--consumer-env")
}

pub(crate) fn run(args: &BenchArgs) -> anyhow::Result<()> {
    check(args)?;
    if args.extra_columns {
        crate::extra::enable();
        eprintln!("click-consumer-bench: scenario: ten typed extra columns and fields");
    }
    let own_binary = std::env::current_exe().context("cannot find this binary's path")?;
    let consumer_binary = consumer_binary(args, &own_binary)?;
    let consumer_config = consumer_config(args)?;
    let date = RunDate::now();
    eprintln!("click-consumer-bench: starting private RabbitMQ and ClickHouse ...");
    let servers = Servers::start();
    let runtime = Runtime::new().context("cannot start the async runtime")?;
    let broker = runtime.block_on(Broker::connect(&servers.lapin_url()))?;
    let bench = Bench {
        args: args.clone(),
        runtime,
        servers,
        broker,
        consumer_binary,
        own_binary,
        prefetch: consumer_config.prefetch(),
        batch_size: consumer_config.batch_size(),
        batch_timeout_ms: u64::try_from(consumer_config.batch_timeout().as_millis())
            .unwrap_or(u64::MAX),
    };
    let machine = Machine::describe(&bench.servers);
    let drains = drains(&bench)?;
    let large = large(&bench)?;
    let latency = if args.skip_latency {
        None
    } else {
        eprintln!(
            "latency: {} msg/s for {} s ...",
            args.latency_rate, args.latency_seconds
        );
        Some(latency::measure(&bench)?)
    };
    let results = Results::new(&bench, date, machine, drains, large, latency);
    report::print(&results);
    let path = report::write(&results, args.output.as_deref())?;
    eprintln!(
        "click-consumer-bench: results written to {}",
        path.display()
    );
    let Bench {
        runtime, broker, ..
    } = bench;
    runtime.block_on(broker.close());
    Ok(())
}

fn check(args: &BenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.messages > 0, "--messages must be at least 1");
    anyhow::ensure!(args.repeats > 0, "--repeats must be at least 1");
    anyhow::ensure!(
        args.skip_latency || (args.latency_rate > 0 && args.latency_seconds > 0),
        "--latency-rate and --latency-seconds must be at least 1"
    );
    Ok(())
}

/// `--consumer`, or `click-consumer` beside this binary (both are in target/release).
fn consumer_binary(args: &BenchArgs, own_binary: &Path) -> anyhow::Result<PathBuf> {
    let path = match &args.consumer {
        Some(path) => path.clone(),
        None => own_binary.with_file_name("click-consumer"),
    };
    if !path.is_file() {
        bail!(
            "no click-consumer binary at {} (build it with scripts/build-release.sh, or pass --consumer)",
            path.display()
        );
    }
    Ok(path)
}

fn large(bench: &Bench) -> anyhow::Result<Vec<LargeDrain>> {
    let counts: Vec<u64> = bench
        .args
        .large_messages
        .iter()
        .copied()
        .filter(|&n| n > 0)
        .collect();
    counts
        .iter()
        .map(|&messages| {
            eprintln!(
                "large drain: {messages} clicks of {} bytes",
                bench.args.large_bytes
            );
            drain::large(bench, messages)
        })
        .collect()
}

fn drains(bench: &Bench) -> anyhow::Result<Vec<Comparison>> {
    let repeats = bench.args.repeats;
    (1..=repeats)
        .map(|repeat| {
            eprintln!(
                "drain {repeat}/{repeats}: {} messages per consumer",
                bench.args.messages
            );
            drain::compare(bench, repeat)
        })
        .collect()
}
