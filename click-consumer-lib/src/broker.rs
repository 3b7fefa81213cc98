//! RabbitMQ: the URL, connecting, and the topology shared by the consumer and the
//! publisher (exchange, queue, binding, dead-letter queue).

use std::time::Duration;

use lapin::{
    Channel, Connection, ConnectionProperties, ExchangeKind,
    options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions},
    protocol::{AMQPErrorKind, AMQPSoftError},
    tcp::OwnedTLSConfig,
    types::{AMQPValue, FieldTable, LongString, ShortString},
    uri::AMQPUri,
};

use crate::config::{Config, ExchangeType, QueueType};
use crate::endpoints::{self, Endpoints};
use crate::error::{Error, Result};
use crate::secret::{Scrubber, shown_url};

/// How many times a quorum queue redelivers a message before dead-lettering it.
pub(crate) const QUORUM_DELIVERY_LIMIT: i64 = 20;

/// How many times the message was delivered before, from the `x-delivery-count` header
/// that quorum queues set (0 without it).
pub(crate) fn delivery_count(properties: &lapin::BasicProperties) -> u32 {
    let Some(headers) = properties.headers() else {
        return 0;
    };
    let count = match headers.inner().get("x-delivery-count") {
        Some(AMQPValue::LongLongInt(n)) => *n,
        Some(AMQPValue::LongInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortInt(n)) => i64::from(*n),
        Some(AMQPValue::LongUInt(n)) => i64::from(*n),
        Some(AMQPValue::ShortShortInt(n)) => i64::from(*n),
        _ => 0,
    };
    u32::try_from(count).unwrap_or(0)
}

/// Parses an AMQP URL the way the Python clients do: an empty path (`amqp://host:5672/`)
/// is the default vhost `/`, not the empty vhost lapin would read. Errors never include
/// the password.
///
/// No `frame_max` is proposed unless the URL sets one: the broker's (128 KiB by default)
/// applies. A smaller one would save memory (lapin keeps 32 frames per direction per
/// connection, zero-filled: 8 MiB a connection at 128 KiB), but RabbitMQ never splits a
/// message's header frame, so a message whose properties outgrow the frame would close
/// the connection on every delivery.
pub(crate) fn parse_url(url: &str) -> Result<AMQPUri> {
    let mut uri: AMQPUri = url.parse().map_err(|e: String| {
        // The parser's message may quote the URL or pieces of it: show the value only
        // redacted, and the message only with every form of the password removed.
        let scrubber = Scrubber::new().with_url(url);
        let message = match shown_url(url) {
            Some(shown) => {
                let detail = e.replace(url, &shown);
                format!("`{shown}` is not an AMQP URL: {}", scrubber.scrub(&detail))
            }
            None => "the value is not an AMQP URL: expected amqp://user:password@host:port/vhost"
                .to_owned(),
        };
        Error::setting("RABBITMQ_URL", message)
    })?;
    if uri.vhost.is_empty() {
        uri.vhost = "/".to_owned();
    }
    Ok(uri)
}

/// The nodes of `RABBITMQ_URL`: one AMQP URL, or several separated by commas (the nodes
/// of a cluster), each following the rules of [`parse_url`].
///
/// # Errors
/// [`Error::InvalidSetting`] naming `RABBITMQ_URL`, never showing a password.
pub(crate) fn nodes(list: &str) -> Result<Endpoints<AMQPUri>> {
    let entries = endpoints::split(list);
    if entries.is_empty() {
        return Err(Error::setting(
            "RABBITMQ_URL",
            "expected amqp://user:password@host:port/vhost, or several separated by commas",
        ));
    }
    let nodes = entries
        .into_iter()
        .map(|url| Ok((endpoints::node_name(url), parse_url(url)?)))
        .collect::<Result<Vec<_>>>()?;
    Ok(Endpoints::new("RabbitMQ", nodes))
}

/// Opens a connection to the node in use, or else to the next ones in turn, giving up on
/// each after `timeout` (a black-holed host would otherwise hang for the TCP timeout).
/// The node that answers becomes the node in use. Errors that no other node would change
/// (credentials, vhost) end the round at once.
///
/// `purpose` goes into the connection's name (`<consumer tag> (<purpose>)`), as shown in
/// the management UI: the consumer opens one connection to consume and, at the first
/// invalid message, one to publish dead letters.
pub(crate) async fn connect(
    nodes: &Endpoints<AMQPUri>,
    config: &Config,
    timeout: Duration,
    purpose: &str,
) -> Result<Connection, lapin::Error> {
    let start = nodes.current();
    let mut last = None;
    for index in start..start + nodes.len() {
        let (name, uri) = nodes.get(index);
        match connect_one(uri.clone(), config, timeout, purpose).await {
            Ok(connection) => {
                nodes.settle_on(index % nodes.len());
                return Ok(connection);
            }
            Err(e) if !is_retryable(&e) => return Err(e),
            Err(e) => {
                if nodes.len() > 1 {
                    log::warn!("cannot connect to RabbitMQ node {name}: {e}");
                }
                last = Some(e);
            }
        }
    }
    Err(last.expect("at least one node was tried"))
}

