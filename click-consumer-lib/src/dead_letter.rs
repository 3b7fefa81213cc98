//! Dead-lettering: a copy of each invalid message, its reason in headers, published to
//! the dead-letter queue by an outbox task on a connection of its own; the original is
//! acknowledged only once the broker has confirmed its copy.
//!
//! Why a connection of its own: during a resource alarm RabbitMQ blocks every connection
//! that publishes, and stops reading from it, so acknowledgements sent on it would never
//! arrive. The consuming connection never publishes, so stored rows are acknowledged
//! whatever happens to the dead letters; a poison message just stays unacknowledged until
//! its copy is confirmed.
//!
//! Copies are published in rounds: the outbox publishes what has queued up, waits for
//! every confirm of the round, and only then decides. RabbitMQ returns an unroutable copy
//! (the dead-letter queue is gone) just before confirming it, and the client hands the
//! returned message to whichever confirm of the same frame it completes first; each copy
//! carries a unique id (`x-dead-letter-id`), so a return is matched to its own original.

use std::{
    collections::HashSet,
    hash::{BuildHasher, RandomState},
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use futures_util::{StreamExt, future::join_all};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection,
    message::BasicReturnMessage,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::{AMQPValue, FieldTable, LongString, ShortString},
};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::ack::{Acker, Settle};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::endpoints::Endpoints;

/// The RabbitMQ nodes of `RABBITMQ_URL`.
type Brokers = Endpoints<lapin::uri::AMQPUri>;
use crate::event::{InvalidKind, InvalidMessage};
use crate::metrics::Metrics;

/// Header names on dead-lettered messages.
pub mod headers {
    /// The [`InvalidKind`](crate::InvalidKind) name, e.g. `not_json`.
    pub const KIND: &str = "x-error-kind";
    /// A readable reason, e.g. ``field `timestamp` ("yesterday"): expected ISO 8601...``.
    pub const REASON: &str = "x-error-reason";
    /// The exchange the message was published to.
    pub const ORIGINAL_EXCHANGE: &str = "x-original-exchange";
    /// The routing key it was published with.
    pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";
    /// The original's `expiration` property. Copies never expire in the dead-letter
    /// queue, so the property moves into this header.
    pub const ORIGINAL_EXPIRATION: &str = "x-original-expiration";
    /// When it was dead-lettered (AMQP timestamp, seconds).
    pub const FAILED_AT: &str = "x-failed-at";
    /// The consumer tag of the consumer that dead-lettered it.
    pub const CONSUMER: &str = "x-consumer-tag";
    /// A unique id of the copy. A copy whose confirm was lost is published again with the
    /// same id, so a reader can drop the rare second copy.
    pub const ID: &str = "x-dead-letter-id";
    /// Set when the original's own headers were left off the copy, to the size in bytes
    /// of its encoded properties: with the headers above added they would not have fit
    /// into one frame of the dead-letter connection (a message's properties are never
    /// split, and the broker closes a connection that sends a frame over its size).
    pub const ORIGINAL_HEADERS_DROPPED: &str = "x-original-headers-dropped";
}

/// A content header frame's bytes besides the properties: the frame's type, channel and
/// size (7) and end octet (1); the class, weight and body size (12).
const HEADER_FRAME_OVERHEAD: usize = 20;
/// Longest reason text put into a header.
const MAX_REASON_CHARS: usize = 1000;
/// The most copies published in one round.
const MAX_ROUND: usize = 1000;
/// How long the broker may take to confirm a round while the connection is not blocked;
/// then the connection is replaced and the round published again.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a wait for dead letters looks whether their connection got blocked.
const BLOCKED_POLL: Duration = Duration::from_millis(100);
/// How long to wait for the dead-letter connection when opening it.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a dead letter is made of besides its body: where the original came from and its
/// properties.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Origin {
    pub(crate) exchange: ShortString,
    pub(crate) routing_key: ShortString,
    pub(crate) properties: BasicProperties,
}

