//! Shared by the binary's end-to-end tests and the fault suite: a test's own names on
//! real servers, the running binary, and the counts a test asserts on.
#![allow(dead_code)] // each test target uses a different part

use std::{
    collections::BTreeMap,
    net::TcpListener,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use click_consumer::{ClickPublisher, Config};
use click_consumer_testkit::{ClickHouse, RabbitMq, unique_name};
use lapin::{
    Connection, ConnectionProperties,
    options::{BasicAckOptions, BasicGetOptions},
    types::AMQPValue,
};

/// One test's exchange, queue and database on a pair of servers.
pub(crate) struct Stack<'a> {
    pub(crate) rabbitmq: &'a RabbitMq,
    pub(crate) clickhouse: &'a ClickHouse,
    pub(crate) exchange: String,
    pub(crate) queue: String,
    pub(crate) database: String,
    pub(crate) metrics_port: u16,
}

impl<'a> Stack<'a> {
    pub(crate) fn new(rabbitmq: &'a RabbitMq, clickhouse: &'a ClickHouse, prefix: &str) -> Self {
        Stack {
            rabbitmq,
            clickhouse,
            exchange: unique_name(&format!("{prefix}_ex")),
            queue: unique_name(&format!("{prefix}_q")),
            database: unique_name(&format!("{prefix}_db")),
            metrics_port: free_port(),
        }
    }

    pub(crate) fn dead_letter_queue(&self) -> String {
        format!("{}.dead-letter", self.queue)
    }

    /// The library configuration for publishing on this stack.
    pub(crate) fn config(&self) -> Config {
        Config::default()
            .with_rabbitmq_url(self.rabbitmq.amqp_url())
            .with_exchange(&self.exchange)
            .with_queue(&self.queue)
    }

    pub(crate) fn publisher(&self, runtime: &tokio::runtime::Runtime) -> ClickPublisher {
        runtime
            .block_on(ClickPublisher::connect(&self.config()))
            .expect("publisher connects")
    }

    /// Starts the binary with the Python service's variables plus `extra`.
    pub(crate) fn spawn(&self, extra: &[(&str, &str)]) -> Service {
        let mut command = Command::new(env!("CARGO_BIN_EXE_click-consumer"));
        command
            .env_clear()
            .env(
                "RABBITMQ_URL",
                self.rabbitmq.amqp_url().replace("/%2f", "/"),
            )
            .env("RABBITMQ_EXCHANGE", &self.exchange)
            .env("RABBITMQ_QUEUE", &self.queue)
            .env("CLICKHOUSE_HOST", "127.0.0.1")
            .env("CLICKHOUSE_PORT", self.clickhouse.http_port().to_string())
            .env("CLICKHOUSE_DATABASE", &self.database)
            .env("CLICKHOUSE_USER", "default")
            .env("CLICKHOUSE_PASSWORD", "")
            .env("LOG_LEVEL", "info")
            .env("BATCH_SIZE", "500")
            .env("BATCH_TIMEOUT_MS", "200")
            .env("RETRY_MAX_BACKOFF_MS", "1000")
            .env("METRICS_ADDR", format!("127.0.0.1:{}", self.metrics_port))
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit());
        for (name, value) in extra {
            command.env(name, value);
        }
        Service(command.spawn().expect("the click-consumer binary starts"))
    }

    /// `(rows, distinct short codes)` in the table; `(0, 0)` before it exists.
    pub(crate) fn rows(&self) -> (u64, u64) {
        let exists = self.clickhouse.query(&format!(
            "SELECT count() FROM system.tables WHERE database = '{}' AND name = 'click_events'",
            self.database
        ));
        if exists.trim() == "0" {
            return (0, 0);
        }
        let out = self.clickhouse.query(&format!(
            "SELECT count(), uniqExact(short_code) FROM {}.click_events",
            self.database
        ));
        let mut fields = out.split_whitespace().map(|f| f.parse::<u64>().unwrap());
        (fields.next().unwrap(), fields.next().unwrap())
    }

    /// `(ready, unacknowledged)` of a queue, `None` if it does not exist.
    pub(crate) fn queue_counts(&self, name: &str) -> Option<(u64, u64)> {
        self.rabbitmq.queue_counts(name)
    }

    pub(crate) fn queue(&self) -> (u64, u64) {
        self.queue_counts(&self.queue).expect("the queue exists")
    }

    /// Takes every dead letter; returns the count per `x-error-kind`, and how many copies
    /// repeat a (non-empty) body that the same consumer (`x-consumer-tag`) copied already.
    pub(crate) fn take_dead_letters(
        &self,
        runtime: &tokio::runtime::Runtime,
    ) -> (BTreeMap<String, u64>, u64) {
        runtime.block_on(async {
            let connection =
                Connection::connect(&self.rabbitmq.amqp_url(), ConnectionProperties::default())
                    .await
                    .expect("connect");
            let channel = connection.create_channel().await.expect("channel");
            let mut kinds = BTreeMap::new();
            let mut copies: BTreeMap<(Vec<u8>, String), u64> = BTreeMap::new();
            while let Some(message) = channel
                .basic_get(
                    self.dead_letter_queue().as_str().into(),
                    BasicGetOptions::default(),
                )
                .await
                .expect("basic.get")
            {
                let delivery = message.delivery;
                let header =
                    |name: &str| {
                        delivery.properties.headers().as_ref().and_then(|h| {
                            match h.inner().get(name) {
                                Some(AMQPValue::LongString(s)) => Some(s.to_string()),
                                _ => None,
                            }
                        })
                    };
                let kind =
                    header("x-error-kind").unwrap_or_else(|| "missing x-error-kind".to_owned());
                let consumer = header("x-consumer-tag").unwrap_or_default();
                *kinds.entry(kind).or_default() += 1;
                if !delivery.data.is_empty() {
                    *copies.entry((delivery.data.clone(), consumer)).or_default() += 1;
                }
                delivery.ack(BasicAckOptions::default()).await.expect("ack");
            }
            let _ = connection.close(200, "done".into()).await;
            let repeated = copies.values().map(|n| n - 1).sum();
            (kinds, repeated)
        })
    }

    /// A counter (summed over labels) from the running binary's /metrics.
    pub(crate) fn metric(&self, name: &str) -> u64 {
        let body = http_get(self.metrics_port, "/metrics");
        body.lines()
            .filter(|line| line.starts_with(name))
            .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
            .sum()
    }
}

/// The running binary; killed if the test fails before it exits.
pub(crate) struct Service(pub(crate) Child);

impl Service {
    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([signal, &self.0.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill {signal}");
    }

    pub(crate) fn sigterm(&self) {
        self.signal("-TERM");
    }

    pub(crate) fn sigkill(&mut self) {
        self.signal("-KILL");
        let _ = self.0.wait();
    }

    pub(crate) fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "click-consumer did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, and the exit status (must come within 10 s).
    pub(crate) fn stop(&mut self) -> ExitStatus {
        self.sigterm();
        self.wait_exit(Duration::from_secs(10))
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub(crate) fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics listener");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).unwrap();
    out
}

pub(crate) fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
