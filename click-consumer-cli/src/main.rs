//! `click-consumer`: the service binary. Reads settings, installs the logger, wires
//! SIGTERM/SIGINT to the consumer's shutdown, runs the library, maps the result to an
//! exit code (0 done, 1 failed, 2 bad setting).

mod args;
mod demo;
mod logging;
mod malloc;
mod serve;

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::Parser;
use click_consumer::Consumer;
use futures_util::StreamExt;
use signal_hook::consts::{SIGINT, SIGTERM};
use tokio_util::sync::CancellationToken;

use crate::args::{Cli, Command};

fn main() -> ExitCode {
    malloc::tune();
    let cli = Cli::parse();
    let secrets = cli.settings.secrets();
    if let Err(e) = logging::init(&cli.log_level, secrets.clone()) {
        eprintln!("click-consumer: {e:#}");
        return ExitCode::from(2);
    }
    let result = match &cli.command {
        Some(Command::Healthcheck) => serve::healthcheck(&cli.metrics_addr),
        _ => tokio::runtime::Runtime::new()
            .context("cannot start the async runtime")
            .and_then(|runtime| runtime.block_on(run(cli))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The library's errors never hold a password; scrub anyway, the last line
            // of defence for whatever some dependency's message quotes.
            eprintln!(
                "click-consumer: error: {}",
                secrets.scrub(&format!("{e:#}"))
            );
            let bad_setting = matches!(
                e.downcast_ref::<click_consumer::Error>(),
                Some(click_consumer::Error::InvalidSetting { .. })
            ) || format!("{e}").starts_with("invalid setting");
            ExitCode::from(if bad_setting { 2 } else { 1 })
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = cli.settings.config()?;
    let stop = CancellationToken::new();
    tokio::spawn(forward_signals(stop.clone()));
    if let Some(Command::PublishDemo { rate, count }) = cli.command {
        return demo::run(config, rate, count, stop).await;
    }
    let metrics_addr = serve::parse_addr(&cli.metrics_addr)?;
    let consumer = Consumer::new(config)?;
    if let Some(addr) = metrics_addr {
        serve::spawn(addr, consumer.metrics()).await?;
    }
    consumer.run(stop.cancelled()).await?;
    Ok(())
}

/// A second signal sooner than this after the first is a copy of it (a supervisor or a
/// shell signalling the whole process group, `timeout`), not an operator insisting.
const FORCE_AFTER: Duration = Duration::from_secs(1);

/// The first SIGTERM or SIGINT starts a graceful shutdown; a later one, at least
/// [`FORCE_AFTER`] after the first, exits at once (unacknowledged messages return to the
/// queue). Copies arriving together with the first are ignored.
async fn forward_signals(stop: CancellationToken) {
    let mut signals = match signal_hook_tokio::Signals::new([SIGTERM, SIGINT]) {
        Ok(signals) => signals,
        Err(e) => {
            log::error!("cannot install signal handlers: {e}");
            return;
        }
    };
    let Some(signal) = signals.next().await else {
        return;
    };
    let first = Instant::now();
    log::info!("received {}, shutting down", signal_name(signal));
    stop.cancel();
    while let Some(signal) = signals.next().await {
        if first.elapsed() < FORCE_AFTER {
            log::info!(
                "received {} again {:?} after the first: taken as a copy, still draining",
                signal_name(signal),
                first.elapsed()
            );
            continue;
        }
        log::warn!("received {} again, exiting now", signal_name(signal));
        std::process::exit(130);
    }
}

fn signal_name(signal: i32) -> &'static str {
    if signal == SIGTERM {
        "SIGTERM"
    } else {
        "SIGINT"
    }
}