/// A copy waiting to be published and confirmed.
#[derive(Debug)]
struct Copy {
    /// The original's delivery tag on the consuming channel.
    tag: u64,
    id: String,
    kind: InvalidKind,
    body: Vec<u8>,
    properties: BasicProperties,
    /// `properties` without the original's headers, for a connection whose frames are
    /// too small for them.
    without_original_headers: BasicProperties,
}

impl Copy {
    /// The properties to publish on a connection whose frames hold `frame_max` bytes:
    /// the original's headers are left off a copy that would not fit with them. The
    /// original fitted, but the added headers (up to about 5 KiB) can push one with
    /// nearly a frame of headers over, and the broker would close every connection that
    /// sent it: the outbox would retry it forever.
    fn properties_for(&self, frame_max: usize) -> &BasicProperties {
        let size = encoded_size(&self.properties);
        if size.saturating_add(HEADER_FRAME_OVERHEAD) <= frame_max {
            return &self.properties;
        }
        log::warn!(
            "dead letter {}: the original's headers are left off the copy: with the reason \
             headers its properties take {size} bytes, more than a frame of {frame_max} holds",
            self.id
        );
        &self.without_original_headers
    }
}

/// The sending side of a session's dead letters. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct DeadLetters {
    outbox: Option<mpsc::UnboundedSender<Copy>>,
    acker: Acker,
    metrics: Arc<Metrics>,
    consumer_tag: String,
    ids: Arc<IdSource>,
    state: Arc<OutboxState>,
}

/// What the outbox shares with its senders.
#[derive(Debug, Default)]
struct OutboxState {
    /// Copies handed over and not yet settled.
    pending: AtomicUsize,
    /// Signalled when `pending` reaches zero.
    idle: Notify,
    /// Cancelled when a copy was returned or refused: the dead-letter queue is gone.
    refused: CancellationToken,
    /// Cancelled when the session ends: the outbox stops where it is.
    stop: CancellationToken,
    /// Cancelled when the outbox task has ended (stopped, or the consuming channel is
    /// gone): the copies still pending will never be settled by it.
    ended: CancellationToken,
}

#[derive(Debug)]
struct IdSource {
    prefix: String,
    next: AtomicU64,
}

impl DeadLetters {
    /// Starts the outbox. Its connection of its own is opened for the first invalid
    /// message, not before: lapin holds 8 MiB of buffers per connection (at the broker's
    /// default frame size), which a stream of valid clicks never needs. Without a
    /// dead-letter queue (dead-lettering disabled) invalid messages are rejected instead,
    /// and no connection is opened.
    pub(crate) fn start(
        config: &Arc<Config>,
        brokers: Arc<Brokers>,
        acker: Acker,
        metrics: Arc<Metrics>,
        consumer_tag: String,
    ) -> Self {
        let state = Arc::new(OutboxState::default());
        let ids = Arc::new(IdSource {
            prefix: format!(
                "{consumer_tag}-{:016x}",
                RandomState::new().hash_one(SystemTime::now())
            ),
            next: AtomicU64::new(1),
        });
        let outbox = match config.dead_letter_queue() {
            None => None,
            Some(queue) => {
                let (sender, receiver) = mpsc::unbounded_channel();
                let outbox = Outbox {
                    config: config.clone(),
                    queue,
                    brokers,
                    receiver,
                    channel: None,
                    acker: acker.clone(),
                    metrics: metrics.clone(),
                    state: state.clone(),
                };
                let stop = state.stop.clone();
                let ended = state.ended.clone();
                tokio::spawn(async move {
                    tokio::select! {
                        () = stop.cancelled() => {}
                        () = outbox.run() => {}
                    }
                    ended.cancel();
                });
                Some(sender)
            }
        };
        DeadLetters {
            outbox,
            acker,
            metrics,
            consumer_tag,
            ids,
            state,
        }
    }

