//! Dead letters and how their originals are settled: what a copy carries, and the paths
//! where a `multiple` ack or nack could name a delivery settled already (RabbitMQ closes
//! the channel with `PRECONDITION_FAILED`, and the stored batch comes back and is stored
//! twice).

use std::time::Duration;

use click_consumer::{ClickEvent, Consumer, dead_letter_headers as dlh};
use click_consumer_testkit::ClickHouse;
use lapin::{
    BasicProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions},
    types::ShortString,
};

use crate::common::*;

/// Publishes `body` to the test's exchange with `properties`, waiting for the confirm.
async fn publish_with(
    config: &click_consumer::Config,
    names: &Names,
    body: &[u8],
    properties: BasicProperties,
) {
    let connection = connect().await;
    let channel = connection.create_channel().await.expect("channel");
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let confirm = channel
        .basic_publish(
            names.exchange.as_str().into(),
            config.routing_key().into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await
        .expect("basic.publish")
        .await
        .expect("confirm");
    assert!(
        confirm.is_ack() && confirm.take_message().is_none(),
        "the test message was routed and confirmed"
    );
    let _ = connection.close(200, "done".into()).await;
}

#[tokio::test]
async fn dead_letter_copies_are_persistent_never_expire_and_carry_a_unique_id() {
    let names = Names::new("dl_props");
    let config = config(&names);
    // Declares the topology, so the raw publishes below are routed.
    let publisher = publisher(&config).await;
    let consumer = Consumer::new(config.clone()).unwrap();
    let metrics = consumer.metrics();
    let running = start(consumer).await;
    let transient_with_ttl = || {
        BasicProperties::default()
            .with_delivery_mode(1)
            .with_expiration(ShortString::from("600000"))
            .with_content_type(ShortString::from("application/json"))
    };
    publish_with(&config, &names, b"not json one", transient_with_ttl()).await;
    publish_with(&config, &names, b"not json two", transient_with_ttl()).await;
    wait_until(
        "two confirmed dead letters",
        Duration::from_secs(30),
        || async { metrics.summary().dead_lettered == 2 },
    )
    .await;
    wait_until("the queue to empty", Duration::from_secs(10), || async {
        queue_counts(&names.queue).await == (0, 0)
    })
    .await;
    let summary = running.stop().await.expect("clean stop");
    let _ = publisher.close().await;
    assert_eq!(summary.dead_lettered, 2, "{summary:?}");

    let letters = drain(&names.dead_letter_queue()).await;
    assert_eq!(
        letters.len(),
        2,
        "exactly one copy per poison message in the dead-letter queue"
    );
    for letter in &letters {
        let body = String::from_utf8_lossy(&letter.body);
        assert_eq!(
            letter.properties.delivery_mode(),
            &Some(2),
            "the copy of {body:?} is persistent although its original was not"
        );
        assert_eq!(
            letter.properties.expiration(),
            &None,
            "the copy of {body:?} does not expire"
        );
        assert_eq!(
            letter.header(dlh::ORIGINAL_EXPIRATION).as_deref(),
            Some("600000"),
            "the original's expiration is kept in a header ({body:?})"
        );
        assert_eq!(
            letter
                .properties
                .content_type()
                .as_ref()
                .map(|c| c.as_str()),
            Some("application/json"),
            "other properties are kept ({body:?})"
        );
        let id = letter.header(dlh::ID).unwrap_or_default();
        assert!(!id.is_empty(), "the copy of {body:?} has an {}", dlh::ID);
        assert_eq!(
            letter.header(dlh::KIND).as_deref(),
            Some("not_json"),
            "{body:?}"
        );
        let reason = letter.header(dlh::REASON).unwrap_or_default();
        assert!(
            reason.contains("not JSON"),
            "the reason of {body:?} says why: {reason:?}"
        );
        assert_eq!(
            letter.header(dlh::ORIGINAL_EXCHANGE).as_deref(),
            Some(names.exchange.as_str())
        );
        assert_eq!(
            letter.header(dlh::ORIGINAL_ROUTING_KEY).as_deref(),
            Some(config.routing_key())
        );
        assert!(
            letter.header(dlh::FAILED_AT).is_some(),
            "{} is set",
            dlh::FAILED_AT
        );
        assert!(
            letter.header(dlh::CONSUMER).is_some_and(|c| !c.is_empty()),
            "{} is set",
            dlh::CONSUMER
        );
    }
    assert_ne!(
        letters[0].header(dlh::ID),
        letters[1].header(dlh::ID),
        "two copies have distinct ids"
    );
    let mut bodies: Vec<&[u8]> = letters.iter().map(|l| l.body.as_slice()).collect();
    bodies.sort_unstable();
    assert_eq!(
        bodies,
        vec![b"not json one".as_slice(), b"not json two".as_slice()],
        "the original bodies are kept"
    );
}

/// An original whose headers nearly fill a frame fitted into one when it was published,
/// but its copy, with the reason headers added, would not: the copy goes without the
/// original's headers (and says so) instead of being retried forever, which held up every
/// dead letter behind it.
#[tokio::test]
async fn a_copy_that_would_outgrow_the_frame_leaves_the_original_headers_off() {
    let names = Names::new("dl_big_headers");
    let config = config(&names);
    let publisher = publisher(&config).await;
    let consumer = Consumer::new(config.clone()).unwrap();
    let metrics = consumer.metrics();
    let running = start(consumer).await;
    // The frame size every connection to this broker negotiates (131,072 by default).
    // Properties: flags 2, table length 4, the entry's name 4, type 1, length 4, then the
    // text; the frame adds 20. So the original's header frame is 200 bytes short of full,
    // and the reason headers (about 400 bytes here) would push the copy's over.
    let probe = connect().await;
    let frame_max = probe.configuration().frame_max() as usize;
    let _ = probe.close(200, "done".into()).await;
    let big = "h".repeat(frame_max - 20 - 2 - 4 - 9 - 200);
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        ShortString::from("big"),
        lapin::types::AMQPValue::LongString(big.into()),
    );
    let with_big_headers = BasicProperties::default().with_headers(headers);
    publish_with(&config, &names, b"not json, big headers", with_big_headers).await;
    publish_with(
        &config,
        &names,
        b"not json, after it",
        BasicProperties::default(),
    )
    .await;
    wait_until(
        "both dead letters confirmed",
        Duration::from_secs(30),
        || async { metrics.summary().dead_lettered == 2 },
    )
    .await;
    let summary = running.stop().await.expect("clean stop");
    let _ = publisher.close().await;
    assert_eq!(summary.dead_lettered, 2, "{summary:?}");

    let letters = drain(&names.dead_letter_queue()).await;
    assert_eq!(letters.len(), 2, "one copy of each");
    let big_copy = letters
        .iter()
        .find(|l| l.body == b"not json, big headers")
        .expect("the copy of the message with big headers");
    assert!(
        big_copy.header("big").is_none(),
        "the original's headers are left off"
    );
    assert_eq!(big_copy.header(dlh::KIND).as_deref(), Some("not_json"));
    let dropped = big_copy
        .headers
        .inner()
        .get(dlh::ORIGINAL_HEADERS_DROPPED)
        .cloned();
    assert!(
        matches!(dropped, Some(lapin::types::AMQPValue::LongLongInt(n)) if n as usize > frame_max - 400),
        "{} names the size of the original's properties: {dropped:?}",
        dlh::ORIGINAL_HEADERS_DROPPED
    );
    let other = letters
        .iter()
        .find(|l| l.body == b"not json, after it")
        .expect("the copy behind it");
    assert!(other.header(dlh::ORIGINAL_HEADERS_DROPPED).is_none());
}