async fn connect_one(
    uri: AMQPUri,
    config: &Config,
    timeout: Duration,
    purpose: &str,
) -> Result<Connection, lapin::Error> {
    let name = format!("{} ({purpose})", config.consumer_tag());
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(name));
    let tls = OwnedTLSConfig {
        identity: None,
        cert_chain: config
            .rabbitmq_ca_pem()
            .map_err(|e| lapin::Error::from(std::io::Error::other(e.to_string())))?,
    };
    let runtime = lapin::runtime::default_runtime()?;
    let connect = Connection::connect_uri_with_config(uri, properties, tls, runtime);
    match tokio::time::timeout(timeout, connect).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {timeout:?}"),
        )
        .into()),
    }
}

/// Whether a connection error is worth retrying (the broker is down or restarting) rather
/// than fatal (wrong credentials, unknown vhost, not AMQP at all).
pub(crate) fn is_retryable(error: &lapin::Error) -> bool {
    use lapin::protocol::AMQPHardError;
    match error.kind() {
        lapin::ErrorKind::InvalidProtocolVersion(_) | lapin::ErrorKind::AuthProviderError(_) => {
            false
        }
        lapin::ErrorKind::ProtocolError(e) => !matches!(
            e.kind(),
            AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)
                | AMQPErrorKind::Hard(AMQPHardError::NOTALLOWED)
        ),
        _ => true,
    }
}

/// The soft AMQP error code of a failed operation, if the broker sent one.
pub(crate) fn soft_error(error: &lapin::Error) -> Option<(AMQPSoftError, String)> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(e) => match e.kind() {
            AMQPErrorKind::Soft(soft) => Some((soft.clone(), e.get_message().to_string())),
            AMQPErrorKind::Hard(_) => None,
        },
        _ => None,
    }
}

/// Declares the exchange, the queue, their binding, and the dead-letter queue. The
/// publisher declares the same, so either side may start first.
///
/// # Errors
/// [`Error::Topology`] naming the setting to change when the broker refuses a declaration
/// (an exchange or queue that exists with other properties); [`Error::Broker`] otherwise.
pub(crate) async fn declare_topology(channel: &Channel, config: &Config) -> Result<()> {
    let exchange = &config.exchange;
    channel
        .exchange_declare(
            ShortString::from(exchange.as_str()),
            exchange_kind(config.exchange_type),
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            declare_error(
                format!("failed to declare exchange `{exchange}` as {} durable", config.exchange_type),
                "the exchange exists with another type or durability: set RABBITMQ_EXCHANGE_TYPE to its type, or RABBITMQ_EXCHANGE to another name",
                e,
            )
        })?;
    let dead_letter = config.dead_letter_queue();
    if let Some(dlq) = &dead_letter {
        // Same type as the queue: a classic dead-letter queue lives on one node, and
        // while that node is down, declaring it fails and no session can open.
        declare_queue(channel, dlq, config.queue_type, FieldTable::default())
            .await
            .map_err(|e| {
                declare_error(
                    format!("failed to declare dead-letter queue `{dlq}`"),
                    "the queue exists with other properties: set DEAD_LETTER_QUEUE to another name",
                    e,
                )
            })?;
    }
    let queue = &config.queue;
    declare_queue(channel, queue, config.queue_type, queue_arguments(config, dead_letter.as_deref()))
        .await
        .map_err(|e| {
            declare_error(
                format!("failed to declare queue `{queue}` as a durable {:?} queue", config.queue_type),
                "the queue exists with other properties (type, durability or arguments): set RABBITMQ_QUEUE_TYPE to match it, or RABBITMQ_QUEUE to another name",
                e,
            )
        })?;
    let key = config.routing_key();
    channel
        .queue_bind(
            ShortString::from(queue.as_str()),
            ShortString::from(exchange.as_str()),
            ShortString::from(key),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| {
            declare_error(
                format!("failed to bind queue `{queue}` to exchange `{exchange}` with key `{key}`"),
                "check RABBITMQ_ROUTING_KEY and the user's permissions",
                e,
            )
        })?;
    Ok(())
}