    /// Dead-letters the message with delivery tag `tag` because of `reason`: hands a copy
    /// to the outbox (the original is acknowledged once the copy is confirmed), or rejects
    /// it when dead-lettering is disabled.
    ///
    /// # Errors
    /// The consuming channel failed (reject), or the outbox is gone (session ending).
    pub(crate) async fn send(
        &self,
        tag: u64,
        body: Vec<u8>,
        origin: &Origin,
        reason: &InvalidMessage,
    ) -> Result<(), lapin::Error> {
        let Some(outbox) = &self.outbox else {
            self.acker.settle(&[tag], Settle::Reject).await?;
            self.metrics.dead_lettered(reason.kind());
            return Ok(());
        };
        let id = format!(
            "{}-{}",
            self.ids.prefix,
            self.ids.next.fetch_add(1, Ordering::Relaxed)
        );
        let copy = Copy {
            tag,
            properties: copy_properties(origin, reason, &self.consumer_tag, &id, true),
            without_original_headers: without_original_headers(
                origin,
                reason,
                &self.consumer_tag,
                &id,
            ),
            id,
            kind: reason.kind(),
            body,
        };
        self.acker.set_aside(tag).await;
        self.state.pending.fetch_add(1, Ordering::SeqCst);
        outbox.send(copy).map_err(|_| {
            self.state.pending.fetch_sub(1, Ordering::SeqCst);
            lapin::Error::from(std::io::Error::other("the dead-letter outbox has stopped"))
        })
    }

    /// Copies handed over whose originals are not settled yet.
    pub(crate) fn pending(&self) -> usize {
        self.state.pending.load(Ordering::SeqCst)
    }

    /// Completes once every copy handed over is settled, or the outbox has ended (what
    /// it left pending returns to the queue with the channel).
    pub(crate) async fn idle(&self) {
        loop {
            let notified = self.state.idle.notified();
            if self.pending() == 0 || self.state.ended.is_cancelled() {
                return;
            }
            tokio::select! {
                () = notified => {}
                () = self.state.ended.cancelled() => return,
            }
        }
    }

    /// Completes once every copy handed over is settled, or as soon as RabbitMQ blocks
    /// the dead-letter connection (resource alarm): nothing can be confirmed before the
    /// alarm clears, so a session that is ending must not wait for it. Returns whether
    /// every copy is settled.
    pub(crate) async fn idle_unless_blocked(&self) -> bool {
        loop {
            if self.pending() == 0 {
                return true;
            }
            if self.metrics.broker_blocked() {
                return false;
            }
            if tokio::time::timeout(BLOCKED_POLL, self.idle())
                .await
                .is_ok()
            {
                return self.pending() == 0;
            }
        }
    }

    /// Stops the outbox where it is (the session is ending). Originals of copies not
    /// confirmed yet stay unacknowledged and return to the queue with the channel.
    pub(crate) fn stop(&self) {
        self.state.stop.cancel();
    }

    /// Completes when a copy was returned or refused by the broker (the dead-letter queue
    /// is gone): its original went back to the queue, the topology needs declaring again.
    /// Made once, it can be polled on every turn of a loop without registering anew.
    pub(crate) fn refused(&self) -> WaitForCancellationFutureOwned {
        self.state.refused.clone().cancelled_owned()
    }
}

/// [`copy_properties`] without the original's own headers, and with
/// [`headers::ORIGINAL_HEADERS_DROPPED`] giving the size of the original's properties.
fn without_original_headers(
    origin: &Origin,
    reason: &InvalidMessage,
    consumer_tag: &str,
    id: &str,
) -> BasicProperties {
    let copy = copy_properties(origin, reason, consumer_tag, id, false);
    let mut headers = copy.headers().clone().unwrap_or_default();
    let original = encoded_size(&origin.properties);
    headers.insert(
        ShortString::from(headers::ORIGINAL_HEADERS_DROPPED),
        AMQPValue::LongLongInt(i64::try_from(original).unwrap_or(i64::MAX)),
    );
    copy.with_headers(headers)
}

/// The bytes `properties` take in a content header frame, as the client encodes them.
fn encoded_size(properties: &BasicProperties) -> usize {
    cookie_factory::gen_simple(
        lapin::protocol::basic::gen_properties(properties),
        Vec::new(),
    )
    .map_or(usize::MAX, |bytes| bytes.len())
}