/// The six contract columns plus one that ClickHouse computes from `user_agent` at
/// INSERT: a row whose `user_agent` is not a number is refused (Code 6,
/// CANNOT_PARSE_TEXT) while the others are stored.
fn create_table_refusing_non_numeric_agents(names: &Names) -> Vec<String> {
    vec![
        format!("CREATE DATABASE IF NOT EXISTS {}", names.database),
        format!(
            "CREATE TABLE {} (short_code String, timestamp DateTime, user_agent String, ip_address String, referrer String, original_url String, chk UInt8 MATERIALIZED toUInt8(user_agent)) ENGINE = MergeTree() ORDER BY (short_code, timestamp)",
            names.table()
        ),
    ]
}

#[tokio::test]
async fn a_refused_row_holding_the_highest_tag_is_rejected_without_closing_the_channel() {
    let names = Names::new("dl_off_refused");
    for sql in create_table_refusing_non_numeric_agents(&names) {
        query(sql).await;
    }
    let config = config(&names)
        .with_dead_letter_enabled(false)
        .with_batch_size(100)
        .with_batch_timeout(Duration::from_secs(30));
    let consumer = Consumer::new(config.clone()).unwrap();
    let metrics = consumer.metrics();
    let publisher = publisher(&config).await;
    // 99 valid rows, then the refused one: it holds the batch's highest delivery tag.
    let mut events: Vec<ClickEvent> = (0..99).map(|i| event(i).with_user_agent("1")).collect();
    events.push(event(99).with_user_agent("x"));
    publisher.publish_all(&events).await.unwrap();
    let running = start(consumer).await;
    wait_until(
        "the batch committed and the refused row rejected",
        Duration::from_secs(30),
        || async {
            let s = metrics.summary();
            s.stored >= 99 && s.dead_lettered >= 1
        },
    )
    .await;
    wait_until("the queue to empty", Duration::from_secs(10), || async {
        queue_counts(&names.queue).await == (0, 0)
    })
    .await;
    // Time for a channel closed by a bad ack to show: redelivery, a reconnect, a second
    // copy of the batch.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let summary = running.stop().await.expect("clean stop");
    let _ = publisher.close().await;

    let refused = query(format!(
        "SELECT count() FROM {} WHERE user_agent = 'x'",
        names.table()
    ))
    .await;
    assert_eq!(refused.trim(), "0", "ClickHouse refused the row");
    let rows = query(format!(
        "SELECT count(), uniqExact(short_code) FROM {}",
        names.table()
    ))
    .await;
    assert_eq!(rows.trim(), "99\t99", "the 99 valid rows exactly once");
    assert_eq!(
        summary.dead_lettered, 1,
        "one row refused and rejected: {summary:?}"
    );
    assert_eq!(
        summary.reconnects, 0,
        "no channel error (PRECONDITION_FAILED) and no reconnect: {summary:?}"
    );
    assert_eq!(
        summary.redelivered, 0,
        "nothing was redelivered: {summary:?}"
    );
    assert_eq!(summary.received, 100, "{summary:?}");
    assert_eq!(
        queue_counts(&names.queue).await,
        (0, 0),
        "nothing left in the queue"
    );
    assert!(
        metrics.encode().lines().any(|l| l.starts_with(
            "click_consumer_messages_dead_lettered_total{reason=\"rejected_by_clickhouse\"} 1"
        )),
        "the refused row is counted as rejected_by_clickhouse"
    );
}

