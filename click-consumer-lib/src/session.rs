//! One broker session: a connection, its channels, the consume loop. A lost connection
//! ends the session; the consumer opens a new one. Delivery tags never outlive their
//! session, so an old tag is never acknowledged on a new channel.

use std::{sync::Arc, time::Duration};

use futures_util::StreamExt;
use lapin::{
    Channel, Connection,
    message::Delivery,
    options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions},
    types::{FieldTable, ShortString},
};
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::ack::Acker;
use crate::batch::{Batch, Recycler};
use crate::broker;
use crate::commit::{Committer, Outcome};
use crate::config::Config;
use crate::dead_letter::{DeadLetters, Origin};
use crate::error::Error;
use crate::metrics::{Metrics, StatsLog};
use crate::store::Store;

/// Time kept back from the shutdown deadline to close the channels and the connection.
const CLOSE_MARGIN: Duration = Duration::from_millis(1500);

/// Why a session ended.
#[derive(Debug)]
pub(crate) enum End {
    /// The caller asked us to stop; buffered messages were flushed or left unacked.
    Shutdown,
    /// The connection or channel failed, or the server cancelled the consumer.
    BrokerLost(String),
    /// ClickHouse failed long enough that the batch was released back to the queue.
    ClickHouseDown,
    /// The topology must be declared again (dead-letter queue gone).
    Redeclare,
    /// Stop the consumer.
    Fatal(Error),
}

/// Why a session could not be opened.
#[derive(Debug)]
pub(crate) enum OpenError {
    Retry(lapin::Error),
    Fatal(Error),
}

impl From<lapin::Error> for OpenError {
    fn from(error: lapin::Error) -> Self {
        if broker::is_retryable(&error) {
            OpenError::Retry(error)
        } else {
            OpenError::Fatal(Error::broker("RabbitMQ refused the connection", error))
        }
    }
}

/// What every session shares with the consumer.
#[derive(Clone)]
pub(crate) struct Shared {
    pub(crate) config: Arc<Config>,
    pub(crate) store: Store,
    pub(crate) brokers: Arc<crate::endpoints::Endpoints<lapin::uri::AMQPUri>>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) consumer_tag: String,
    pub(crate) on_commit: Option<crate::commit::CommitHook>,
    /// The table's layout (extra columns), shared with the commits.
    pub(crate) columns: Arc<crate::columns::Columns>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("consumer_tag", &self.consumer_tag)
            .field("on_commit", &self.on_commit.is_some())
            .finish_non_exhaustive()
    }
}

pub(crate) struct Session {
    shared: Shared,
    /// The consuming connection. It never publishes, so a resource alarm never blocks it
    /// (dead letters have a connection of their own).
    connection: Connection,
    consume: Channel,
    consumer: lapin::Consumer,
    acker: Acker,
    dead_letters: DeadLetters,
    committer: Committer,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("consumer_tag", &self.shared.consumer_tag)
            .finish_non_exhaustive()
    }
}

