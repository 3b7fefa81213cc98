//! The reference consumer (`click-consumer-bench reference-consumer`): the fastest a lapin
//! consumer drains the queue when it does no work. Same runtime as `click-consumer`
//! (tokio, multi-threaded), same prefetch, bodies discarded, one `basic.ack` with
//! multiple=true per batch-size messages and one at the end; exits once it has
//! acknowledged the number of messages it was told.

use anyhow::{Context, bail};
use futures_util::StreamExt;
use lapin::{
    Connection, ConnectionProperties,
    options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions},
    types::{FieldTable, ShortString},
};

use crate::child::peak_rss_kib;
use crate::cli::ReferenceArgs;

/// What the reference consumer prints at exit, before its peak RSS in KiB (`VmHWM`:
/// the bench cannot read it once the process is gone).
const PEAK_RSS: &str = "peak_rss_kib";

pub(crate) fn run(args: &ReferenceArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.ack_every > 0, "--ack-every must be at least 1");
    tokio::runtime::Runtime::new()
        .context("cannot start the async runtime")?
        .block_on(consume(args))
}

async fn consume(args: &ReferenceArgs) -> anyhow::Result<()> {
    let connection = Connection::connect(&args.url, ConnectionProperties::default())
        .await
        .context("reference consumer: cannot connect")?;
    let channel = connection.create_channel().await?;
    channel
        .basic_qos(args.prefetch, BasicQosOptions::default())
        .await?;
    let mut deliveries = channel
        .basic_consume(
            ShortString::from(args.queue.as_str()),
            ShortString::from("reference-consumer"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("reference consumer: cannot consume `{}`", args.queue))?;
    let mut received = 0;
    while received < args.messages {
        let delivery = match deliveries.next().await {
            Some(delivery) => delivery?,
            None => bail!("reference consumer: cancelled after {received} messages"),
        };
        received += 1;
        let tag = delivery.delivery_tag;
        drop(delivery); // the body is discarded unread
        if received.is_multiple_of(args.ack_every) || received == args.messages {
            channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await?;
        }
    }
    channel.close(200, ShortString::from("done")).await?;
    connection.close(200, ShortString::from("done")).await?;
    let peak = peak_rss_kib("self").context("cannot read VmHWM")?;
    println!("{PEAK_RSS} {peak}");
    Ok(())
}

/// The peak RSS in KiB that the reference consumer printed at exit.
pub(crate) fn reported_peak_rss_kib(output: &str) -> Option<u64> {
    output
        .lines()
        .find_map(|line| line.strip_prefix(PEAK_RSS)?.trim().parse().ok())
}