#[tokio::test]
async fn releasing_a_batch_whose_last_message_was_dead_lettered_keeps_the_channel() {
    // A private ClickHouse that this test stops.
    let clickhouse = tokio::task::spawn_blocking(ClickHouse::start)
        .await
        .unwrap();
    let names = Names::new("dl_release");
    // A timeout long enough for all 51 messages to make one batch on a busy machine
    // (at 100 ms, a slow publish split them: 45 released, 5 in a batch of their own).
    let config = config(&names)
        .with_clickhouse_url(clickhouse.url())
        .with_batch_timeout(Duration::from_secs(2))
        .with_insert_release_after(Duration::from_millis(1500));
    let consumer = Consumer::new(config.clone()).unwrap();
    let metrics = consumer.metrics();
    let running = start(consumer).await;
    let publisher = publisher(&config).await;
    wait_until("the table", Duration::from_secs(30), || async {
        clickhouse
            .query(&format!(
                "SELECT count() FROM system.tables WHERE database = '{}' AND name = 'click_events'",
                names.database
            ))
            .trim()
            == "1"
    })
    .await;
    let clickhouse = blocking(clickhouse, |server| server.stop()).await;
    // One batch: 50 rows, then a poison message holding the highest delivery tag. Its
    // copy is confirmed and it is acknowledged while the rows wait for ClickHouse.
    let events: Vec<ClickEvent> = (0..50).map(event).collect();
    publisher.publish_all(&events).await.unwrap();
    publisher.publish_bytes(b"poison last").await.unwrap();
    wait_until("the batch released", Duration::from_secs(30), || async {
        metrics.summary().released > 0
    })
    .await;
    let released = metrics.summary().released;
    let dead_before_restart = metrics.summary().dead_lettered;
    let clickhouse = blocking(clickhouse, |server| server.restart()).await;
    wait_until(
        "50 rows after the restart",
        Duration::from_secs(60),
        || async { metrics.summary().stored >= 50 },
    )
    .await;
    wait_until("the queue to empty", Duration::from_secs(20), || async {
        queue_counts(&names.queue).await == (0, 0)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let summary = running.stop().await.expect("clean stop");
    let _ = publisher.close().await;

    assert_eq!(
        released, 50,
        "the batch's 50 rows were released, not the dead-lettered message: {summary:?}"
    );
    assert_eq!(
        dead_before_restart, 1,
        "the poison was dead-lettered while ClickHouse was down"
    );
    let rows = clickhouse.query(&format!(
        "SELECT count(), uniqExact(short_code) FROM {}",
        names.table()
    ));
    assert_eq!(rows.trim(), "50\t50", "every row exactly once");
    let dead = drain(&names.dead_letter_queue()).await;
    assert_eq!(dead.len(), 1, "the poison once in the dead-letter queue");
    assert_eq!(dead[0].body, b"poison last");
    assert_eq!(
        summary.reconnects, 0,
        "no channel error (PRECONDITION_FAILED) and no reconnect: {summary:?}"
    );
    assert_eq!(summary.dead_lettered, 1, "{summary:?}");
    assert_eq!(queue_counts(&names.queue).await, (0, 0));
}
