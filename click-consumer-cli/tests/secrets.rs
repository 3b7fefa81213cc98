//! Passwords of every shape, in malformed and in unreachable URLs, never reach the
//! binary's output at `LOG_LEVEL=debug`: not in a setting error, not in a log line of
//! ours or of a client library, not in the final error.

mod support;

use std::{process::Command, time::Duration};

use click_consumer_testkit::shared;
use support::free_port;

/// Passwords that should have been percent-encoded and were not, and some that were.
const PASSWORDS: [&str; 10] = [
    "Sx/pa/ss",
    "Sx#frag",
    "Sx?q=1",
    "Sx@at@",
    "Sx:co:lon",
    "Sx%2Fenc%40oded",
    "Sx sp ace",
    "Sxünï-密码",
    "Sx/a?b#c@d:e",
    "Sx%zz%",
];

struct Run {
    code: Option<i32>,
    output: String,
}

fn run(envs: &[(&str, String)]) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_click-consumer"));
    command
        .env_clear()
        .env("LOG_LEVEL", "debug")
        .env("METRICS_ADDR", "off")
        .env("STARTUP_TIMEOUT_MS", "400")
        .env("RETRY_INITIAL_BACKOFF_MS", "50");
    for (name, value) in envs {
        command.env(name, value);
    }
    let output = command.output().expect("the binary runs");
    Run {
        code: output.status.code(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// Every form in which the password could leak: as written, and its non-ASCII or
/// non-alphanumeric core (a parser may have decoded or split it).
fn assert_hidden(case: &str, password: &str, run: &Run) {
    for needle in [password, &password[2..]] {
        assert!(
            !run.output.contains(needle),
            "{case}: password {password:?} leaked ({needle:?}):\n{}",
            run.output
        );
    }
    assert!(
        !run.output.is_empty() && run.code != Some(0),
        "{case}: expected a failure with a message, got {:?}:\n{}",
        run.code,
        run.output
    );
}

#[test]
fn malformed_urls_never_echo_the_password() {
    for password in PASSWORDS {
        let shapes = [
            format!("amqp://user:{password}@host:port/"),
            format!("amqp://user:{password}@[::1/"),
            format!("amqp://user:{password}"),
            format!("http://user:{password}@host/"),
            format!("user:{password}@host:5672"),
        ];
        for url in shapes {
            let case = format!("RABBITMQ_URL={url:?}");
            let out = run(&[("RABBITMQ_URL", url.clone())]);
            assert_eq!(out.code, Some(2), "{case}: a bad setting:\n{}", out.output);
            assert!(
                out.output.contains("invalid setting RABBITMQ_URL"),
                "{case}: names the setting:\n{}",
                out.output
            );
            assert_hidden(&case, password, &out);

            let case = format!("CLICKHOUSE_URL={url:?}");
            let out = run(&[("CLICKHOUSE_URL", url.replace("amqp://", "ftp://"))]);
            // Validation checks the scheme; a malformed http:// URL fails at start-up.
            assert!(
                out.output.contains("invalid setting CLICKHOUSE_URL")
                    || out
                        .output
                        .contains("cannot reach ClickHouse at http://user:***@"),
                "{case}: names the setting or the redacted URL:\n{}",
                out.output
            );
            assert_hidden(&case, password, &out);
        }
    }
}

#[test]
fn unreachable_and_refusing_servers_never_echo_the_password() {
    let servers = shared();
    let closed = free_port();
    let clickhouse = format!("http://127.0.0.1:{}", servers.clickhouse.http_port());
    let broker_port = servers
        .rabbitmq
        .amqp_url()
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next().map(str::to_owned))
        .expect("the broker URL has a port");
    for password in PASSWORDS {
        let encoded: String = password
            .bytes()
            .map(|b| match b {
                b'/' | b'#' | b'?' | b'@' | b':' | b' ' => format!("%{b:02X}"),
                _ => char::from(b).to_string(),
            })
            .collect();
        let cases = [
            // A broker that is not there, raw and percent-encoded.
            (
                "RABBITMQ_URL unreachable",
                vec![
                    (
                        "RABBITMQ_URL",
                        format!("amqp://user:{password}@127.0.0.1:{closed}/"),
                    ),
                    ("CLICKHOUSE_URL", clickhouse.clone()),
                ],
            ),
            (
                "RABBITMQ_URL unreachable, encoded",
                vec![
                    (
                        "RABBITMQ_URL",
                        format!("amqp://user:{encoded}@127.0.0.1:{closed}/"),
                    ),
                    ("CLICKHOUSE_URL", clickhouse.clone()),
                ],
            ),
            // The real broker refusing that password.
            (
                "RABBITMQ_URL refused",
                vec![
                    (
                        "RABBITMQ_URL",
                        format!("amqp://guest:{encoded}@127.0.0.1:{broker_port}/"),
                    ),
                    ("CLICKHOUSE_URL", clickhouse.clone()),
                ],
            ),
            // ClickHouse not there, with the password in its URL or in its setting.
            (
                "CLICKHOUSE_URL unreachable",
                vec![(
                    "CLICKHOUSE_URL",
                    format!("http://default:{password}@127.0.0.1:{closed}/"),
                )],
            ),
            (
                "CLICKHOUSE_PASSWORD, unreachable",
                vec![
                    ("CLICKHOUSE_URL", format!("http://127.0.0.1:{closed}")),
                    ("CLICKHOUSE_PASSWORD", password.to_owned()),
                ],
            ),
            // The real ClickHouse refusing that password.
            (
                "CLICKHOUSE_PASSWORD refused",
                vec![
                    ("CLICKHOUSE_URL", clickhouse.clone()),
                    ("CLICKHOUSE_PASSWORD", password.to_owned()),
                ],
            ),
        ];
        for (what, envs) in cases {
            let case = format!("{what} with {password:?}");
            let started = std::time::Instant::now();
            let out = run(&envs);
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{case}: took {:?}",
                started.elapsed()
            );
            // A raw `/`, `#`, `?` or `%zz` makes the URL itself invalid (exit 2); the
            // encoded ones and the others get as far as connecting (exit 1).
            let valid = !what.starts_with("RABBITMQ_URL unreachable")
                || what.ends_with("encoded")
                || !password.contains(['/', '#', '?', '%']);
            if valid {
                assert_eq!(out.code, Some(1), "{case}: fails:\n{}", out.output);
            }
            assert!(
                !valid || out.output.contains("DEBUG"),
                "{case}: debug lines are written:\n{}",
                out.output
            );
            assert_hidden(&case, password, &out);
            assert!(
                !out.output.contains(&encoded),
                "{case}: the encoded password {encoded:?} leaked:\n{}",
                out.output
            );
        }
    }
}