/// The original's properties, always persistent, without `expiration` (kept in a header),
/// with the reason added to the headers (to the original's own headers when
/// `with_original_headers`).
fn copy_properties(
    origin: &Origin,
    reason: &InvalidMessage,
    consumer_tag: &str,
    id: &str,
    with_original_headers: bool,
) -> BasicProperties {
    let mut headers = if with_original_headers {
        origin.properties.headers().clone().unwrap_or_default()
    } else {
        FieldTable::default()
    };
    let mut put = |name: &str, value: AMQPValue| {
        headers.insert(ShortString::from(name), value);
    };
    let text = |s: &str| AMQPValue::LongString(LongString::from(s));
    let reason_text: String = reason.to_string().chars().take(MAX_REASON_CHARS).collect();
    put(headers::KIND, text(reason.kind().as_str()));
    put(headers::REASON, text(&reason_text));
    put(headers::ORIGINAL_EXCHANGE, text(origin.exchange.as_str()));
    put(
        headers::ORIGINAL_ROUTING_KEY,
        text(origin.routing_key.as_str()),
    );
    if let Some(expiration) = origin.properties.expiration() {
        put(headers::ORIGINAL_EXPIRATION, text(expiration.as_str()));
    }
    put(headers::CONSUMER, text(consumer_tag));
    put(headers::ID, text(id));
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    put(headers::FAILED_AT, AMQPValue::Timestamp(now));
    let p = &origin.properties;
    // Every property but `expiration` and `delivery_mode`, set one by one (the client
    // has no way to unset a property).
    let mut copy = BasicProperties::default()
        .with_headers(headers)
        .with_delivery_mode(2);
    if let Some(v) = p.content_type() {
        copy = copy.with_content_type(v.clone());
    }
    if let Some(v) = p.content_encoding() {
        copy = copy.with_content_encoding(v.clone());
    }
    if let Some(v) = p.priority() {
        copy = copy.with_priority(*v);
    }
    if let Some(v) = p.correlation_id() {
        copy = copy.with_correlation_id(v.clone());
    }
    if let Some(v) = p.reply_to() {
        copy = copy.with_reply_to(v.clone());
    }
    if let Some(v) = p.message_id() {
        copy = copy.with_message_id(v.clone());
    }
    if let Some(v) = p.timestamp() {
        copy = copy.with_timestamp(*v);
    }
    if let Some(v) = p.kind() {
        copy = copy.with_type(v.clone());
    }
    if let Some(v) = p.user_id() {
        copy = copy.with_user_id(v.clone());
    }
    if let Some(v) = p.app_id() {
        copy = copy.with_app_id(v.clone());
    }
    if let Some(v) = p.cluster_id() {
        copy = copy.with_cluster_id(v.clone());
    }
    copy
}

/// Opens the dead-letter connection and its confirm-mode channel, and reports the
/// connection's blocked / unblocked notifications.
async fn open_channel(
    config: &Config,
    brokers: &Brokers,
    metrics: &Arc<Metrics>,
) -> Result<(Channel, usize), lapin::Error> {
    let connection =
        crate::broker::connect(brokers, config, CONNECT_TIMEOUT, "dead-letters").await?;
    watch_blocked(&connection, metrics.clone());
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    // Negotiated with the node this connection reached; every URL of a list can set its
    // own `frame_max`. lapin raises it to at least 8192 (0, no limit, to u32::MAX), which
    // a copy without the original's headers always fits into: see
    // `tests::a_copy_without_the_original_headers_fits_the_smallest_frame`.
    let frame_max = usize::try_from(connection.configuration().frame_max()).unwrap_or(usize::MAX);
    Ok((channel, frame_max))
}

fn watch_blocked(connection: &Connection, metrics: Arc<Metrics>) {
    let mut events = Box::pin(connection.events_listener());
    tokio::spawn(async move {
        // Only this connection's own block is undone: a newer dead-letter connection
        // may be blocked while this one closes.
        let mut blocked = false;
        while let Some(event) = events.next().await {
            match event {
                lapin::Event::ConnectionBlocked(reason) if !blocked => {
                    log::warn!(
                        "RabbitMQ blocked the dead-letter connection ({reason}): dead letters wait, stored rows are still acknowledged"
                    );
                    blocked = true;
                    metrics.set_broker_blocked(true);
                }
                lapin::Event::ConnectionUnblocked if blocked => {
                    log::warn!("RabbitMQ unblocked the dead-letter connection");
                    blocked = false;
                    metrics.set_broker_blocked(false);
                }
                lapin::Event::Error(_) => break,
                _ => {}
            }
        }
        if blocked {
            metrics.set_broker_blocked(false);
        }
    });
}

