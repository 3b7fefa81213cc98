//! Signals through the real binary: two copies of SIGTERM arriving a few milliseconds
//! apart (a supervisor signalling the process group, `timeout`, a shell) do not abort
//! the drain.

mod support;

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use click_consumer::ClickEvent;
use click_consumer_testkit::shared;
use support::{Service, Stack, wait_until};

const CLICKS: usize = 2000;

/// The binary with the stack's settings and a batch that only a drain will write, its
/// log captured to a file.
fn spawn(setup: &Stack<'_>, log: &std::path::Path) -> Service {
    let log = std::fs::File::create(log).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_click-consumer"))
        .env_clear()
        .env(
            "RABBITMQ_URL",
            setup.rabbitmq.amqp_url().replace("/%2f", "/"),
        )
        .env("RABBITMQ_EXCHANGE", &setup.exchange)
        .env("RABBITMQ_QUEUE", &setup.queue)
        .env("CLICKHOUSE_HOST", "127.0.0.1")
        .env("CLICKHOUSE_PORT", setup.clickhouse.http_port().to_string())
        .env("CLICKHOUSE_DATABASE", &setup.database)
        .env("LOG_LEVEL", "info")
        // Nothing is written before the shutdown: every row depends on the drain.
        .env("BATCH_SIZE", "10000")
        .env("BATCH_TIMEOUT_MS", "600000")
        .env("METRICS_ADDR", format!("127.0.0.1:{}", setup.metrics_port))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the click-consumer binary starts");
    Service(child)
}

/// Publishes the clicks and waits until the binary holds all of them, unwritten.
fn buffer_clicks(setup: &Stack<'_>, prefix: &str) {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let publisher = setup.publisher(&runtime);
    runtime.block_on(async {
        for i in 0..CLICKS {
            let event = ClickEvent::new(format!("{prefix}{i:05}"), "2024-01-15T10:30:00Z");
            publisher.publish(&event).await.unwrap();
        }
    });
    wait_until("every click received", Duration::from_secs(30), || {
        std::net::TcpStream::connect(("127.0.0.1", setup.metrics_port)).is_ok()
            && setup.metric("click_consumer_messages_received_total") == CLICKS as u64
    });
    assert_eq!(setup.rows().0, 0, "nothing written before the shutdown");
}

#[test]
fn two_sigterms_together_still_drain_every_row() {
    let servers = shared();
    let setup = Stack::new(&servers.rabbitmq, &servers.clickhouse, "sig2");
    let dir = tempfile_dir("sig2");
    let log = dir.join("consumer.log");
    let mut child = spawn(&setup, &log);
    buffer_clicks(&setup, "sig");

    let sent = Instant::now();
    child.sigterm();
    // Long enough for the first signal's handler to have run (so the kernel does not
    // coalesce the two), short against the drain of the buffered clicks.
    std::thread::sleep(Duration::from_micros(500));
    child.sigterm();
    let gap = sent.elapsed();
    let status = child.wait_exit(Duration::from_secs(15));
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        gap < Duration::from_millis(500),
        "the two signals came {gap:?} apart"
    );
    assert_eq!(
        status.code(),
        Some(0),
        "two SIGTERMs {gap:?} apart: a clean exit expected, got {status}:\n{log}"
    );
    assert!(
        log.contains("received SIGTERM again"),
        "the second signal reached the binary (not coalesced):\n{log}"
    );
    assert_eq!(
        setup.rows(),
        (CLICKS as u64, CLICKS as u64),
        "every buffered click stored once by the drain"
    );
    assert_eq!(setup.queue(), (0, 0), "everything acknowledged:\n{log}");
    eprintln!("two SIGTERMs {gap:?} apart: exit 0, {CLICKS} rows stored");
}

fn tempfile_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(click_consumer_testkit::unique_name(name));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
