//! The real `click-consumer` binary as a child process, configured by environment like
//! in production (every setting not named here at its default), and its `/metrics`.

use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};

use crate::child::{Reaped, Watched};
use crate::http;
use crate::stack::{Servers, Target};

pub(crate) const UNACKED: &str = "click_consumer_messages_unacked";
pub(crate) const INSERTS: &str = "click_consumer_inserts_total";
/// When its last INSERT was answered (Unix seconds, its wall clock).
pub(crate) const LAST_INSERT: &str = "click_consumer_last_insert_timestamp_seconds";
/// Rows whose INSERT ClickHouse has answered.
pub(crate) const ROWS_INSERTED: &str = "click_consumer_rows_inserted_total";
const INSERT_SECONDS_SUM: &str = "click_consumer_insert_duration_seconds_sum";
const INSERT_SECONDS_COUNT: &str = "click_consumer_insert_duration_seconds_count";
/// Longest a SIGTERM drain may take (the consumer's own limit is 8 s).
const STOP_LIMIT: Duration = Duration::from_secs(15);

/// A stopped `click-consumer`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stopped {
    pub(crate) reaped: Reaped,
    /// Peak RSS over its life (`VmHWM` read just before SIGTERM).
    pub(crate) peak_rss_kib: u64,
}

/// A running `click-consumer`.
#[derive(Debug)]
pub(crate) struct Service {
    process: Watched,
    metrics_port: u16,
}

impl Service {
    /// Starts `binary` on `target`, with `extra_env` (`NAME=value`) on top of its
    /// defaults.
    pub(crate) fn start(
        binary: &Path,
        servers: &Servers,
        target: &Target,
        extra_env: &[String],
    ) -> anyhow::Result<Self> {
        let metrics_port = http::free_port().context("no free port for METRICS_ADDR")?;
        let mut command = Command::new(binary);
        command
            .env_clear()
            .env("RABBITMQ_URL", servers.amqp_url())
            .env("RABBITMQ_EXCHANGE", &target.exchange)
            .env("RABBITMQ_QUEUE", &target.queue)
            .env("CLICKHOUSE_HOST", "127.0.0.1")
            .env(
                "CLICKHOUSE_PORT",
                servers.clickhouse.http_port().to_string(),
            )
            .env("CLICKHOUSE_DATABASE", &target.database)
            .env("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
            .env("LOG_LEVEL", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for setting in extra_env {
            let (name, value) = setting
                .split_once('=')
                .with_context(|| format!("--consumer-env `{setting}`: expected NAME=value"))?;
            command.env(name, value);
        }
        Ok(Service {
            process: Watched::spawn("click-consumer", command)?,
            metrics_port,
        })
    }

    pub(crate) fn spawned(&self) -> Instant {
        self.process.spawned()
    }

    /// See [`Watched::at`].
    pub(crate) fn at(&self, wall: SystemTime) -> Option<Instant> {
        self.process.at(wall)
    }

    /// A sample of `/metrics`; an error while the listener is not up yet.
    pub(crate) fn metric(&self, name: &str) -> anyhow::Result<f64> {
        let (status, body) = http::get(self.metrics_port, "/metrics")?;
        anyhow::ensure!(status == 200, "GET /metrics answered {status}");
        http::metric(&body, name).with_context(|| format!("no {name} in /metrics"))
    }

    /// The mean duration of its INSERTs so far, in milliseconds (from its histogram).
    pub(crate) fn mean_insert_ms(&self) -> anyhow::Result<f64> {
        let count = self.metric(INSERT_SECONDS_COUNT)?;
        Ok(self.metric(INSERT_SECONDS_SUM)? / count * 1e3)
    }

    /// Waits until `/ready` answers 200 (connected to both servers, table ready).
    pub(crate) fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            self.ensure_running()?;
            if matches!(http::get(self.metrics_port, "/ready"), Ok((200, _))) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("click-consumer was not ready within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub(crate) fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.process.ensure_running()
    }

    /// Reads its peak RSS, then stops it with SIGTERM (it must exit 0) and reaps it.
    pub(crate) fn stop(mut self) -> anyhow::Result<Stopped> {
        let peak_rss_kib = self
            .process
            .peak_rss_kib()
            .context("cannot read click-consumer's VmHWM")?;
        let reaped = self.process.terminate(STOP_LIMIT)?;
        Ok(Stopped {
            reaped,
            peak_rss_kib,
        })
    }
}