/// The task that publishes copies and settles their originals.
struct Outbox {
    config: Arc<Config>,
    queue: String,
    /// The broker's nodes, shared with the consuming session (the same node is used).
    brokers: Arc<Brokers>,
    receiver: mpsc::UnboundedReceiver<Copy>,
    /// The confirming channel and its connection's `frame_max`.
    channel: Option<(Channel, usize)>,
    acker: Acker,
    metrics: Arc<Metrics>,
    state: Arc<OutboxState>,
}

/// What became of a round.
enum Round {
    /// Every copy settled (confirmed, or returned and its original requeued).
    Done,
    /// These copies must be published again (connection lost or confirms timed out).
    Retry(Vec<Copy>),
    /// The consuming channel is gone: nothing more can be settled.
    Stop,
}

impl Outbox {
    async fn run(mut self) {
        let mut retry: Vec<Copy> = Vec::new();
        let mut backoff = Backoff::new(
            self.config.retry_initial_backoff,
            self.config.retry_max_backoff,
        );
        loop {
            let mut round = std::mem::take(&mut retry);
            if round.is_empty() {
                match self.receiver.recv().await {
                    Some(copy) => round.push(copy),
                    None => return,
                }
            }
            while round.len() < MAX_ROUND {
                match self.receiver.try_recv() {
                    Ok(copy) => round.push(copy),
                    Err(_) => break,
                }
            }
            match self.publish(round).await {
                Round::Done => backoff.reset(),
                Round::Retry(copies) => {
                    self.metrics.dead_letter_retries.inc_by(copies.len() as u64);
                    retry = copies;
                    tokio::time::sleep(backoff.next_delay()).await;
                }
                Round::Stop => return,
            }
        }
    }

    async fn channel(&mut self) -> Result<(Channel, usize), lapin::Error> {
        if let Some((channel, frame_max)) = &self.channel
            && channel.status().connected()
        {
            return Ok((channel.clone(), *frame_max));
        }
        self.channel = None;
        let opened = open_channel(&self.config, &self.brokers, &self.metrics).await?;
        self.channel = Some(opened.clone());
        Ok(opened)
    }

    /// Publishes a round and waits for all its confirms.
    async fn publish(&mut self, round: Vec<Copy>) -> Round {
        let (channel, frame_max) = match self.channel().await {
            Ok(opened) => opened,
            Err(e) => {
                log::warn!(
                    "cannot open the dead-letter connection: {e}; {} dead letters wait",
                    round.len()
                );
                return Round::Retry(round);
            }
        };
        let mut confirms = Vec::with_capacity(round.len());
        for copy in &round {
            let publish = channel.basic_publish(
                ShortString::from(""),
                ShortString::from(self.queue.as_str()),
                // Mandatory: if the dead-letter queue is gone the broker returns the copy
                // instead of dropping it, and the original is not acknowledged.
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &copy.body,
                copy.properties_for(frame_max).clone(),
            );
            match publish.await {
                Ok(confirm) => confirms.push(confirm),
                Err(e) => {
                    log::warn!("publishing dead letters failed: {e}; publishing them again");
                    self.channel = None;
                    return Round::Retry(round);
                }
            }
        }
        let results = match self.confirmed(&channel, join_all(confirms)).await {
            Some(results) => results,
            None => {
                log::warn!(
                    "RabbitMQ did not confirm {} dead letters within {CONFIRM_TIMEOUT:?}: publishing them again on a new connection",
                    round.len()
                );
                self.channel = None;
                let _ = channel
                    .close(200, ShortString::from("confirms timed out"))
                    .await;
                return Round::Retry(round);
            }
        };
        let mut returned = HashSet::new();
        let mut failed = false;
        for result in &results {
            match result {
                Ok(Confirmation::Ack(Some(message)) | Confirmation::Nack(Some(message))) => {
                    returned.insert(copy_id(message));
                }
                Err(_) => failed = true,
                _ => {}
            }
        }
        if failed {
            log::warn!("the dead-letter channel failed before confirming; publishing again");
            self.channel = None;
            return Round::Retry(round);
        }
        self.settle(round, results, &returned).await
    }

