//! Start-up: what is created, what is reused, and the errors a user gets when the
//! servers hold something else.

use std::time::{Duration, Instant};

use click_consumer::{Config, Consumer, Error};
use lapin::{
    Connection, ConnectionProperties, ExchangeKind, options::ExchangeDeclareOptions,
    types::FieldTable,
};

use crate::common::*;

#[tokio::test]
async fn creates_table_and_topology_when_missing_and_reuses_them() {
    let names = Names::new("create");
    let config = config(&names);
    assert!(
        !table_exists(&names).await,
        "the table does not exist before the first run"
    );

    let running = start(Consumer::new(config.clone()).unwrap()).await;
    let publisher = publisher(&config).await;
    publisher.publish(&event(1)).await.unwrap();
    wait_for_rows(&names, 1).await;
    running.stop().await.unwrap();
    let ddl = query(format!("SHOW CREATE TABLE {}", names.table())).await;
    assert!(
        ddl.contains("MergeTree") && ddl.contains("ORDER BY (short_code, timestamp)"),
        "{ddl}"
    );
    assert!(queue_exists(&names.queue).await && queue_exists(&names.dead_letter_queue()).await);

    // Second run: everything exists already; the old row stays, new ones are appended.
    publisher.publish(&event(2)).await.unwrap();
    let running = start(Consumer::new(config.clone()).unwrap()).await;
    wait_for_rows(&names, 2).await;
    running.stop().await.unwrap();
    assert_eq!(row_count(&names).await, 2);
}

#[tokio::test]
async fn an_exchange_of_another_type_is_a_clear_error() {
    let names = Names::new("exchange_type");
    let connection = Connection::connect(
        &servers().rabbitmq.amqp_url(),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    channel
        .exchange_declare(
            names.exchange.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let error = Consumer::new(config(&names))
        .unwrap()
        .run(std::future::pending())
        .await
        .expect_err("a fanout exchange cannot be declared as topic");
    let text = error.to_string();
    assert!(matches!(error, Error::Topology { .. }), "{error:?}");
    assert!(
        text.contains(&format!("exchange `{}`", names.exchange)),
        "{text}"
    );
    assert!(
        text.contains("current is 'fanout'"),
        "says what exists: {text}"
    );
    assert!(
        text.contains("RABBITMQ_EXCHANGE_TYPE"),
        "says what to change: {text}"
    );
}

#[tokio::test]
async fn a_table_of_another_shape_is_a_clear_error() {
    let names = Names::new("shape");
    query(format!("CREATE DATABASE {}", names.database)).await;
    query(format!(
        "CREATE TABLE {} (short_code String, timestamp UInt64) ENGINE = MergeTree() ORDER BY short_code",
        names.table()
    ))
    .await;
    let error = Consumer::new(config(&names))
        .unwrap()
        .run(std::future::pending())
        .await
        .expect_err("the table does not fit");
    assert!(matches!(error, Error::TableShape { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .contains("column `timestamp` is UInt64, expected DateTime"),
        "{error}"
    );
}

#[tokio::test]
async fn unreachable_servers_fail_start_up_after_the_window() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let names = Names::new("unreachable");
    let window = Duration::from_millis(1500);

    let no_clickhouse = config(&names)
        .with_clickhouse_url(format!("http://127.0.0.1:{closed}"))
        .with_startup_timeout(window);
    let started = Instant::now();
    let error = Consumer::new(no_clickhouse)
        .unwrap()
        .run(std::future::pending())
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::ClickHouseUnreachable { .. }),
        "{error:?}"
    );
    assert!(
        started.elapsed() >= window,
        "it retried for the whole window"
    );

    let no_broker = config(&names)
        .with_rabbitmq_url(format!("amqp://guest:secret-pw@127.0.0.1:{closed}/"))
        .with_startup_timeout(window);
    let error = Consumer::new(no_broker)
        .unwrap()
        .run(std::future::pending())
        .await
        .unwrap_err();
    assert!(
        matches!(error, Error::BrokerUnreachable { .. }),
        "{error:?}"
    );
    let text = format!("{error} {error:?}");
    assert!(
        text.contains(&format!("amqp://guest:***@127.0.0.1:{closed}/")),
        "{text}"
    );
    assert!(
        !text.contains("secret-pw"),
        "the password never shows: {text}"
    );
}

#[tokio::test]
async fn wrong_credentials_fail_at_once() {
    let names = Names::new("credentials");
    let url = servers()
        .rabbitmq
        .amqp_url()
        .replace("guest:guest", "guest:wrong-pw");
    let bad_password: Config = config(&names).with_rabbitmq_url(url);
    let started = Instant::now();
    let error = Consumer::new(bad_password)
        .unwrap()
        .run(std::future::pending())
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "no retrying on bad credentials: {error}"
    );
    assert!(
        !format!("{error} {error:?}").contains("wrong-pw"),
        "{error:?}"
    );
}

#[tokio::test]
async fn a_quorum_queue_is_declared_with_a_delivery_limit_and_dead_lettering() {
    let names = Names::new("quorum");
    let config = config(&names).with_queue_type(click_consumer::QueueType::Quorum);
    let running = start(Consumer::new(config.clone()).unwrap()).await;
    let publisher = publisher(&config).await;
    publisher.publish(&event(1)).await.unwrap();
    publisher.publish_bytes(b"poison").await.unwrap();
    wait_for_rows(&names, 1).await;
    running.stop().await.unwrap();
    let queue = names.queue.clone();
    let dlq = names.dead_letter_queue();
    let (listed, dead_letter_listed) = tokio::task::spawn_blocking(move || {
        let all = servers().rabbitmq.ctl(&[
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "type",
            "arguments",
        ]);
        let line = |name: &str| {
            all.lines()
                .find(|line| line.starts_with(&format!("{name}\t")))
                .map(str::to_owned)
                .expect("the queue is listed")
        };
        (line(&queue), line(&dlq))
    })
    .await
    .unwrap();
    // The dead-letter queue is replicated as well: a classic one would live on a
    // single node, and its loss would keep every consumer from reconnecting.
    assert!(
        dead_letter_listed.contains("quorum"),
        "{dead_letter_listed}"
    );
    assert!(listed.contains("quorum"), "{listed}");
    assert!(listed.contains("x-delivery-limit"), "{listed}");
    assert!(
        listed.contains(&names.dead_letter_queue()),
        "dead-letters to our queue: {listed}"
    );
    assert_eq!(
        drain(&names.dead_letter_queue()).await.len(),
        1,
        "the poison message"
    );
}

#[tokio::test]
async fn the_table_engine_is_configurable() {
    let names = Names::new("engine");
    let config = config(&names).with_clickhouse_table_engine("ReplacingMergeTree()");
    let running = start(Consumer::new(config.clone()).unwrap()).await;
    publisher(&config).await.publish(&event(1)).await.unwrap();
    wait_for_rows(&names, 1).await;
    running.stop().await.unwrap();
    let ddl = query(format!("SHOW CREATE TABLE {}", names.table())).await;
    assert!(ddl.contains("ENGINE = ReplacingMergeTree"), "{ddl}");
}
