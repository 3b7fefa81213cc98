//! One broker session: a connection, its channels, the consume loop. A lost connection
//! ends the session; the consumer opens a new one. Delivery tags never outlive their
//! session, so an old tag is never acknowledged on a new channel.

use std::{sync::Arc, time::Duration};

use futures_util::{FutureExt, StreamExt};
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
use crate::flow::{OVERHEAD, Window};
use crate::flush::Backlog;
use crate::metrics::{Metrics, StatsLog};
use crate::store::Store;

/// Time kept back from the shutdown deadline to close the channels and the connection.
const CLOSE_MARGIN: Duration = Duration::from_millis(1500);

/// Deliveries already received that one turn of the consume loop takes at most.
const READY_BURST: usize = 64;

/// Longest wait for the queue's depth when deliveries pause after a full batch; without
/// an answer, the pause is taken as the end of the backlog.
const BACKLOG_PROBE_LIMIT: Duration = Duration::from_millis(500);

/// How often a consumer stopped for the byte budget looks again at what is held.
const PAUSE_CHECK: Duration = Duration::from_millis(20);

/// Longest wait for the broker to answer a consumer restart's `basic.cancel`,
/// `basic.qos` or `basic.consume`: a backstop for a broker that hangs without the
/// heartbeat noticing (a slow answer is not a lost broker: a quorum queue electing a
/// leader takes seconds). A shutdown does not wait for it.
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);

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
    /// The running consumer; `None` while it is stopped for the byte budget or being
    /// restarted with another prefetch window.
    consumer: Option<Running>,
    /// Cancelled consumers whose deliveries sent before the cancellation are still being
    /// read (their streams end after them).
    draining: Vec<lapin::Consumer>,
    /// The prefetch window for the byte budget.
    window: Window,
    /// Consumers started so far in this session (each restart gets a new tag).
    generation: u32,
    /// The tag of a consumer whose `basic.consume` was sent and not answered yet: a
    /// shutdown that interrupts the restart cancels it too.
    starting: Option<String>,
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
        let window = Window::new(
            config.max_inflight_bytes(),
            config.prefetch(),
            config.max_message_bytes,
        );
        consume
            .basic_qos(window.current(), BasicQosOptions::default())
            .await?;
        shared
            .metrics
            .prefetch_window
            .set(i64::from(window.current()));
        let acker = Acker::new(consume.clone(), shared.metrics.clone());
        let dead_letters = DeadLetters::start(
            config,
            shared.brokers.clone(),
            acker.clone(),
            shared.metrics.clone(),
            shared.consumer_tag.clone(),
        );
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
            consumer: Some(Running {
                tag: shared.consumer_tag.clone(),
                stream: consumer,
            }),
            shared,
            connection,
            consume,
            draining: Vec::new(),
            window,
            generation: 1,
            starting: None,
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
        // Half the byte budget per batch, so that the next batch fills within the budget
        // while the previous one is being written.
        let batch_bytes = config
            .batch_max_bytes
            .min(config.max_inflight_bytes() / 2)
            .max(1);
        let mut restart_failed = false;
        // Made once, not on every turn: a turn per delivery would register (and drop) a
        // waiter on the token and a timer each time.
        let cancelled = stop.cancelled();
        tokio::pin!(cancelled);
        let flush_sleep = tokio::time::sleep_until(Instant::now());
        tokio::pin!(flush_sleep);
        let mut backlog = Backlog::default();
        let refused = self.dead_letters.refused();
        tokio::pin!(refused);
        // The broker could not send on the last turn: its window was used up, or no
        // consumer was running.
        let mut broker_held = false;
        let end = loop {
            let steering = self.must_steer();
            let steered = if steering {
                tokio::select! {
                    biased;
                    // A shutdown is not held up by a consumer restart: the loop drains.
                    () = &mut cancelled => Ok(()),
                    steered = self.steer() => steered,
                }
            } else {
                Ok(())
            };
            if let Err(e) = steered {
                restart_failed = true;
                break End::BrokerLost(format!("restarting the consumer failed: {e}"));
            }
            if steering || broker_held {
                backlog.resume(Instant::now());
            }
            // Stopped for the byte budget: what is buffered must be written to free it.
            let paused = self.consumer.is_none() && self.draining.is_empty();
            let timeout = batch.deadline(config.batch_timeout);
            // The end of a backlog (see `flush`); not while a consumer is being restarted:
            // its successor brings more.
            let backlog_end = backlog
                .ends_at()
                .filter(|_| !batch.is_empty() && self.consumer.is_some());
            let deadline = match (timeout, backlog_end) {
                (Some(timeout), Some(end)) => Some(timeout.min(end)),
                (timeout, end) => timeout.or(end),
            };
            let full = batch.is_full(config.batch_size, batch_bytes);
            // The broker sends nothing more once the running consumer's window is used
            // up: write what is buffered rather than wait for the batch timeout. (Not
            // while a consumer is being restarted: its successor brings more.)
            let window_used = self.consumer.is_some()
                && self.acker.outstanding() >= usize::from(self.window.current());
            broker_held = window_used || self.consumer.is_none();
            let held_up = (paused || window_used) && !batch.is_empty();
            let now = Instant::now();
            let timed_out = timeout.is_some_and(|at| at <= now);
            let ended = backlog_end.is_some_and(|at| at <= now);
            if in_flight.is_none() && ended && !(full || held_up || timed_out) {
                // A loop that did not run for a while (a busy machine) is not a pause in
                // the deliveries: take what came meanwhile before calling it the end.
                match self
                    .take_waiting(&mut batch, batch_bytes, &mut backlog)
                    .await
                {
                    Err(end) => break end,
                    Ok(true) => continue,
                    Ok(false) => {}
                }
                // Nor is a broker that is slow to send (or a client thread that is slow to
                // read): the backlog has ended only when the queue has nothing ready. Asked
                // once per pause, never past the batch timeout, and a shutdown does not
                // wait for the answer.
                let limit = timeout.map_or(BACKLOG_PROBE_LIMIT, |at| {
                    BACKLOG_PROBE_LIMIT.min(at.saturating_duration_since(now))
                });
                let depth = tokio::select! {
                    biased;
                    () = &mut cancelled => None,
                    depth = self.queue_depth(limit) => Some(depth),
                };
                let Some(depth) = depth else {
                    break self
                        .drain(std::mem::take(&mut batch), in_flight.take())
                        .await;
                };
                if let Some(ready @ 1..) = depth {
                    log::debug!(
                        "deliveries paused with {ready} messages ready: not the end of the backlog"
                    );
                    backlog.probed();
                    continue;
                }
                // What came while the broker was asked belongs to this batch.
                match self
                    .take_waiting(&mut batch, batch_bytes, &mut backlog)
                    .await
                {
                    Err(end) => break end,
                    Ok(true) => continue,
                    Ok(false) => {}
                }
            }
            if in_flight.is_none() && (full || held_up || timed_out || ended) {
                backlog.written(full || held_up);
                let why = if full {
                    "full"
                } else if held_up {
                    "no more deliveries until it is written"
                } else if timed_out {
                    "BATCH_TIMEOUT_MS"
                } else {
                    "end of the backlog"
                };
                let written = std::mem::replace(&mut batch, recycler.batch(config.batch_size));
                log::debug!(
                    "flushing batch ({why}): {} rows ({} bytes), up to delivery tag {}",
                    written.len(),
                    written.bytes(),
                    written.last_tag()
                );
                in_flight = Some(tokio::spawn(
                    self.committer.clone().commit(written.into_parts()),
                ));
                continue;
            }
            let receiving = !full;
            let flush_timer = deadline.filter(|_| in_flight.is_none());
            // Reset only when the timer would fire too late or has fired: the end of a
            // backlog moves with every delivery, and a timer that fires early just turns
            // the loop once (a reset per delivery would cost a timer registration each).
            if let Some(at) = flush_timer
                && (flush_sleep.deadline() > at || flush_sleep.is_elapsed())
            {
                flush_sleep.as_mut().reset(at);
            }
            let pause_check = paused.then(|| Instant::now() + PAUSE_CHECK);
            tokio::select! {
                biased;
                () = &mut cancelled => {
                    break self.drain(std::mem::take(&mut batch), in_flight.take()).await;
                }
                outcome = join(&mut in_flight) => {
                    in_flight = None;
                    match outcome {
                        Outcome::Committed => {}
                        other => break end_of(other),
                    }
                }
                () = &mut refused => break End::Redeclare,
                () = &mut flush_sleep, if flush_timer.is_some() => {}
                () = sleep_until(pause_check) => {}
                _ = stats_tick.tick() => {
                    // The gauge's question does not hold up a shutdown either: the next
                    // turn's `cancelled` arm drains.
                    tokio::select! {
                        biased;
                        () = &mut cancelled => {}
                        () = self.refresh_queue_depth() => stats.log(),
                    }
                }
                delivery = next_of(&mut self.draining), if receiving && !self.draining.is_empty() => {
                    match delivery {
                        // The cancelled consumer's last delivery is in.
                        None => {
                            self.draining.remove(0);
                        }
                        delivery => {
                            if let Err(end) = self.take(delivery, &mut batch).await {
                                break end;
                            }
                            backlog.delivered(Instant::now());
                        }
                    }
                }
                delivery = next_running(&mut self.consumer), if receiving && self.consumer.is_some() => {
                    if let Err(end) = self.take(delivery, &mut batch).await {
                        break end;
                    }
                    if let Err(end) = self.take_ready(&mut batch, batch_bytes).await {
                        break end;
                    }
                    backlog.delivered(Instant::now());
                }
            }
        };
        let mut end = end;
        if let Some(mut task) = in_flight {
            // The channel still works when only the topology must be declared again:
            // let the commit in flight finish rather than store its batch twice, and keep
            // what it says if it is worse than a redeclaration (a fatal error, a lost
            // broker, ClickHouse down).
            // So may it when a consumer restart failed. The wait stays within the
            // shutdown timeout, should a shutdown come meanwhile.
            let finish = if matches!(end, End::Redeclare) || restart_failed {
                Duration::from_secs(10).min(
                    config
                        .shutdown_timeout
                        .saturating_sub(CLOSE_MARGIN + Duration::from_secs(2)),
                )
            } else {
                Duration::ZERO
            };
            match tokio::time::timeout(finish, &mut task).await {
                Ok(Ok(Outcome::Committed)) | Ok(Err(_)) => {}
                Ok(Ok(outcome)) => {
                    if matches!(end, End::Redeclare) {
                        end = end_of(outcome);
                    }
                }
                Err(_) => task.abort(),
            }
        }
        self.settle_dead_letters().await;
        self.close().await;
        end
    }

    /// Whether [`Session::steer`] has something to do: the running consumer must stop or
    /// change its window, or a stopped one may start again. Checked on every turn of the
    /// loop, so it only reads counters.
    fn must_steer(&self) -> bool {
        match &self.consumer {
            Some(_) => {
                self.window.wanted().is_some()
                    || self
                        .window
                        .over_budget(self.acker.held_bytes(), self.acker.aside_bytes())
            }
            None => self.draining.is_empty(),
        }
    }

    /// Keeps the bytes held within the budget: restarts the consumer with another
    /// prefetch window when the message sizes call for one, stops it while too much is
    /// held, and starts it again once its window fits beside what is still held.
    async fn steer(&mut self) -> Result<(), lapin::Error> {
        let held = self.acker.held_bytes();
        let aside = self.acker.aside_bytes();
        if let Some(running) = &self.consumer {
            let resize = self.window.wanted();
            let over = self.window.over_budget(held, aside);
            if resize.is_none() && !over {
                return Ok(());
            }
            if over {
                log::debug!(
                    "{held} bytes received and not acknowledged, {aside} more in dead letters waiting for confirms (MAX_INFLIGHT_BYTES {}): consumer stopped until they are",
                    self.shared.config.max_inflight_bytes()
                );
                self.shared.metrics.prefetch_window.set(0);
            }
            let tag = ShortString::from(running.tag.as_str());
            answered(
                "basic.cancel",
                self.consume
                    .basic_cancel(tag, BasicCancelOptions::default()),
            )
            .await?;
            // Deliveries sent before the cancellation are still read from its stream.
            if let Some(running) = self.consumer.take() {
                self.draining.push(running.stream);
            }
        }
        if !self.draining.is_empty() {
            return Ok(());
        }
        if let Some(window) = self.window.wanted() {
            log::debug!(
                "prefetch window {} -> {window} (messages of about {} bytes; MAX_INFLIGHT_BYTES {})",
                self.window.current(),
                self.window.estimate().saturating_sub(OVERHEAD),
                self.shared.config.max_inflight_bytes()
            );
            self.window.set(window);
            self.shared.metrics.window_changes.inc();
        }
        if !self.window.has_room(held, aside) {
            return Ok(());
        }
        self.generation += 1;
        let tag = restart_tag(&self.shared.consumer_tag, self.generation);
        self.starting = Some(tag.clone());
        answered(
            "basic.qos",
            self.consume
                .basic_qos(self.window.current(), BasicQosOptions::default()),
        )
        .await?;
        let stream = answered(
            "basic.consume",
            self.consume.basic_consume(
                ShortString::from(self.shared.config.queue.as_str()),
                ShortString::from(tag.as_str()),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ),
        )
        .await?;
        self.shared
            .metrics
            .prefetch_window
            .set(i64::from(self.window.current()));
        self.starting = None;
        self.consumer = Some(Running { tag, stream });
        Ok(())
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

    /// What a consumer's stream gave: a delivery is accepted; an error, or the end of
    /// the running consumer's stream, ends the session.
    async fn take(
        &mut self,
        delivery: Option<Result<Delivery, lapin::Error>>,
        batch: &mut Batch,
    ) -> Result<(), End> {
        match delivery {
            Some(Ok(delivery)) => self
                .accept(delivery, batch)
                .await
                .map_err(|e| End::BrokerLost(format!("dead-lettering failed: {e}"))),
            Some(Err(e)) => Err(End::BrokerLost(e.to_string())),
            None => Err(End::BrokerLost(
                "the broker cancelled the consumer (queue deleted or node going down)".to_owned(),
            )),
        }
    }

    /// Accepts the deliveries that are already here, up to [`READY_BURST`], without
    /// another turn of the loop: a backlog arrives faster than one `select!` per message
    /// can take it cheaply. Stops where the loop has something to decide: the batch is
    /// full, or the byte budget wants the consumer steered. (No cancelled consumer is
    /// still draining while one runs: [`Session::steer`] starts the next only once they
    /// are all drained, so tags still reach the ack ledger in order.)
    /// Returns how many it took.
    async fn take_ready(&mut self, batch: &mut Batch, batch_bytes: usize) -> Result<usize, End> {
        let max_rows = self.shared.config.batch_size;
        for taken in 0..READY_BURST {
            if batch.is_full(max_rows, batch_bytes) || self.must_steer() {
                return Ok(taken);
            }
            let Some(running) = &mut self.consumer else {
                return Ok(taken);
            };
            let Some(delivery) = running.stream.next().now_or_never() else {
                return Ok(taken);
            };
            self.take(delivery, batch).await?;
        }
        Ok(READY_BURST)
    }

    /// [`Session::take_ready`] at a pause: whether it took anything (then the pause
    /// starts again from now).
    async fn take_waiting(
        &mut self,
        batch: &mut Batch,
        batch_bytes: usize,
        backlog: &mut Backlog,
    ) -> Result<bool, End> {
        let took = self.take_ready(batch, batch_bytes).await? > 0;
        if took {
            backlog.delivered(Instant::now());
        }
        Ok(took)
    }

    /// Decodes one delivery into the batch, or dead-letters it.
    async fn accept(&mut self, delivery: Delivery, batch: &mut Batch) -> Result<(), lapin::Error> {
        self.window.observe(delivery.data.len());
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
        self.acker.received(tag, body.len() as u64 + OVERHEAD).await;
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
        // The running consumer, and one a restart had started when the shutdown came.
        let running = self.consumer.take().map(|running| running.tag);
        for tag in running.into_iter().chain(self.starting.take()) {
            let cancel = self.consume.basic_cancel(
                ShortString::from(tag.as_str()),
                BasicCancelOptions::default(),
            );
            if let Err(e) = tokio::time::timeout_at(deadline, cancel)
                .await
                .unwrap_or(Ok(()))
            {
                log::warn!("could not cancel the consumer: {e}");
            }
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

    /// Asks the broker for the queue's depth (for the gauge).
    async fn refresh_queue_depth(&self) {
        self.queue_depth(Duration::from_secs(2)).await;
    }

    /// Asks the broker for the queue's depth (messages ready), on a short-lived channel
    /// so that a failure (queue deleted) cannot take the consuming channel down; sets the
    /// gauge. `None` if the broker did not answer within `limit`.
    async fn queue_depth(&self, limit: Duration) -> Option<u32> {
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
            // Closed in the background: the answer is all the caller waits for.
            tokio::spawn(async move {
                let _ = channel.close(200, ShortString::from("probe done")).await;
            });
            queue
        };
        match tokio::time::timeout(limit, probe).await {
            Ok(Ok(queue)) => {
                let depth = queue.message_count();
                self.shared.metrics.queue_depth.set(i64::from(depth));
                Some(depth)
            }
            Ok(Err(e)) => {
                log::debug!("could not read the queue depth: {e}");
                None
            }
            Err(_) => {
                log::debug!("could not read the queue depth: no answer within {limit:?}");
                None
            }
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

/// The tag of the session's `generation`-th consumer: `<tag>-<generation>`, the base
/// shortened (on a character boundary) so that it stays an AMQP short string.
fn restart_tag(base: &str, generation: u32) -> String {
    let suffix = format!("-{generation}");
    let mut end = base.len().min(255 - suffix.len());
    while !base.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{suffix}", &base[..end])
}

/// `rpc`'s result, or an error naming it if the broker does not answer within
/// [`RESTART_TIMEOUT`].
async fn answered<T>(
    rpc: &str,
    call: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, lapin::Error> {
    tokio::time::timeout(RESTART_TIMEOUT, call)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::other(format!(
                "RabbitMQ did not answer {rpc} within {RESTART_TIMEOUT:?}"
            ))
            .into())
        })
}

/// A consumer started by the session, with its tag.
struct Running {
    tag: String,
    stream: lapin::Consumer,
}

/// The next delivery of the running consumer; pending while there is none.
async fn next_running(running: &mut Option<Running>) -> Option<Result<Delivery, lapin::Error>> {
    match running {
        Some(running) => running.stream.next().await,
        None => std::future::pending().await,
    }
}

/// The next delivery of the oldest cancelled consumer still draining.
async fn next_of(draining: &mut [lapin::Consumer]) -> Option<Result<Delivery, lapin::Error>> {
    match draining.first_mut() {
        Some(stream) => stream.next().await,
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

#[cfg(test)]
mod tests {
    use super::restart_tag;

    #[test]
    fn restart_tags_stay_short_strings() {
        assert_eq!(restart_tag("host-42", 2), "host-42-2");
        let long = "é".repeat(127); // 254 bytes
        let tag = restart_tag(&long, 12);
        assert!(tag.len() <= 255, "{}", tag.len());
        assert!(tag.ends_with("-12"));
    }
}
