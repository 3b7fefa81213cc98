//! `ClickPublisher` to `Consumer`: what the shortener sends is what lands in ClickHouse.

use std::time::Duration;

use click_consumer::{ClickEvent, ClickPublisher, Consumer, Error};

use crate::common::*;

#[tokio::test]
async fn published_events_round_trip_into_rows() {
    let names = Names::new("round_trip");
    let config = config(&names);
    // The publisher declares the topology: clicks sent before the consumer starts wait.
    let publisher = publisher(&config).await;
    let event = ClickEvent::new("rt-1", "2024-06-30T23:59:59-01:00")
        .with_user_agent("Mozilla/5.0 (X11; Linux x86_64) «ünïcode» 🚀")
        .with_ip_address("2001:db8::1")
        .with_referrer("https://t.example/?q=a&b=c")
        .with_original_url("https://example.com/long/path?x=1#frag");
    publisher.publish(&event).await.unwrap();
    let running = start(Consumer::new(config).unwrap()).await;
    wait_for_rows(&names, 1).await;
    running.stop().await.unwrap();

    let stored = query(format!(
        "SELECT short_code, toString(timestamp, 'UTC'), user_agent, ip_address, referrer, original_url FROM {} FORMAT JSONEachRow",
        names.table()
    ))
    .await;
    let row: serde_json::Value = serde_json::from_str(stored.trim()).unwrap();
    let expected = ClickEvent::decode(&serde_json::to_vec(&event).unwrap()).unwrap();
    assert_eq!(row["short_code"], expected.short_code);
    assert_eq!(
        row["toString(timestamp, 'UTC')"], "2024-07-01 00:59:59",
        "offset converted to UTC"
    );
    assert_eq!(row["user_agent"], expected.user_agent);
    assert_eq!(row["ip_address"], expected.ip_address);
    assert_eq!(row["referrer"], expected.referrer);
    assert_eq!(row["original_url"], expected.original_url);
}

#[tokio::test]
async fn many_tasks_publish_on_one_connection() {
    let names = Names::new("concurrent");
    let config = config(&names);
    let publisher = publisher(&config).await;
    let running = start(Consumer::new(config).unwrap()).await;
    let tasks: Vec<_> = (0..20)
        .map(|task| {
            let publisher = publisher.clone();
            tokio::spawn(async move {
                for i in 0..50 {
                    publisher.publish(&event(task * 50 + i)).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    wait_for_rows(&names, 1000).await;
    running.stop().await.unwrap();
    let distinct = query(format!(
        "SELECT uniqExact(short_code) FROM {}",
        names.table()
    ))
    .await;
    assert_eq!(distinct.trim(), "1000");
    publisher.close().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_broker_is_a_clear_error() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let names = Names::new("pub_unreachable");
    let config = config(&names).with_rabbitmq_url(format!("amqp://u:p4ss@127.0.0.1:{closed}/"));
    let error = tokio::time::timeout(Duration::from_secs(15), ClickPublisher::connect(&config))
        .await
        .expect("fails quickly")
        .expect_err("nothing listens there");
    assert!(
        matches!(error, Error::BrokerUnreachable { .. }),
        "{error:?}"
    );
    assert!(!error.to_string().contains("p4ss"));
}
