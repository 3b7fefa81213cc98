//! End to end through the real `click-consumer` binary against real RabbitMQ and
//! ClickHouse: publish thousands of clicks mixed with bad messages, SIGTERM mid-stream,
//! restart, and count every row, dead letter and queued message.

mod support;

use std::{
    net::TcpListener,
    process::Command,
    time::{Duration, Instant},
};

use click_consumer::ClickEvent;
use click_consumer_testkit::shared;
use support::{Stack, http_get, wait_until};

const VALID: usize = 4000;
const BAD_EVERY: usize = 20; // 5% of the stream is poison

/// The stream: valid clicks with distinct short codes, every 20th message poison.
fn stream() -> Vec<Vec<u8>> {
    let poison: [&[u8]; 5] = [
        b"not json at all",
        br#"{"short_code":"","timestamp":"2024-01-15T10:30:00Z"}"#,
        br#"{"short_code":"x","timestamp":"31/12/2024"}"#,
        br#"[1,2,3]"#,
        b"\xc3\x28 invalid utf-8",
    ];
    let mut messages = Vec::new();
    let mut valid = 0;
    while valid < VALID {
        if messages.len() % BAD_EVERY == BAD_EVERY - 1 {
            messages.push(poison[messages.len() / BAD_EVERY % poison.len()].to_vec());
        } else {
            let event = ClickEvent::new(format!("e2e{valid:05}"), "2024-01-15T10:30:00+01:00")
                .with_user_agent("e2e-agent")
                .with_original_url(format!("https://example.com/{valid}"));
            messages.push(serde_json::to_vec(&event).unwrap());
            valid += 1;
        }
    }
    messages
}

