//! `amqps://`: certificates are verified, and a private CA can be given.

use std::time::Duration;

use click_consumer::{Consumer, Error};
use click_consumer_testkit::RabbitMq;

use crate::common::*;

/// Runs a consumer that must fail start-up on an untrusted certificate.
async fn refused_certificate(config: click_consumer::Config) -> Error {
    let error = Consumer::new(config)
        .unwrap()
        .run(std::future::pending())
        .await
        .expect_err("an unknown CA is refused");
    let chain = format!("{error:?}");
    assert!(
        chain.to_lowercase().contains("certificate") || chain.contains("UnknownIssuer"),
        "the error says it is the certificate: {chain}"
    );
    error
}

#[tokio::test]
async fn amqps_with_a_private_ca_and_verification_by_default() {
    let broker = tokio::task::spawn_blocking(RabbitMq::start_with_tls)
        .await
        .unwrap();
    let names = Names::new("tls");
    let trusted = config(&names)
        .with_rabbitmq_url(broker.amqps_url())
        .with_rabbitmq_ca_file(broker.ca_file());
    let running = start(Consumer::new(trusted.clone()).unwrap()).await;
    publisher(&trusted).await.publish(&event(1)).await.unwrap();
    wait_for_rows(&names, 1).await;
    running.stop().await.unwrap();

    // Without the CA the broker's certificate is not trusted: no connection.
    let untrusted = config(&names)
        .with_rabbitmq_url(broker.amqps_url())
        .with_startup_timeout(Duration::from_secs(1));
    let error = refused_certificate(untrusted).await;
    assert!(
        matches!(error, Error::BrokerUnreachable { .. }),
        "{error:?}"
    );
    tokio::task::spawn_blocking(move || drop(broker))
        .await
        .unwrap();
}

#[tokio::test]
async fn https_to_clickhouse_with_a_private_ca_and_verification_by_default() {
    let clickhouse =
        tokio::task::spawn_blocking(click_consumer_testkit::ClickHouse::start_with_tls)
            .await
            .unwrap();
    let names = Names::new("https");
    let trusted = config(&names)
        .with_clickhouse_url(clickhouse.https_url())
        .with_clickhouse_ca_file(clickhouse.ca_file());
    let running = start(Consumer::new(trusted.clone()).unwrap()).await;
    publisher(&trusted).await.publish(&event(1)).await.unwrap();
    let count = || clickhouse.query(&format!("SELECT count() FROM {}", names.table()));
    wait_until("the row over HTTPS", Duration::from_secs(30), || async {
        clickhouse
            .query(&format!("EXISTS TABLE {}", names.table()))
            .trim()
            == "1"
            && count().trim() == "1"
    })
    .await;
    running.stop().await.unwrap();

    // Without the CA, the certificate is refused.
    let untrusted = config(&names)
        .with_clickhouse_url(clickhouse.https_url())
        .with_startup_timeout(Duration::from_secs(1));
    let error = refused_certificate(untrusted).await;
    assert!(
        matches!(error, Error::ClickHouseUnreachable { .. }),
        "{error:?}"
    );
    tokio::task::spawn_blocking(move || drop(clickhouse))
        .await
        .unwrap();
}
