//! Publishing clicks, for the URL shortener's redirect handler: the same topology as the
//! consumer, persistent messages, publisher confirms.

use std::{sync::Arc, time::Duration};

use lapin::{
    BasicProperties, Channel, Confirmation, Connection, PublisherConfirm,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::ShortString,
};

use crate::broker;
use crate::config::Config;
use crate::error::{Error, Result};
use crate::event::ClickEvent;

/// How long [`ClickPublisher::connect`] waits for the broker.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Publishes [`ClickEvent`]s to the exchange a [`Consumer`](crate::Consumer) reads from.
///
/// Cheap to clone; clones share one connection and one confirm-mode channel, so many
/// tasks can publish at once. Each publish returns once the broker has confirmed the
/// message is stored (persistent, on a durable queue).
///
/// ```no_run
/// use click_consumer::{ClickEvent, ClickPublisher, Config};
///
/// # async fn handler() -> click_consumer::Result<()> {
/// let publisher = ClickPublisher::connect(&Config::from_env()?).await?;
/// publisher
///     .publish(&ClickEvent::now("abc123").with_user_agent("curl/8.5.0"))
///     .await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct ClickPublisher {
    connection: Arc<Connection>,
    channel: Channel,
    exchange: ShortString,
    routing_key: ShortString,
}

impl std::fmt::Debug for ClickPublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickPublisher")
            .field("exchange", &self.exchange.as_str())
            .field("routing_key", &self.routing_key.as_str())
            .finish_non_exhaustive()
    }
}

impl ClickPublisher {
    /// Connects and declares the exchange, the queue and its binding (the consumer's
    /// topology, so that no click is lost if the consumer has not started yet).
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] for a bad configuration, [`Error::BrokerUnreachable`]
    /// when the broker does not answer, [`Error::Topology`] when the exchange or queue
    /// exists with other properties.
    pub async fn connect(config: &Config) -> Result<Self> {
        config.validate()?;
        let connection = broker::connect(
            &broker::nodes(&config.rabbitmq_url)?,
            config,
            CONNECT_TIMEOUT,
            "publish",
        )
        .await
        .map_err(|source| Error::BrokerUnreachable {
            url: config.rabbitmq_url_redacted(),
            waited: CONNECT_TIMEOUT,
            source,
        })?;
        let channel = connection
            .create_channel()
            .await
            .map_err(|e| Error::broker("failed to open a channel", e))?;
        broker::declare_topology(&channel, config).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| Error::broker("failed to enable publisher confirms", e))?;
        Ok(ClickPublisher {
            connection: Arc::new(connection),
            channel,
            exchange: ShortString::from(config.exchange.as_str()),
            routing_key: ShortString::from(config.routing_key()),
        })
    }

    /// Publishes one click and waits for the broker's confirm.
    ///
    /// # Errors
    /// [`Error::Broker`] if the channel is closed or the broker refuses the message.
    pub async fn publish(&self, event: &ClickEvent) -> Result<()> {
        let body = serde_json::to_vec(event).expect("a ClickEvent always serializes");
        let confirm = self.send(&body).await?;
        check(confirm.await)
    }

    /// Publishes many clicks, then waits for all their confirms: much faster than one
    /// [`ClickPublisher::publish`] after another.
    ///
    /// # Errors
    /// [`Error::Broker`] on the first failed publish or refused confirm.
    pub async fn publish_all<'a>(
        &self,
        events: impl IntoIterator<Item = &'a ClickEvent>,
    ) -> Result<()> {
        let mut confirms = Vec::new();
        for event in events {
            let body = serde_json::to_vec(event).expect("a ClickEvent always serializes");
            confirms.push(self.send(&body).await?);
        }
        for confirm in confirms {
            check(confirm.await)?;
        }
        Ok(())
    }

    /// Publishes a raw body as it is, e.g. to test what the consumer does with it.
    ///
    /// # Errors
    /// [`Error::Broker`] if the channel is closed or the broker refuses the message.
    pub async fn publish_bytes(&self, body: &[u8]) -> Result<()> {
        let confirm = self.send(body).await?;
        check(confirm.await)
    }

    async fn send(&self, body: &[u8]) -> Result<PublisherConfirm> {
        let properties = BasicProperties::default()
            .with_content_type(ShortString::from("application/json"))
            .with_delivery_mode(2);
        self.channel
            .basic_publish(
                self.exchange.clone(),
                self.routing_key.clone(),
                // Mandatory: a click the broker cannot route to any queue (the queue was
                // deleted) comes back as an error instead of vanishing.
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .map_err(|e| {
                Error::broker(
                    format!("failed to publish to exchange `{}`", self.exchange),
                    e,
                )
            })
    }

    /// Closes the channel and the connection (for every clone).
    ///
    /// # Errors
    /// [`Error::Broker`] if the connection was already broken.
    pub async fn close(self) -> Result<()> {
        let _ = self.channel.close(200, ShortString::from("bye")).await;
        self.connection
            .close(200, ShortString::from("bye"))
            .await
            .map_err(|e| Error::broker("failed to close the connection", e))
    }
}

fn check(confirmation: lapin::Result<Confirmation>) -> Result<()> {
    match confirmation {
        Ok(Confirmation::Ack(None) | Confirmation::NotRequested) => Ok(()),
        Ok(Confirmation::Ack(Some(returned))) => Err(Error::broker(
            format!(
                "the broker could not route the click to any queue ({}): is the queue bound to the exchange?",
                returned.reply_text
            ),
            lapin::Error::from(std::io::Error::other("basic.return")),
        )),
        Ok(Confirmation::Nack(_)) => Err(Error::broker(
            "the broker refused the message",
            lapin::Error::from(std::io::Error::other("basic.nack")),
        )),
        Err(e) => Err(Error::broker("failed to get the publish confirmed", e)),
    }
}
