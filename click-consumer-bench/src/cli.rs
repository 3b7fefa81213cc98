//! Command line: the benchmark's options, and the reference consumer's subcommand.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Benchmarks the release `click-consumer` binary against a no-work reference consumer,
/// on private RabbitMQ and ClickHouse servers started for the run: drain rate, CPU per
/// message, peak memory, INSERT sizes, and latency at a steady publish rate. Prints a
/// report (with a Markdown table and the targets) and writes the results as JSON.
#[derive(Debug, Parser)]
#[command(name = "click-consumer-bench", max_term_width = 100)]
pub(crate) struct Cli {
    #[command(flatten)]
    pub(crate) bench: BenchArgs,

    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// The no-work reference consumer (run by the benchmark as its own process).
    ReferenceConsumer(ReferenceArgs),
}

/// Options of a benchmark run.
#[derive(Debug, Clone, Args)]
pub(crate) struct BenchArgs {
    /// Messages in the queue at the start of each drain.
    #[arg(long, default_value_t = 200_000, value_name = "N")]
    pub(crate) messages: u64,

    /// Drain comparisons, rotating which consumer goes first; the minimum, median and
    /// maximum of each figure are reported.
    // Nine (a multiple of the three-way rotation): single ratios on a shared 2-core
    // machine spread from 0.7 to 1.15, and the median of five moved by 0.1 between runs.
    #[arg(long, default_value_t = 9, value_name = "N")]
    pub(crate) repeats: u32,

    /// Only measure click-consumer's drain (e.g. to see that its peak memory does not
    /// grow with the queue's depth).
    #[arg(long)]
    pub(crate) skip_reference: bool,

    /// Scenario: ten typed extra columns in the table, filled from ten extra fields of
    /// every click (see `extra`).
    #[arg(long)]
    pub(crate) extra_columns: bool,

    /// Large-message drains: click-consumer drains this many valid clicks of
    /// `--large-bytes` each (comma-separated counts, one drain each; 0 to skip).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "2000,5000",
        value_name = "N,..."
    )]
    pub(crate) large_messages: Vec<u64>,

    /// Size of each large click (JSON bytes; a long original_url).
    #[arg(long, default_value_t = 700_000, value_name = "BYTES")]
    pub(crate) large_bytes: usize,

    /// A setting for click-consumer, `NAME=value`, on top of its defaults (repeatable),
    /// e.g. `--consumer-env PREFETCH_COUNT=2000 --consumer-env BATCH_SIZE=1000`.
    #[arg(long, value_name = "NAME=VALUE")]
    pub(crate) consumer_env: Vec<String>,

    /// Skip the steady-rate latency phase.
    #[arg(long)]
    pub(crate) skip_latency: bool,

    /// Publish rate of the latency phase, messages per second.
    #[arg(long, default_value_t = 5_000, value_name = "MSG_PER_S")]
    pub(crate) latency_rate: u32,

    /// Duration of the latency phase's publishing, in seconds.
    #[arg(long, default_value_t = 30, value_name = "SECONDS")]
    pub(crate) latency_seconds: u64,

    /// Longest one drain may take before the run fails, in seconds.
    #[arg(long, default_value_t = 900, value_name = "SECONDS")]
    pub(crate) drain_timeout: u64,

    /// The click-consumer binary (default: `click-consumer` beside this binary, i.e.
    /// target/release/click-consumer).
    #[arg(long, value_name = "PATH")]
    pub(crate) consumer: Option<PathBuf>,

    /// Where to write the JSON results (default: `bench-results/<UTC timestamp>.json`).
    #[arg(long, value_name = "PATH")]
    pub(crate) output: Option<PathBuf>,
}

/// Options of the reference consumer.
#[derive(Debug, Args)]
pub(crate) struct ReferenceArgs {
    /// AMQP URL of the broker.
    #[arg(long)]
    pub(crate) url: String,

    /// Queue to consume.
    #[arg(long)]
    pub(crate) queue: String,

    /// Messages to consume (and acknowledge) before exiting.
    #[arg(long)]
    pub(crate) messages: u64,

    /// basic.qos prefetch count.
    #[arg(long)]
    pub(crate) prefetch: u16,

    /// Acknowledge (multiple=true) every this many messages, and at the end.
    #[arg(long)]
    pub(crate) ack_every: u64,
}