    /// Waits for `confirms`, giving up after [`CONFIRM_TIMEOUT`] of time not blocked.
    async fn confirmed<F: Future>(&self, channel: &Channel, confirms: F) -> Option<F::Output> {
        tokio::pin!(confirms);
        loop {
            match tokio::time::timeout(CONFIRM_TIMEOUT, &mut confirms).await {
                Ok(results) => return Some(results),
                Err(_) if self.metrics.broker_blocked() && channel.status().connected() => {
                    log::debug!("dead-letter confirms wait for the broker to unblock");
                }
                Err(_) => return None,
            }
        }
    }

    async fn settle(
        &self,
        round: Vec<Copy>,
        results: Vec<lapin::Result<Confirmation>>,
        returned: &HashSet<Option<String>>,
    ) -> Round {
        let mut confirmed = Vec::new();
        let mut refused = Vec::new();
        for (copy, result) in round.iter().zip(results) {
            let ok = matches!(
                result,
                Ok(Confirmation::Ack(_) | Confirmation::NotRequested)
            ) && !returned.contains(&Some(copy.id.clone()));
            if ok {
                log::debug!("delivery {}: dead letter {} confirmed", copy.tag, copy.id);
                self.metrics.dead_lettered(copy.kind);
                confirmed.push(copy.tag);
            } else {
                refused.push(copy.tag);
            }
        }
        if !refused.is_empty() {
            log::warn!(
                "{} dead letters were returned or refused by RabbitMQ (is the dead-letter queue `{}` gone?): their originals go back to the queue",
                refused.len(),
                self.queue
            );
            self.metrics
                .dead_letters_refused
                .inc_by(refused.len() as u64);
        }
        let settled = async {
            self.acker.settle(&confirmed, Settle::Ack).await?;
            self.acker.settle(&refused, Settle::Requeue).await
        };
        let outcome = match settled.await {
            Ok(_) => Round::Done,
            Err(e) => {
                log::debug!("cannot settle dead-lettered originals: {e}");
                Round::Stop
            }
        };
        if !refused.is_empty() {
            self.state.refused.cancel();
        }
        if self.state.pending.fetch_sub(round.len(), Ordering::SeqCst) == round.len() {
            self.state.idle.notify_waiters();
        }
        outcome
    }
}

