//! Dead-lettering: a message that cannot be stored is published, unchanged, to the
//! dead-letter queue with headers that say why, and acknowledged only once the broker
//! has confirmed that copy. With dead-lettering disabled it is rejected without requeue.

use std::time::{SystemTime, UNIX_EPOCH};

use lapin::{
    BasicProperties, Channel, Confirmation,
    message::Delivery,
    options::{BasicPublishOptions, BasicRejectOptions},
    types::{AMQPValue, LongString, ShortString},
};

use crate::batch::PendingDeadLetter;
use crate::event::InvalidMessage;

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
    /// When it was dead-lettered (AMQP timestamp, seconds).
    pub const FAILED_AT: &str = "x-failed-at";
    /// The consumer tag of the consumer that dead-lettered it.
    pub const CONSUMER: &str = "x-consumer-tag";
}

/// Longest reason text put into a header.
const MAX_REASON_CHARS: usize = 1000;

/// Where invalid messages go, for one broker session.
#[derive(Debug, Clone)]
pub(crate) struct DeadLetters {
    /// A channel in confirm mode, separate from the consuming one.
    publish: Channel,
    /// The consuming channel, for rejects.
    consume: Channel,
    queue: Option<String>,
    consumer_tag: String,
}

/// What became of a message handed to [`DeadLetters::send`].
#[derive(Debug)]
pub(crate) enum Sent {
    /// Published; ack after the confirm.
    Pending(PendingDeadLetter),
    /// Rejected without requeue (dead-lettering disabled): settled already.
    Rejected,
}

impl DeadLetters {
    pub(crate) fn new(
        publish: Channel,
        consume: Channel,
        queue: Option<String>,
        consumer_tag: String,
    ) -> Self {
        DeadLetters {
            publish,
            consume,
            queue,
            consumer_tag,
        }
    }

    /// Dead-letters `delivery` because of `reason`.
    pub(crate) async fn send(
        &self,
        delivery: &Delivery,
        reason: &InvalidMessage,
    ) -> Result<Sent, lapin::Error> {
        let Some(queue) = &self.queue else {
            self.consume
                .basic_reject(delivery.delivery_tag, BasicRejectOptions { requeue: false })
                .await?;
            return Ok(Sent::Rejected);
        };
        let properties = self.properties(delivery, reason);
        let confirm = self
            .publish
            .basic_publish(
                ShortString::from(""),
                ShortString::from(queue.as_str()),
                // Mandatory: if the dead-letter queue is gone the broker returns the copy
                // instead of dropping it, and we do not ack the original.
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &delivery.data,
                properties,
            )
            .await?;
        Ok(Sent::Pending(PendingDeadLetter {
            delivery_tag: delivery.delivery_tag,
            confirm,
        }))
    }

    /// The original properties, persistent, with the reason added to the headers.
    fn properties(&self, delivery: &Delivery, reason: &InvalidMessage) -> BasicProperties {
        let mut headers = delivery.properties.headers().clone().unwrap_or_default();
        let mut put = |name: &str, value: AMQPValue| {
            headers.insert(ShortString::from(name), value);
        };
        let text = |s: &str| AMQPValue::LongString(LongString::from(s));
        let reason_text: String = reason.to_string().chars().take(MAX_REASON_CHARS).collect();
        put(headers::KIND, text(reason.kind().as_str()));
        put(headers::REASON, text(&reason_text));
        put(headers::ORIGINAL_EXCHANGE, text(delivery.exchange.as_str()));
        put(
            headers::ORIGINAL_ROUTING_KEY,
            text(delivery.routing_key.as_str()),
        );
        put(headers::CONSUMER, text(&self.consumer_tag));
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        put(headers::FAILED_AT, AMQPValue::Timestamp(now));
        let properties = delivery.properties.clone().with_headers(headers);
        if properties.delivery_mode().is_none() {
            properties.with_delivery_mode(2)
        } else {
            properties
        }
    }
}

/// Waits for the broker to confirm a dead letter. `false` when the copy was refused or
/// returned unroutable: then the original must go back to the queue, not be acked.
pub(crate) async fn confirmed(pending: PendingDeadLetter) -> Result<bool, lapin::Error> {
    Ok(match pending.confirm.await? {
        Confirmation::Ack(None) | Confirmation::NotRequested => true,
        Confirmation::Ack(Some(_)) | Confirmation::Nack(_) => false,
    })
}
