//! The servers of a run, the names one measurement uses on them, and a broker
//! connection of the benchmark's own to look at queues.

use std::thread;

use anyhow::Context;
use click_consumer::{Config, config::defaults};
use click_consumer_testkit::{ClickHouse, RabbitMq, unique_name};
use lapin::{
    Channel, Connection, ConnectionProperties,
    options::{QueueDeclareOptions, QueueDeleteOptions},
    types::{FieldTable, ShortString},
};

use crate::table::Table;

/// A private RabbitMQ and ClickHouse for this run; they die with the process.
#[derive(Debug)]
pub(crate) struct Servers {
    pub(crate) rabbitmq: RabbitMq,
    pub(crate) clickhouse: ClickHouse,
}

impl Servers {
    /// Starts both at once.
    ///
    /// # Panics
    /// If either cannot start (the testkit's message says why and what to install).
    pub(crate) fn start() -> Servers {
        let (rabbitmq, clickhouse) = thread::scope(|scope| {
            let rabbitmq = scope.spawn(RabbitMq::start);
            let clickhouse = scope.spawn(ClickHouse::start);
            (rabbitmq.join(), clickhouse.join())
        });
        match (rabbitmq, clickhouse) {
            (Ok(rabbitmq), Ok(clickhouse)) => Servers {
                rabbitmq,
                clickhouse,
            },
            (Err(panic), _) | (_, Err(panic)) => std::panic::resume_unwind(panic),
        }
    }

    /// The broker URL in the form the Python service uses (empty path for vhost `/`),
    /// for click-consumer.
    pub(crate) fn amqp_url(&self) -> String {
        self.rabbitmq.amqp_url().replace("/%2f", "/")
    }

    /// The broker URL for plain lapin, which reads an empty path as the empty vhost.
    pub(crate) fn lapin_url(&self) -> String {
        self.rabbitmq.amqp_url()
    }

    pub(crate) fn rabbitmq_version(&self) -> String {
        self.rabbitmq.ctl(&["-q", "version"]).trim().to_owned()
    }

    pub(crate) fn clickhouse_version(&self) -> String {
        self.clickhouse.query("SELECT version()").trim().to_owned()
    }
}

/// The exchange, queue and database of one measurement, used by nothing else.
#[derive(Debug)]
pub(crate) struct Target {
    pub(crate) exchange: String,
    pub(crate) queue: String,
    pub(crate) database: String,
}

impl Target {
    pub(crate) fn new(purpose: &str) -> Target {
        Target {
            exchange: unique_name(&format!("bench_{purpose}_ex")),
            queue: unique_name(&format!("bench_{purpose}_q")),
            database: unique_name(&format!("bench_{purpose}_db")),
        }
    }

    /// The library configuration of this target, for publishing to it.
    pub(crate) fn config(&self, servers: &Servers) -> Config {
        Config::default()
            .with_rabbitmq_url(servers.amqp_url())
            .with_exchange(&self.exchange)
            .with_queue(&self.queue)
    }

    /// Its queue and the dead-letter queue the consumer declares beside it.
    pub(crate) fn queues(&self) -> [String; 2] {
        [
            self.queue.clone(),
            format!("{}{}", self.queue, defaults::DEAD_LETTER_SUFFIX),
        ]
    }

    pub(crate) fn table<'a>(&self, clickhouse: &'a ClickHouse) -> Table<'a> {
        Table::new(clickhouse, &self.database, defaults::CLICKHOUSE_TABLE)
    }
}

/// The benchmark's own AMQP connection, to count ready messages and delete queues.
#[derive(Debug)]
pub(crate) struct Broker {
    connection: Connection,
    channel: Channel,
}

impl Broker {
    pub(crate) async fn connect(url: &str) -> anyhow::Result<Broker> {
        let connection = Connection::connect(url, ConnectionProperties::default())
            .await
            .context("cannot connect to the private RabbitMQ")?;
        let channel = connection.create_channel().await?;
        Ok(Broker {
            connection,
            channel,
        })
    }

    /// Messages ready for delivery in `queue` (not counting those delivered and not yet
    /// acknowledged).
    pub(crate) async fn ready(&self, queue: &str) -> anyhow::Result<u64> {
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let declared = self
            .channel
            .queue_declare(ShortString::from(queue), passive, FieldTable::default())
            .await
            .with_context(|| format!("cannot look at queue `{queue}`"))?;
        Ok(u64::from(declared.message_count()))
    }

    /// Deletes `queues` (after a measurement, to give the broker its memory back).
    pub(crate) async fn delete(&self, queues: &[String]) -> anyhow::Result<()> {
        for queue in queues {
            self.channel
                .queue_delete(
                    ShortString::from(queue.as_str()),
                    QueueDeleteOptions::default(),
                )
                .await
                .with_context(|| format!("cannot delete queue `{queue}`"))?;
        }
        Ok(())
    }

    pub(crate) async fn close(self) {
        let _ = self.channel.close(200, ShortString::from("bye")).await;
        let _ = self.connection.close(200, ShortString::from("bye")).await;
    }
}