/// The `x-dead-letter-id` of a returned copy.
fn copy_id(message: &BasicReturnMessage) -> Option<String> {
    let headers: &FieldTable = message.properties.headers().as_ref()?;
    match headers.inner().get(headers::ID)? {
        AMQPValue::LongString(id) => Some(id.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest `frame_max` lapin negotiates (it raises a smaller one to this).
    const MIN_FRAME_MAX: usize = 8192;

    fn copy_of(origin: &Origin, reason: &InvalidMessage, consumer_tag: &str, id: &str) -> Copy {
        Copy {
            tag: 1,
            id: id.to_owned(),
            kind: reason.kind(),
            body: Vec::new(),
            properties: copy_properties(origin, reason, consumer_tag, id, true),
            without_original_headers: without_original_headers(origin, reason, consumer_tag, id),
        }
    }

    fn header(properties: &BasicProperties, name: &str) -> Option<AMQPValue> {
        properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get(name).cloned())
    }

    #[test]
    fn original_headers_are_left_off_a_copy_only_when_it_would_outgrow_the_frame() {
        let mut original = FieldTable::default();
        original.insert(
            ShortString::from("big"),
            AMQPValue::LongString(LongString::from("h".repeat(3_000))),
        );
        let origin = Origin {
            exchange: ShortString::from("url_shortener"),
            routing_key: ShortString::from("click_events"),
            properties: BasicProperties::default()
                .with_headers(original)
                .with_message_id(ShortString::from("m-1")),
        };
        let reason = InvalidMessage::new(InvalidKind::NotJson, "not JSON");
        let copy = copy_of(&origin, &reason, "c", "id-1");
        // The frame the copy fills exactly: content header frame = properties + 20.
        let full = encoded_size(&copy.properties) + HEADER_FRAME_OVERHEAD;
        for frame_max in [full, 131_072] {
            let kept = copy.properties_for(frame_max);
            assert!(header(kept, "big").is_some(), "kept (frame {frame_max})");
            assert_eq!(header(kept, headers::ORIGINAL_HEADERS_DROPPED), None);
        }
        let left_off = copy.properties_for(full - 1);
        assert_eq!(header(left_off, "big"), None, "left off");
        assert_eq!(
            header(left_off, headers::ORIGINAL_HEADERS_DROPPED),
            Some(AMQPValue::LongLongInt(
                encoded_size(&origin.properties) as i64
            ))
        );
        assert!(
            header(left_off, headers::KIND).is_some(),
            "the reason stays"
        );
        assert_eq!(left_off.message_id(), origin.properties.message_id());
    }

    #[test]
    fn a_copy_without_the_original_headers_fits_the_smallest_frame() {
        // Every property at its longest: short strings hold 255 bytes, the reason is cut
        // at MAX_REASON_CHARS characters of up to 4 bytes each.
        let long = || ShortString::from("x".repeat(255));
        let mut original = FieldTable::default();
        original.insert(
            ShortString::from("big"),
            AMQPValue::LongString(LongString::from("h".repeat(200_000))),
        );
        let origin = Origin {
            exchange: long(),
            routing_key: long(),
            properties: BasicProperties::default()
                .with_content_type(long())
                .with_content_encoding(long())
                .with_headers(original)
                .with_delivery_mode(1)
                .with_priority(9)
                .with_correlation_id(long())
                .with_reply_to(long())
                .with_expiration(long())
                .with_message_id(long())
                .with_timestamp(1)
                .with_type(long())
                .with_user_id(long())
                .with_app_id(long())
                .with_cluster_id(long()),
        };
        let reason = InvalidMessage::new(InvalidKind::InvalidField, "\u{1D11E}".repeat(5_000));
        let tag = "t".repeat(255);
        let id = format!("{tag}-{:016x}-{}", u64::MAX, u64::MAX);
        let copy = copy_of(&origin, &reason, &tag, &id);
        let stripped = copy.properties_for(MIN_FRAME_MAX);
        assert!(header(stripped, "big").is_none());
        let size = encoded_size(stripped) + HEADER_FRAME_OVERHEAD;
        assert!(size <= MIN_FRAME_MAX, "{size} bytes");
    }

    #[test]
    fn copies_are_persistent_and_never_expire() {
        let origin = Origin {
            exchange: ShortString::from("url_shortener"),
            routing_key: ShortString::from("click_events"),
            properties: BasicProperties::default()
                .with_delivery_mode(1)
                .with_expiration(ShortString::from("60000"))
                .with_content_type(ShortString::from("application/json"))
                .with_message_id(ShortString::from("m-1")),
        };
        let reason = InvalidMessage::new(InvalidKind::NotJson, "not JSON");
        let copy = copy_properties(&origin, &reason, "consumer-1", "id-7", true);
        assert_eq!(copy.delivery_mode(), &Some(2), "copies are persistent");
        assert_eq!(copy.expiration(), &None, "copies never expire");
        assert_eq!(copy.content_type(), origin.properties.content_type());
        assert_eq!(copy.message_id(), origin.properties.message_id());
        let headers = copy.headers().clone().unwrap();
        let header = |name: &str| headers.inner().get(name).cloned();
        assert_eq!(
            header(headers::ORIGINAL_EXPIRATION),
            Some(AMQPValue::LongString(LongString::from("60000")))
        );
        assert_eq!(
            header(headers::ID),
            Some(AMQPValue::LongString(LongString::from("id-7")))
        );
        assert_eq!(
            header(headers::KIND),
            Some(AMQPValue::LongString(LongString::from("not_json")))
        );
    }
}