async fn declare_queue(
    channel: &Channel,
    name: &str,
    kind: QueueType,
    mut arguments: FieldTable,
) -> Result<(), lapin::Error> {
    if kind == QueueType::Quorum {
        arguments.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(LongString::from("quorum")),
        );
    }
    channel
        .queue_declare(
            ShortString::from(name),
            QueueDeclareOptions::durable(),
            arguments,
        )
        .await
        .map(drop)
}

/// A quorum queue counts redeliveries and dead-letters a message that keeps coming back
/// (a poison message that crashes consumers) to our dead-letter queue.
fn queue_arguments(config: &Config, dead_letter: Option<&str>) -> FieldTable {
    let mut arguments = FieldTable::default();
    if config.queue_type == QueueType::Quorum {
        arguments.insert(
            ShortString::from("x-delivery-limit"),
            AMQPValue::LongLongInt(QUORUM_DELIVERY_LIMIT),
        );
        if let Some(dlq) = dead_letter {
            arguments.insert(
                ShortString::from("x-dead-letter-exchange"),
                AMQPValue::LongString(LongString::from("")),
            );
            arguments.insert(
                ShortString::from("x-dead-letter-routing-key"),
                AMQPValue::LongString(LongString::from(dlq)),
            );
        }
    }
    arguments
}

fn declare_error(what: String, hint: &str, error: lapin::Error) -> Error {
    match soft_error(&error) {
        Some((AMQPSoftError::PRECONDITIONFAILED, detail)) => Error::Topology {
            what,
            detail,
            hint: hint.to_owned(),
        },
        Some((AMQPSoftError::ACCESSREFUSED, detail)) => Error::Topology {
            what,
            detail,
            hint: "grant the RabbitMQ user configure, write and read permissions on these names"
                .to_owned(),
        },
        _ => Error::broker(what, error),
    }
}

fn exchange_kind(kind: ExchangeType) -> ExchangeKind {
    match kind {
        ExchangeType::Direct => ExchangeKind::Direct,
        ExchangeType::Fanout => ExchangeKind::Fanout,
        ExchangeType::Topic => ExchangeKind::Topic,
        ExchangeType::Headers => ExchangeKind::Headers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_path_is_the_default_vhost() {
        assert_eq!(
            parse_url("amqp://guest:guest@localhost:5672/")
                .unwrap()
                .vhost,
            "/"
        );
        assert_eq!(
            parse_url("amqp://guest:guest@localhost:5672")
                .unwrap()
                .vhost,
            "/"
        );
        assert_eq!(parse_url("amqp://localhost/%2f").unwrap().vhost, "/");
        assert_eq!(parse_url("amqp://localhost/prod").unwrap().vhost, "prod");
    }

    #[test]
    fn the_broker_sets_the_frame_size_unless_the_url_does() {
        assert_eq!(
            parse_url("amqp://localhost/").unwrap().query.frame_max,
            None
        );
        let uri = parse_url("amqp://localhost/?frame_max=16384").unwrap();
        assert_eq!(uri.query.frame_max, Some(16_384));
    }

    #[test]
    fn bad_urls_name_the_setting_without_the_password() {
        for url in [
            "http://u:pw-secret@host/",
            "amqp://u:pw-secret@host:port/",
            "garbage pw-secret",
            "amqp://u:pw-secret@host:x/",
            "amqp://u:pw-secret#x@host/",
            "amqp://u:pw-secret/x@host/",
            "amqp://u:pw-secret?x@host/",
            "amqp://u:pw-secret@x@host:port/",
            "amqp://u:pw-secret",
            "amqp://u:pw-secret@[::1/",
            "amqp://u:pw%2Dsecret@[::1/",
            "amqp://u:pw-secret@host/?heartbeat=pw-secret",
        ] {
            let err = parse_url(url).expect_err(url).to_string();
            assert!(err.starts_with("invalid setting RABBITMQ_URL"), "{err}");
            assert!(!err.contains("pw-secret"), "{err}");
        }
    }

    #[test]
    fn a_list_names_its_nodes() {
        let list = nodes("amqp://u:pw-secret@r1:5672/, amqp://u:pw-secret@r2:5673/prod").unwrap();
        assert_eq!(list.len(), 2);
        assert_eq!(list.get(0).0, "r1:5672");
        assert_eq!(list.get(1).1.vhost, "prod");
        for bad in [
            "amqp://u:pw-secret@r1/,http://u:pw-secret@r2/",
            "amqp://u:pw-secret@r1/,amqp://u:pw-secret@r2:port/",
            " , ",
        ] {
            let err = nodes(bad).expect_err(bad).to_string();
            assert!(err.starts_with("invalid setting RABBITMQ_URL"), "{err}");
            assert!(!err.contains("pw-secret"), "{err}");
        }
    }
}
