//! The consume -> decode -> batch -> insert -> ack loop, as a user sees it.

use std::time::Duration;

use click_consumer::{ClickEvent, Consumer, InvalidKind, Metrics, dead_letter_headers as dlh};

use crate::common::*;

#[tokio::test]
async fn valid_events_become_rows_with_their_values() {
    let names = Names::new("valid_rows");
    let config = config(&names);
    let running = start(Consumer::new(config.clone()).unwrap()).await;
    let publisher = publisher(&config).await;
    let events: Vec<ClickEvent> = (0..1200).map(event).collect();
    publisher.publish_all(&events).await.unwrap();
    // Offsets are converted to UTC, fractions dropped, missing fields stored as "".
    publisher
        .publish_bytes(br#"{"short_code":"offset","timestamp":"2024-01-15T12:30:00.987+02:00","user_agent":"caf\u00e9 \"q\""}"#)
        .await
        .unwrap();
    wait_for_rows(&names, 1201).await;
    let summary = running.stop().await.expect("clean stop");

    assert_eq!(summary.stored, 1201, "{summary:?}");
    assert_eq!(summary.dead_lettered, 0, "{summary:?}");
    let distinct = query(format!(
        "SELECT uniqExact(short_code), count() FROM {}",
        names.table()
    ))
    .await;
    assert_eq!(
        distinct.trim(),
        "1201\t1201",
        "every event stored exactly once"
    );
    let row = query(format!(
        "SELECT short_code, toUnixTimestamp(timestamp), user_agent, ip_address, referrer, original_url FROM {} WHERE short_code = 'code00007'",
        names.table()
    ))
    .await;
    assert_eq!(
        row.trim_end(),
        "code00007\t1705314600\tagent/7\t198.51.100.7\thttps://ref.example/\thttps://example.com/7"
    );
    let row = query(format!(
        "SELECT toUnixTimestamp(timestamp), user_agent, ip_address, referrer FROM {} WHERE short_code = 'offset'",
        names.table()
    ))
    .await;
    assert_eq!(row.trim_end_matches('\n'), "1705314600\tcafé \"q\"\t\t");
    assert_eq!(
        queue_counts(&names.queue).await,
        (0, 0),
        "nothing left in the queue or unacked"
    );
}

#[tokio::test]
async fn invalid_messages_are_dead_lettered_with_their_reason() {
    let names = Names::new("invalid");
    let config = config(&names).with_max_message_bytes(4096);
    let running = start(Consumer::new(config.clone()).unwrap()).await;
    let publisher = publisher(&config).await;
    let deep = format!(
        r#"{{"short_code":"x","timestamp":"2024-01-15T10:30:00Z","x":{}{}}}"#,
        "[".repeat(500),
        "]".repeat(500)
    );
    let huge = format!(
        r#"{{"short_code":"{}","timestamp":"2024-01-15T10:30:00Z"}}"#,
        "x".repeat(5000)
    );
    let bad: Vec<(Vec<u8>, InvalidKind)> = vec![
        (b"not json".to_vec(), InvalidKind::NotJson),
        (b"".to_vec(), InvalidKind::NotJson),
        (b"\xff\xfe\x00garbage".to_vec(), InvalidKind::NotUtf8),
        (
            br#"["abc","2024-01-15T10:30:00Z"]"#.to_vec(),
            InvalidKind::NotAnObject,
        ),
        (
            br#"{"timestamp":"2024-01-15T10:30:00Z"}"#.to_vec(),
            InvalidKind::InvalidField,
        ),
        (
            br#"{"short_code":7,"timestamp":"2024-01-15T10:30:00Z"}"#.to_vec(),
            InvalidKind::InvalidField,
        ),
        (
            br#"{"short_code":"x","timestamp":"yesterday"}"#.to_vec(),
            InvalidKind::InvalidTimestamp,
        ),
        (
            br#"{"short_code":"x","timestamp":"1960-01-01T00:00:00Z"}"#.to_vec(),
            InvalidKind::InvalidTimestamp,
        ),
        (deep.into_bytes(), InvalidKind::NotJson),
        (huge.into_bytes(), InvalidKind::TooLarge),
    ];
    // Valid and invalid interleaved: an invalid message never blocks the batch.
    for (i, (body, _)) in bad.iter().enumerate() {
        publisher.publish(&event(i)).await.unwrap();
        publisher.publish_bytes(body).await.unwrap();
    }
    wait_for_rows(&names, bad.len() as u64).await;
    wait_until("all dead letters", Duration::from_secs(20), || async {
        queue_counts(&names.dead_letter_queue()).await.0 == bad.len() as u64
    })
    .await;
    let summary = running.stop().await.expect("clean stop");
    assert_eq!(summary.dead_lettered, bad.len() as u64, "{summary:?}");
    assert_eq!(
        row_count(&names).await,
        bad.len() as u64,
        "no invalid message became a row"
    );

    let dead = drain(&names.dead_letter_queue()).await;
    assert_eq!(dead.len(), bad.len());
    for ((body, kind), letter) in bad.iter().zip(&dead) {
        assert_eq!(&letter.body, body, "the original body is kept");
        assert_eq!(
            letter.header(dlh::KIND).as_deref(),
            Some(kind.as_str()),
            "{letter:?}"
        );
        let reason = letter.header(dlh::REASON).expect("a reason header");
        assert!(!reason.is_empty());
        assert_eq!(
            letter.header(dlh::ORIGINAL_EXCHANGE).as_deref(),
            Some(names.exchange.as_str())
        );
        assert_eq!(
            letter.header(dlh::ORIGINAL_ROUTING_KEY).as_deref(),
            Some(names.queue.as_str())
        );
    }
    let first_reason = dead[0].header(dlh::REASON).unwrap();
    assert!(first_reason.contains("not JSON"), "{first_reason}");
    assert_eq!(queue_counts(&names.queue).await, (0, 0));
}

#[tokio::test]
async fn with_dead_lettering_off_invalid_messages_are_rejected() {
    let names = Names::new("reject");
    let config = config(&names).with_dead_letter_enabled(false);
    let running = start(Consumer::new(config.clone()).unwrap()).await;
    let publisher = publisher(&config).await;
    for i in 0..20 {
        publisher.publish(&event(i)).await.unwrap();
        publisher.publish_bytes(b"{broken").await.unwrap();
    }
    wait_for_rows(&names, 20).await;
    wait_until("the queue to empty", Duration::from_secs(10), || async {
        queue_counts(&names.queue).await == (0, 0)
    })
    .await;
    let summary = running.stop().await.unwrap();
    assert_eq!(
        (summary.stored, summary.dead_lettered),
        (20, 20),
        "{summary:?}"
    );
    assert!(
        !queue_exists(&names.dead_letter_queue()).await,
        "no dead-letter queue is declared"
    );
}

#[tokio::test]
async fn shutdown_stores_and_acks_what_is_buffered() {
    let names = Names::new("flush");
    // A batch that neither fills nor times out: only the shutdown flushes it.
    let config = config(&names)
        .with_batch_size(10_000)
        .with_batch_timeout(Duration::from_secs(600));
    let consumer = Consumer::new(config.clone()).unwrap();
    let metrics = consumer.metrics();
    let running = start(consumer).await;
    let publisher = publisher(&config).await;
    let events: Vec<ClickEvent> = (0..300).map(event).collect();
    publisher.publish_all(&events).await.unwrap();
    wait_until("300 deliveries", Duration::from_secs(20), || async {
        metrics.summary().received == 300
    })
    .await;
    assert_eq!(
        row_count(&names).await,
        0,
        "nothing is written before the batch is due"
    );
    let summary = running.stop().await.unwrap();
    assert_eq!(summary.stored, 300);
    assert_eq!(row_count(&names).await, 300);
    assert_eq!(queue_counts(&names.queue).await, (0, 0));
}

#[tokio::test]
async fn batches_are_flushed_by_size_and_at_the_end_of_a_backlog() {
    let names = Names::new("batching");
    // A timeout no test waits for, and no statistics tick to turn the consume loop: only
    // a full batch or the backlog's end (its own timer) writes one.
    let config = config(&names)
        .with_batch_size(100)
        .with_batch_timeout(Duration::from_secs(600))
        .with_stats_interval(Duration::from_secs(600));
    let publisher = publisher(&config).await;
    let events: Vec<ClickEvent> = (0..1012).map(event).collect();
    // A backlog waiting before the consumer starts: ten full batches and 7 rows.
    publisher.publish_all(&events[..1007]).await.unwrap();
    let consumer = Consumer::new(config.clone()).unwrap();
    let metrics = consumer.metrics();
    let running = start(consumer).await;
    // The last 7 do not wait for the timeout.
    wait_for_rows(&names, 1007).await;
    // The rows show before the consumer has counted its INSERT.
    wait_for_inserts(&metrics, 11).await;
    let inserts = metrics.summary().inserts;
    // 11: ten full batches and the tail. A stall of 50 ms mid-backlog whose depth
    // probe gets no answer within 500 ms (a very busy machine) may end a batch early
    // once more.
    assert!(
        (11..=12).contains(&inserts),
        "{inserts} INSERTs for 1007 rows in batches of 100"
    );
    // After that early write the next few rows wait for the size or the timeout again:
    // at most one early write per full batch.
    publisher.publish_all(&events[1007..]).await.unwrap();
    wait_until("1012 deliveries", Duration::from_secs(20), || async {
        metrics.summary().received == 1012
    })
    .await;
    // Twenty times the pause (50 ms) that ends a backlog.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        row_count(&names).await,
        1007,
        "a batch after an early write is not written at a pause"
    );
    let summary = running.stop().await.unwrap();
    assert_eq!(
        (summary.stored, summary.inserts),
        (1012, inserts + 1),
        "{summary:?}"
    );
}

/// Waits until the consumer has counted `n` INSERTs.
async fn wait_for_inserts(metrics: &Metrics, n: u64) {
    wait_until(&format!("{n} INSERTs"), Duration::from_secs(10), || async {
        metrics.summary().inserts >= n
    })
    .await;
}
