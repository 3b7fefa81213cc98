//! `click-consumer-bench`: how fast the real `click-consumer` binary drains a queue into
//! ClickHouse, side by side with a consumer that does no work, and how long a click takes
//! to become visible at a steady publish rate. Everything runs on this machine, against
//! private RabbitMQ and ClickHouse servers (`click-consumer-testkit`).
//!
//! `scripts/bench.sh` builds what is needed and runs it; `--help` lists the options.
//!
//! Layout: `cli` (options), `bench` (the order of the phases), `events` (realistic
//! clicks), `prefill` (filling a queue), `drain` (one timed drain), `reference` (the
//! no-work consumer, a subcommand), `latency` (the steady-rate phase), `report` (what is
//! printed and written), with `stack` (servers, names, broker probe), `table` (the
//! ClickHouse side), `service` (the click-consumer child), `child` (reaping with rusage),
//! `http`, `machine`, `stats` and `time` as helpers.

mod bench;
mod child;
mod cli;
mod drain;
mod events;
mod extra;
mod http;
mod latency;
mod machine;
mod prefill;
mod reference;
mod report;
mod service;
mod stack;
mod stats;
mod table;
mod time;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::ReferenceConsumer(args)) => reference::run(&args),
        None => bench::run(&cli.bench),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("click-consumer-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
