//! The library's error type.

use std::time::Duration;

/// The AMQP client's error (lapin), carried as the source of broker errors. Re-exported
/// deliberately, so that callers can inspect it without depending on lapin themselves;
/// lapin's major version is part of this crate's API.
pub use lapin::Error as AmqpError;

/// The ClickHouse client's error (the `clickhouse` crate), carried as the source of
/// ClickHouse errors; re-exported for the same reason as [`AmqpError`].
pub use clickhouse::error::Error as ClickHouseError;

/// What can stop a [`Consumer`](crate::Consumer) or a [`ClickPublisher`](crate::ClickPublisher).
///
/// Faults the consumer rides out by itself (a ClickHouse outage, a broker restart) are
/// not errors: they are retried and logged. An `Error` is returned only when going on
/// would lose data or loop forever.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is invalid. `setting` is the environment variable's name, which is also
    /// the name used in the documentation of the matching `Config::with_*` builder.
    #[error("invalid setting {setting}: {reason}")]
    InvalidSetting {
        /// The setting's environment variable name, e.g. `BATCH_SIZE`.
        setting: &'static str,
        /// Why the value was refused.
        reason: String,
    },

    /// The broker could not be reached, or refused us, within the start-up window or the
    /// reconnect limit.
    #[error("cannot connect to RabbitMQ at {url} (gave up after {waited:?})")]
    BrokerUnreachable {
        /// The broker URL, password redacted.
        url: String,
        /// How long we tried.
        waited: Duration,
        /// The last error seen.
        #[source]
        source: AmqpError,
    },

    /// The broker refused a declaration because the exchange or queue already exists with
    /// other properties, or another permanent broker-side error.
    #[error("{what}: {detail}; {hint}")]
    Topology {
        /// What we were doing, e.g. ``failed to declare exchange `url_shortener` ``.
        what: String,
        /// The broker's reply.
        detail: String,
        /// Which setting to change.
        hint: String,
    },

    /// An AMQP operation failed.
    #[error("{context}")]
    Broker {
        /// What we were doing.
        context: String,
        /// The client's error.
        #[source]
        source: AmqpError,
    },

    /// ClickHouse could not be reached within the start-up window.
    #[error("cannot reach ClickHouse at {url} (gave up after {waited:?})")]
    ClickHouseUnreachable {
        /// The ClickHouse URL.
        url: String,
        /// How long we tried.
        waited: Duration,
        /// The last error seen.
        #[source]
        source: ClickHouseError,
    },

    /// ClickHouse refused a statement in a way retrying cannot fix (authentication,
    /// missing permissions, unknown table, a table of the wrong shape).
    #[error("{context}")]
    ClickHouse {
        /// What we were doing.
        context: String,
        /// The client's error.
        #[source]
        source: ClickHouseError,
    },

    /// The table exists but its columns do not match what the consumer writes.
    #[error("table {table} does not match the click event schema: {problem}")]
    TableShape {
        /// `database.table`.
        table: String,
        /// What is wrong.
        problem: String,
    },
}

/// The library's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub(crate) fn setting(setting: &'static str, reason: impl Into<String>) -> Self {
        Error::InvalidSetting {
            setting,
            reason: reason.into(),
        }
    }

    pub(crate) fn broker(context: impl Into<String>, source: lapin::Error) -> Self {
        Error::Broker {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn clickhouse(context: impl Into<String>, source: clickhouse::error::Error) -> Self {
        Error::ClickHouse {
            context: context.into(),
            source,
        }
    }

    /// A ClickHouse error that retrying may fix (down, overloaded, timed out).
    pub(crate) fn is_transient(&self) -> bool {
        matches!(self, Error::ClickHouse { source, .. }
            if crate::store::severity(source) == crate::store::Severity::Transient)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_is_send_sync_static() {
        fn assert_bounds<T: Send + Sync + 'static>() {}
        assert_bounds::<Error>();
    }

    #[test]
    fn invalid_setting_names_the_variable() {
        let err = Error::setting("BATCH_SIZE", "must be at least 1, got 0");
        assert_eq!(
            err.to_string(),
            "invalid setting BATCH_SIZE: must be at least 1, got 0"
        );
    }
}
