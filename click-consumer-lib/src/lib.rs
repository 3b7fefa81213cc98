//! Moves click events from RabbitMQ into ClickHouse: consume, decode, batch, insert, and
//! acknowledge only what ClickHouse has committed. Invalid messages go to a dead-letter
//! queue with their reason; nothing is dropped silently.
//!
//! This is the library behind the `click-consumer` service. Embed it in a Rust URL
//! shortener to run the consumer in-process, or to publish clicks with
//! [`ClickPublisher`].
//!
//! # Quick start
//!
//! ```no_run
//! use click_consumer::{Config, Consumer};
//! use std::time::Duration;
//!
//! # async fn example() -> click_consumer::Result<()> {
//! let config = Config::default()
//!     .with_rabbitmq_url("amqp://guest:guest@localhost:5672/")
//!     .with_clickhouse_host("localhost")
//!     .with_batch_size(2_000)
//!     .with_batch_timeout(Duration::from_millis(500));
//! let consumer = Consumer::new(config)?;
//! // Any future works as the shutdown trigger: a signal, a CancellationToken, a channel.
//! let summary = consumer.run(async { tokio::signal::ctrl_c().await.ok(); }).await?;
//! println!("{} rows stored, {} dead-lettered", summary.stored, summary.dead_lettered);
//! # Ok(())
//! # }
//! ```
//!
//! # Delivery guarantees
//! At least once: a message is acknowledged only after its row is committed (or its copy
//! is confirmed in the dead-letter queue). A crash or a lost connection between commit
//! and acknowledgement redelivers at most the batch in flight, which is then stored
//! again; that is logged and counted (`click_consumer_unconfirmed_batches_total`).
//!
//! # Layout
//! - [`config`]: [`Config`], its defaults, validation and `from_env`.
//! - `event`: [`ClickEvent`] and the decoding rules ([`InvalidMessage`]).
//! - Extra columns filled from same-named fields: `columns` (the table's layout, read and
//!   refreshed), `field` (types, JSON values, typed RowBinary), `encode` (rows into a batch).
//! - [`Consumer`] (`consumer`, with `session` per broker connection, `batch`, `flush` for
//!   the end of a backlog, `commit`, `dead_letter`, `store` for ClickHouse, `broker` for
//!   RabbitMQ topology, `ack` for settling deliveries).
//! - [`ClickPublisher`] (`publisher`): publish clicks from the shortener.
//! - [`Metrics`] and [`Summary`] (`metrics`; `exposition` converts to the classic
//!   Prometheus text format).
//! - [`Error`] (`error`), [`Secret`] (`secret`).

#![warn(missing_docs)]

mod ack;
mod backoff;
mod batch;
mod broker;
mod columns;
mod commit;
pub mod config;
mod consumer;
mod dead_letter;
mod encode;
mod endpoints;
mod error;
mod event;
mod exposition;
mod field;
mod flow;
mod flush;
mod metrics;
mod publisher;
mod rowbinary;
mod secret;
mod session;
mod store;
mod timestamp;
mod tls;

pub use commit::CommitReport;
pub use config::{Config, ExchangeType, QueueType};
pub use consumer::Consumer;
pub use dead_letter::headers as dead_letter_headers;
pub use error::{AmqpError, ClickHouseError, Error, Result};
pub use event::{ClickEvent, InvalidKind, InvalidMessage};
pub use metrics::{Metrics, Summary};
pub use publisher::ClickPublisher;
pub use secret::{Scrubber, Secret, redact_url, url_password};
