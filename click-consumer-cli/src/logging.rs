//! `LOG_LEVEL` (Rust or Python level names) into an `env_logger` filter, and a log format
//! that scrubs the configured secrets from every line.

use std::io::Write;

use click_consumer::Scrubber;
use log::LevelFilter;

/// Reads a level name: `trace`, `debug`, `info`, `warn`/`warning`, `error`, `critical`
/// (Python's, logged as error), `off`; any case.
pub(crate) fn parse_level(name: &str) -> Option<LevelFilter> {
    Some(match name.trim().to_ascii_lowercase().as_str() {
        "trace" => LevelFilter::Trace,
        "debug" => LevelFilter::Debug,
        "info" => LevelFilter::Info,
        "warn" | "warning" => LevelFilter::Warn,
        "error" | "critical" | "fatal" => LevelFilter::Error,
        "off" | "none" => LevelFilter::Off,
        _ => return None,
    })
}

/// Installs the logger: our crates at `level`, the protocol libraries at most at `info`
/// (their debug output is per frame), then `RUST_LOG`'s filters on top. Every line is
/// written through `secrets`, whatever module wrote it: a password that some message
/// quotes (a parser's error, a client library's debug line) comes out as `***`.
pub(crate) fn init(level: &str, secrets: Scrubber) -> anyhow::Result<()> {
    let Some(level) = parse_level(level) else {
        anyhow::bail!(
            "invalid setting LOG_LEVEL: expected debug, info, warning, error or critical, got `{level}`"
        );
    };
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level);
    for noisy in [
        "lapin",
        "amq_protocol",
        "hyper",
        "hyper_util",
        "rustls",
        "h2",
    ] {
        builder.filter_module(noisy, level.min(LevelFilter::Info));
    }
    if let Ok(filters) = std::env::var("RUST_LOG") {
        builder.parse_filters(&filters);
    }
    builder
        .format(move |buf, record| {
            let line = line(&secrets, buf.timestamp_millis(), record);
            writeln!(buf, "{line}")
        })
        .init();
    Ok(())
}

/// One log line, env_logger's default layout, with the secrets scrubbed from the message.
fn line(secrets: &Scrubber, timestamp: impl std::fmt::Display, record: &log::Record<'_>) -> String {
    let message = record.args().to_string();
    format!(
        "[{timestamp} {:<5} {}] {}",
        record.level(),
        record.target(),
        secrets.scrub(&message)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_never_hold_a_secret() {
        let secrets = Scrubber::new()
            .with_secret("ch p@ss")
            .with_url("amqp://u:r/m#q@host/");
        let message = format_args!("dsn amqp://u:r/m#q@host/ password=ch p@ss or ch%20p%40ss");
        let record = log::Record::builder()
            .args(message)
            .level(log::Level::Debug)
            .target("lapin::uri")
            .build();
        assert_eq!(
            line(&secrets, "T", &record),
            "[T DEBUG lapin::uri] dsn amqp://u:***@host/ password=*** or ***"
        );
    }

    #[test]
    fn python_and_rust_names() {
        let cases = [
            ("DEBUG", LevelFilter::Debug),
            ("debug", LevelFilter::Debug),
            ("INFO", LevelFilter::Info),
            ("WARNING", LevelFilter::Warn),
            ("warn", LevelFilter::Warn),
            ("ERROR", LevelFilter::Error),
            ("CRITICAL", LevelFilter::Error),
            ("Trace", LevelFilter::Trace),
            (" off ", LevelFilter::Off),
        ];
        for (name, level) in cases {
            assert_eq!(parse_level(name), Some(level), "{name}");
        }
        assert_eq!(parse_level("verbose"), None);
    }
}