impl Session {
    /// Connects, declares the topology, and starts consuming.
    pub(crate) async fn open(
        shared: Shared,
        connect_timeout: Duration,
    ) -> Result<Session, OpenError> {
        let config = &shared.config;
        let connection =
            broker::connect(&shared.brokers, config, connect_timeout, "consume").await?;
        let consume = connection.create_channel().await?;
        broker::declare_topology(&consume, config)
            .await
            .map_err(|e| match e {
                Error::Broker { source, .. } if broker::is_retryable(&source) => {
                    OpenError::Retry(source)
                }
                other => OpenError::Fatal(other),
            })?;
        consume
            .basic_qos(config.prefetch(), BasicQosOptions::default())
            .await?;
        let acker = Acker::new(consume.clone(), shared.metrics.clone());
        let dead_letters = DeadLetters::start(
            config,
            shared.brokers.clone(),
            acker.clone(),
            shared.metrics.clone(),
            shared.consumer_tag.clone(),
        )
        .await?;
        let consumer = consume
            .basic_consume(
                ShortString::from(config.queue.as_str()),
                ShortString::from(shared.consumer_tag.as_str()),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await;
        let consumer = match consumer {
            Ok(consumer) => consumer,
            Err(e) => {
                dead_letters.stop();
                return Err(e.into());
            }
        };
        let committer = Committer {
            store: shared.store.clone(),
            dead_letters: dead_letters.clone(),
            acker: acker.clone(),
            metrics: shared.metrics.clone(),
            initial_backoff: config.retry_initial_backoff,
            max_backoff: config.retry_max_backoff,
            release_after: config.insert_release_after,
            on_commit: shared.on_commit.clone(),
            recycler: Recycler::default(),
            columns: shared.columns.clone(),
            delivery_limit: (config.queue_type == crate::config::QueueType::Quorum)
                .then_some(broker::QUORUM_DELIVERY_LIMIT as u32),
        };
        Ok(Session {
            shared,
            connection,
            consume,
            consumer,
            acker,
            dead_letters,
            committer,
        })
    }

    /// Consumes until `stop` is cancelled or something fails. While one batch is being
    /// committed the next one fills (the prefetch allows two), so inserting overlaps
    /// consuming; commits themselves run one at a time.
    pub(crate) async fn run(mut self, stop: &CancellationToken, stats: &mut StatsLog) -> End {
        let config = self.shared.config.clone();
        let recycler = self.committer.recycler.clone();
        let mut batch = recycler.batch(config.batch_size);
        let mut in_flight: Option<JoinHandle<Outcome>> = None;
        let mut stats_tick = tokio::time::interval_at(
            Instant::now() + config.stats_interval,
            config.stats_interval,
        );
        let end = loop {
            let deadline = batch.deadline(config.batch_timeout);
            let full = batch.is_full(config.batch_size, config.batch_max_bytes);
            let due = full || deadline.is_some_and(|d| d <= Instant::now());
            if in_flight.is_none() && due {
                let full = std::mem::replace(&mut batch, recycler.batch(config.batch_size));
                log::debug!(
                    "flushing batch: {} rows ({} bytes), up to delivery tag {}",
                    full.len(),
                    full.bytes(),
                    full.last_tag()
                );
                in_flight = Some(tokio::spawn(
                    self.committer.clone().commit(full.into_parts()),
                ));
                continue;
            }
            let receiving = !full;
            let flush_timer = deadline.filter(|_| in_flight.is_none());
            tokio::select! {
                biased;
                () = stop.cancelled() => {
                    break self.drain(std::mem::take(&mut batch), in_flight.take()).await;
                }
                outcome = join(&mut in_flight) => {
                    in_flight = None;
                    match outcome {
                        Outcome::Committed => {}
                        other => break end_of(other),
                    }
                }
                () = self.dead_letters.refused() => break End::Redeclare,
                () = sleep_until(flush_timer) => {}
                _ = stats_tick.tick() => {
                    self.refresh_queue_depth().await;
                    stats.log();
                }
                delivery = self.consumer.next(), if receiving => match delivery {
                    Some(Ok(delivery)) => {
                        if let Err(e) = self.accept(delivery, &mut batch).await {
                            break End::BrokerLost(format!("dead-lettering failed: {e}"));
                        }
                    }
                    Some(Err(e)) => break End::BrokerLost(e.to_string()),
                    None => break End::BrokerLost(
                        "the broker cancelled the consumer (queue deleted or node going down)".to_owned(),
                    ),
                },
            }
        };
        if let Some(mut task) = in_flight {
            // The channel still works when only the topology must be declared again:
            // let the commit in flight finish rather than store its batch twice.
            let finish = Duration::from_secs(if matches!(end, End::Redeclare) { 10 } else { 0 });
            if tokio::time::timeout(finish, &mut task).await.is_err() {
                task.abort();
            }
        }
        self.settle_dead_letters().await;
        self.close().await;
        end
    }

    /// The session is ending: gives the dead letters in flight a moment to be confirmed
    /// (their originals are then acknowledged, so they are not dead-lettered twice), then
    /// stops the outbox. Originals whose copies are not confirmed return to the queue.
    async fn settle_dead_letters(&self) {
        let pending = self.dead_letters.pending();
        let settled = pending == 0
            || tokio::time::timeout(
                Duration::from_secs(2),
                self.dead_letters.idle_unless_blocked(),
            )
            .await
            .unwrap_or(false);
        if !settled {
            log::info!(
                "{} dead letters were not confirmed before the session ended{}: their originals return to the queue",
                self.dead_letters.pending(),
                if self.shared.metrics.broker_blocked() {
                    " (RabbitMQ blocks their connection)"
                } else {
                    ""
                }
            );
        }
        self.dead_letters.stop();
    }

    /// Decodes one delivery into the batch, or dead-letters it.
    async fn accept(&self, delivery: Delivery, batch: &mut Batch) -> Result<(), lapin::Error> {
        let metrics = &self.shared.metrics;
        let Delivery {
            delivery_tag: tag,
            exchange,
            routing_key,
            redelivered,
            properties,
            data: body,
            ..
        } = delivery;
        metrics.received.inc();
        metrics.received_bytes.inc_by(body.len() as u64);
        if redelivered {
            metrics.redelivered.inc();
        }
        self.acker.received(tag).await;
        let origin = Origin {
            exchange,
            routing_key,
            properties,
        };
        let max_bytes = self.shared.config.max_message_bytes;
        // The row is encoded straight into the batch.
        let decoded = crate::encode::encode_into(
            batch,
            &self.shared.columns,
            &body,
            max_bytes,
            (tag, redelivered),
        );
        match decoded {
            Ok(event_time) => {
                let published = origin
                    .properties
                    .timestamp()
                    .and_then(|t| u32::try_from(t).ok());
                batch.push_row(tag, &body, origin, published.unwrap_or(event_time));
                Ok(())
            }
            Err(invalid) => {
                log::debug!(
                    "delivery {tag}: dead-lettered ({}): {invalid}",
                    invalid.kind().as_str()
                );
                self.dead_letters.send(tag, body, &origin, &invalid).await
            }
        }
    }

    /// On shutdown: stop deliveries, finish the commit in flight, commit what is buffered,
    /// all before the deadline. What is not committed by then stays unacknowledged and
    /// returns to the queue when the channel closes.
    async fn drain(&mut self, batch: Batch, in_flight: Option<JoinHandle<Outcome>>) -> End {
        let config = &self.shared.config;
        let deadline = Instant::now() + config.shutdown_timeout.saturating_sub(CLOSE_MARGIN);
        let tag = ShortString::from(self.shared.consumer_tag.as_str());
        let cancel = self
            .consume
            .basic_cancel(tag, BasicCancelOptions::default());
        if let Err(e) = tokio::time::timeout_at(deadline, cancel)
            .await
            .unwrap_or(Ok(()))
        {
            log::warn!("could not cancel the consumer: {e}");
        }
        let abort = in_flight.as_ref().map(JoinHandle::abort_handle);
        let pending = batch.len();
        let committer = self.committer.clone();
        let dead_letters = self.dead_letters.clone();
        let work = async move {
            let mut in_flight = in_flight;
            if in_flight.is_some() {
                match join(&mut in_flight).await {
                    Outcome::Committed => {}
                    other => return end_of(other),
                }
            }
            if !batch.is_empty() {
                match committer.commit(batch.into_parts()).await {
                    Outcome::Committed => {}
                    other => return end_of(other),
                }
            }
            // Dead letters settle their originals themselves: wait for them too, unless
            // RabbitMQ blocks their connection (resource alarm): then they cannot be
            // confirmed before the alarm clears, and their originals return to the queue.
            dead_letters.idle_unless_blocked().await;
            End::Shutdown
        };
        match tokio::time::timeout_at(deadline, work).await {
            Ok(End::Shutdown) => {
                log::info!("flushed {pending} buffered messages before shutdown");
                End::Shutdown
            }
            Ok(End::Fatal(e)) => End::Fatal(e),
            Ok(other) => {
                log::warn!(
                    "could not flush before shutdown ({other:?}): unacknowledged messages return to the queue"
                );
                End::Shutdown
            }
            Err(_) => {
                if let Some(abort) = abort {
                    abort.abort();
                }
                log::warn!(
                    "shutdown deadline reached before the buffered batch was stored: its messages stay in RabbitMQ and will be redelivered"
                );
                End::Shutdown
            }
        }
    }

    /// Asks the broker for the queue's depth, on a short-lived channel so that a
    /// failure (queue deleted) cannot take the consuming channel down.
    async fn refresh_queue_depth(&self) {
        let probe = async {
            let channel = self.connection.create_channel().await?;
            let queue = channel
                .queue_declare(
                    ShortString::from(self.shared.config.queue.as_str()),
                    QueueDeclareOptions {
                        passive: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await;
            let _ = channel.close(200, ShortString::from("probe done")).await;
            queue
        };
        match tokio::time::timeout(Duration::from_secs(2), probe).await {
            Ok(Ok(queue)) => {
                self.shared
                    .metrics
                    .queue_depth
                    .set(i64::from(queue.message_count()));
            }
            Ok(Err(e)) => log::debug!("could not read the queue depth: {e}"),
            Err(_) => log::debug!("could not read the queue depth: no answer within 2s"),
        }
    }

    /// Closes the channels and the connection; unacknowledged messages return to the
    /// queue. Best effort: a dead connection is just dropped.
    async fn close(self) {
        let close = async {
            let _ = self.consume.close(200, ShortString::from("bye")).await;
            let _ = self.connection.close(200, ShortString::from("bye")).await;
        };
        if tokio::time::timeout(Duration::from_secs(1), close)
            .await
            .is_err()
        {
            log::debug!("closing the connection timed out");
        }
    }
}

fn end_of(outcome: Outcome) -> End {
    match outcome {
        Outcome::Committed => End::Shutdown,
        Outcome::Released => End::ClickHouseDown,
        Outcome::BrokerLost(e) => End::BrokerLost(e.to_string()),
        Outcome::Fatal(e) => End::Fatal(e),
    }
}

/// The outcome of the commit in flight; pending while there is none.
async fn join(in_flight: &mut Option<JoinHandle<Outcome>>) -> Outcome {
    match in_flight {
        Some(task) => match task.await {
            Ok(outcome) => outcome,
            Err(e) => Outcome::BrokerLost(lapin::Error::from(std::io::Error::other(format!(
                "commit task failed: {e}"
            )))),
        },
        None => std::future::pending().await,
    }
}

/// Sleeps until `deadline`; forever without one.
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
