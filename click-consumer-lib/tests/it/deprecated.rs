//! The consumer uses no feature that RabbitMQ has deprecated.
//!
//! RabbitMQ 3.13 and later answer `rabbitmqctl list_deprecated_features --used`; this
//! test fails if that list is not empty after the consumer has declared its topology
//! (classic and quorum queue, dead-letter queue) and consumed, both while it still
//! runs and after it stopped. RabbitMQ 3.10 (the machine's broker) has no such
//! command: there the test asserts that the command is indeed unknown to a broker older
//! than 3.13 and says so on stderr, and it checks, on every version, the signs of the
//! deprecated features that the broker's listings can show (transient non-exclusive
//! queues, `x-queue-master-locator`, and on 3.x channels with a global prefetch).
//! Classic queue mirroring, RAM nodes and AMQP 1.0 addresses cannot be used by a client
//! of AMQP 0-9-1 on a single node that sets no policies, so they have no check here.
//!
//! Run against RabbitMQ 4 with `CLICK_CONSUMER_TEST_RABBITMQ=4` (see the testkit).

use std::sync::Arc;
use std::time::Duration;

use click_consumer::{Consumer, QueueType};
use click_consumer_testkit::RabbitMq;

use crate::common::{Names, config, event, publisher, start, wait_for_rows, wait_until};

#[tokio::test]
async fn the_broker_reports_no_deprecated_feature_in_use() {
    // A private broker: other tests' queues on the shared one must not count.
    let broker = Arc::new(
        tokio::task::spawn_blocking(RabbitMq::start)
            .await
            .expect("broker start"),
    );
    for queue_type in [QueueType::Classic, QueueType::Quorum] {
        let names = Names::new(&format!("deprecated_{queue_type:?}"));
        let config = config(&names)
            .with_rabbitmq_url(broker.amqp_url())
            .with_queue_type(queue_type);
        let running = start(Consumer::new(config.clone()).expect("valid config")).await;
        let publisher = publisher(&config).await;
        publisher.publish(&event(1)).await.expect("publish");
        publisher.publish_bytes(b"poison").await.expect("publish");
        wait_for_rows(&names, 1).await;
        let dead_letters = names.dead_letter_queue();
        wait_until(
            "the poison message in the dead-letter queue",
            Duration::from_secs(30),
            || {
                let (queue, broker) = (dead_letters.clone(), Arc::clone(&broker));
                async move {
                    tokio::task::spawn_blocking(move || broker.queue_counts(&queue))
                        .await
                        .expect("rabbitmqctl thread")
                        .is_some_and(|(ready, _)| ready == 1)
                }
            },
        )
        .await;
        let _ = publisher.close().await;
        check(&broker, &format!("{queue_type:?} queue, consumer running")).await;
        running.stop().await.expect("clean stop");
    }
    check(&broker, "after the consumers stopped").await;
}

/// Every check this broker allows, off the async threads.
async fn check(broker: &Arc<RabbitMq>, when: &str) {
    let (broker, when) = (Arc::clone(broker), when.to_owned());
    tokio::task::spawn_blocking(move || {
        deprecated_features_reported(&broker, &when);
        deprecated_features_seen(&broker, &when);
    })
    .await
    .expect("check thread");
}

/// `list_deprecated_features --used` is empty, on brokers that have the command.
fn deprecated_features_reported(broker: &RabbitMq, when: &str) {
    let version = broker.version();
    match broker.try_ctl(&[
        "-q",
        "list_deprecated_features",
        "--used",
        "--formatter",
        "json",
    ]) {
        Ok(out) => {
            let used: serde_json::Value = serde_json::from_str(out.trim())
                .unwrap_or_else(|err| panic!("list_deprecated_features: {err}: {out}"));
            let used = used.as_array().expect("a JSON array");
            assert!(
                used.is_empty(),
                "RabbitMQ {version} reports deprecated features in use ({when}): {out}"
            );
            eprintln!("RabbitMQ {version} ({when}): list_deprecated_features --used is empty");
        }
        Err(failure) => {
            assert!(
                failure.contains("'list_deprecated_features' not found"),
                "RabbitMQ {version}: list_deprecated_features failed {failure}"
            );
            assert!(
                older_than_3_13(version),
                "RabbitMQ {version} should have list_deprecated_features (since 3.13): {failure}"
            );
            eprintln!(
                "RabbitMQ {version} ({when}) has no list_deprecated_features (it came with \
                 3.13): NOT checked by the broker; only the signs in its listings were checked"
            );
        }
    }
}

/// The deprecated features that the broker's listings show, on every version.
fn deprecated_features_seen(broker: &RabbitMq, when: &str) {
    let version = broker.version();
    let queues = broker.ctl(&[
        "-q",
        "list_queues",
        "--no-table-headers",
        "name",
        "durable",
        "exclusive",
        "arguments",
    ]);
    let mut listed = 0;
    for line in queues.lines().filter(|line| !line.trim().is_empty()) {
        let fields: Vec<&str> = line.split('\t').collect();
        assert!(fields.len() >= 3, "unexpected list_queues line: {line:?}");
        listed += 1;
        assert!(
            fields[1] == "true" || fields[2] == "true",
            "RabbitMQ {version} ({when}): transient non-exclusive queue \
             (deprecated: transient_nonexcl_queues): {line}"
        );
        assert!(
            !line.contains("x-queue-master-locator"),
            "RabbitMQ {version} ({when}): queue_master_locator in use: {line}"
        );
    }
    // Two queues per queue type: the consumer's and its dead-letter queue.
    assert!(listed >= 2, "the consumer's queues are listed:\n{queues}");
    if broker.major_version() == 3 {
        // RabbitMQ 4 has no such column any more (global QoS is in its deprecated list).
        let channels = broker.ctl(&[
            "-q",
            "list_channels",
            "--no-table-headers",
            "global_prefetch_count",
        ]);
        for line in channels.lines().filter(|line| !line.trim().is_empty()) {
            assert_eq!(
                line.trim(),
                "0",
                "RabbitMQ {version} ({when}): a channel with a global prefetch (deprecated: global_qos)"
            );
        }
    }
}

/// Whether `version` (`X.Y.Z`) is older than 3.13.
fn older_than_3_13(version: &str) -> bool {
    let mut parts = version.split('.').map(|part| part.parse::<u32>().ok());
    match (parts.next().flatten(), parts.next().flatten()) {
        (Some(major), Some(minor)) => (major, minor) < (3, 13),
        _ => panic!("cannot read the RabbitMQ version {version:?}"),
    }
}

#[test]
fn versions_before_3_13_have_no_deprecated_features_command() {
    assert!(older_than_3_13("3.10.8"));
    assert!(older_than_3_13("3.12.14"));
    assert!(!older_than_3_13("3.13.0"));
    assert!(!older_than_3_13("4.0.5"));
}