#[test]
fn sigterm_mid_stream_loses_nothing_and_a_restart_drains_the_rest() {
    let servers = shared();
    let setup = Stack::new(&servers.rabbitmq, &servers.clickhouse, "e2e");
    let messages = stream();
    let bad = messages.len() - VALID;
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let publisher = setup.publisher(&runtime);

    let mut child = setup.spawn(&[]);
    // Publish at about 2,000 messages/s in the background; SIGTERM lands mid-stream.
    let publishing = {
        let publisher = publisher.clone();
        let messages = messages.clone();
        let handle = runtime.handle().clone();
        std::thread::spawn(move || {
            for chunk in messages.chunks(100) {
                handle.block_on(async {
                    for body in chunk {
                        publisher.publish_bytes(body).await.unwrap();
                    }
                });
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    wait_until("a first thousand rows", Duration::from_secs(30), || {
        setup.rows().0 >= 1000
    });
    let term_at = Instant::now();
    let status = child.stop();
    let shutdown = term_at.elapsed();
    assert!(status.success(), "SIGTERM exits 0, got {status}");
    assert!(
        !publishing.is_finished(),
        "the stream was still running at SIGTERM"
    );
    publishing.join().expect("publishing thread");

    let (stored, distinct) = setup.rows();
    assert_eq!(stored, distinct, "no row stored twice");
    let (dead, _) = setup.queue_counts(&setup.dead_letter_queue()).unwrap();
    let (ready, unacked) = setup.queue();
    assert_eq!(unacked, 0, "nothing stays unacknowledged after exit");
    assert_eq!(
        stored + dead + ready,
        messages.len() as u64,
        "every message is a row, a dead letter, or still queued (stored {stored}, dead {dead}, queued {ready})"
    );
    eprintln!(
        "first run: {stored} rows stored, {dead} dead-lettered, {ready} left queued; SIGTERM to exit took {shutdown:?}"
    );

    // A second run drains the rest; its metrics match what it did.
    let mut child = setup.spawn(&[]);
    wait_until("all rows", Duration::from_secs(60), || {
        setup.rows().0 == VALID as u64
    });
    wait_until("the queue to drain", Duration::from_secs(30), || {
        setup.queue() == (0, 0)
    });
    let received = setup.metric("click_consumer_messages_received_total");
    let inserted = setup.metric("click_consumer_rows_inserted_total");
    let dead_lettered = setup.metric("click_consumer_messages_dead_lettered_total");
    assert_eq!(received, ready, "the second run received what was queued");
    assert_eq!(
        inserted,
        VALID as u64 - stored,
        "rows_inserted_total counts this run's rows"
    );
    assert_eq!(
        dead_lettered,
        bad as u64 - dead,
        "dead-lettered total counts this run's poison"
    );
    assert!(http_get(setup.metrics_port, "/ready").starts_with("HTTP/1.1 200"));
    assert!(child.stop().success());

    let (stored, distinct) = setup.rows();
    assert_eq!(
        (stored, distinct),
        (VALID as u64, VALID as u64),
        "every valid event exactly once"
    );
    let (dead, _) = setup.queue_counts(&setup.dead_letter_queue()).unwrap();
    assert_eq!(dead, bad as u64, "every poison message dead-lettered");
    assert_eq!(setup.queue(), (0, 0));
    let timestamp = servers.clickhouse.query(&format!(
        "SELECT toUnixTimestamp(timestamp) FROM {}.click_events WHERE short_code = 'e2e00000'",
        setup.database
    ));
    assert_eq!(timestamp.trim(), "1705311000", "+01:00 converted to UTC");
    eprintln!("after restart: {stored} rows, {dead} dead letters, queue empty");
}

#[test]
fn a_bad_setting_exits_2_with_one_line_naming_it() {
    let output = Command::new(env!("CARGO_BIN_EXE_click-consumer"))
        .env_clear()
        .env("BATCH_SIZE", "lots")
        .env("METRICS_ADDR", "off")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("invalid setting BATCH_SIZE"), "{stderr}");
}

#[test]
fn unreachable_servers_exit_1_after_the_start_up_window() {
    let closed = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let output = Command::new(env!("CARGO_BIN_EXE_click-consumer"))
        .env_clear()
        .env("CLICKHOUSE_PORT", closed.to_string())
        .env("CLICKHOUSE_HOST", "127.0.0.1")
        .env("STARTUP_TIMEOUT_MS", "1000")
        .env("METRICS_ADDR", "off")
        .env("LOG_LEVEL", "error")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert!(
        stderr.contains("cannot reach ClickHouse at http://127.0.0.1:"),
        "{stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Passwords never reach the output, at any log level, in errors or in `--help`.
#[test]
fn passwords_never_appear_in_logs_errors_or_help() {
    let servers = shared();
    let ch_secret = "ch-secret-7731";
    let rmq_secret = "rmq-secret-9942";
    let run = |envs: &[(&str, String)], args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_click-consumer"));
        command
            .env_clear()
            .env("LOG_LEVEL", "trace")
            .env("METRICS_ADDR", "off")
            .env("STARTUP_TIMEOUT_MS", "3000")
            .env("CLICKHOUSE_HOST", "127.0.0.1")
            .env(
                "CLICKHOUSE_PORT",
                servers.clickhouse.http_port().to_string(),
            )
            .args(args);
        for (name, value) in envs {
            command.env(name, value);
        }
        let output = command.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        (output.status, text)
    };
    let wrong_broker_password = servers
        .rabbitmq
        .amqp_url()
        .replace("guest:guest", &format!("guest:{rmq_secret}"));

    // ClickHouse refuses the password: a fatal error, logged and printed.
    let (status, text) = run(
        &[
            ("CLICKHOUSE_PASSWORD", ch_secret.to_owned()),
            ("RABBITMQ_URL", wrong_broker_password.clone()),
        ],
        &[],
    );
    assert!(!status.success(), "{text}");
    assert!(
        text.contains("ClickHouse"),
        "the error says what failed: {text}"
    );
    // RabbitMQ refuses the password (ClickHouse accepts the empty one).
    let (status, text2) = run(&[("RABBITMQ_URL", wrong_broker_password.clone())], &[]);
    assert!(!status.success(), "{text2}");
    assert!(
        text2.contains("guest:***@"),
        "the URL is shown redacted: {text2}"
    );
    let (_, help) = run(
        &[
            ("CLICKHOUSE_PASSWORD", ch_secret.to_owned()),
            ("RABBITMQ_URL", wrong_broker_password),
        ],
        &["--help"],
    );
    for output in [&text, &text2, &help] {
        assert!(
            !output.contains(ch_secret),
            "ClickHouse password leaked:\n{output}"
        );
        assert!(
            !output.contains(rmq_secret),
            "RabbitMQ password leaked:\n{output}"
        );
    }
}
