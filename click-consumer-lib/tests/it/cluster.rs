//! `CLICKHOUSE_CLUSTER` on a real two-replica ClickHouse cluster with ZooKeeper: the
//! database and a ReplicatedMergeTree table are created `ON CLUSTER`, and rows written
//! through one replica reach both.

use std::time::Duration;

use click_consumer::{ClickEvent, Consumer};
use click_consumer_testkit::{ClickHouseCluster, unique_name};

use crate::common::*;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.expect("blocking task")
}

#[tokio::test]
async fn on_cluster_creates_a_replicated_table_on_every_replica() {
    let cluster = blocking(|| ClickHouseCluster::start(2)).await;
    let names = Names::new("on_cluster");
    let engine = cluster.replicated_engine(&unique_name("clicks"));
    let config = config(&names)
        .with_clickhouse_url(cluster.urls())
        .with_clickhouse_cluster(cluster.name())
        .with_clickhouse_table_engine(&engine);
    let consumer = Consumer::new(config.clone()).unwrap();
    let metrics = consumer.metrics();
    let running = start(consumer).await;
    let publisher = publisher(&config).await;
    let events: Vec<ClickEvent> = (0..2000).map(event).collect();
    publisher.publish_all(&events).await.unwrap();
    wait_until("2000 rows stored", Duration::from_secs(60), || async {
        metrics.summary().stored >= 2000
    })
    .await;
    let summary = running.stop().await.unwrap();
    assert_eq!(summary.stored, 2000, "{summary:?}");

    let table = names.table();
    let database = names.database.clone();
    let cluster = blocking(move || {
        for replica in cluster.replicas() {
            let engine = replica.query(&format!(
                "SELECT engine FROM system.tables WHERE database = '{database}' AND name = 'click_events'"
            ));
            assert_eq!(engine.trim(), "ReplicatedMergeTree", "on {}", replica.url());
        }
        cluster
    })
    .await;
    // Replication is asynchronous: wait until both replicas hold every row.
    wait_for_both(&cluster, &table, 2000).await;

    // A restart while a replica is down: the table is there, so start-up does not wait
    // for the `ON CLUSTER` DDL queue (which waits for every host), and rows go to the
    // live replica.
    let cluster = blocking(move || {
        cluster.replica(0).kill();
        cluster
    })
    .await;
    let consumer = Consumer::new(config.clone()).unwrap();
    let metrics = consumer.metrics();
    let running = start(consumer).await;
    let more: Vec<ClickEvent> = (2000..3000).map(event).collect();
    publisher.publish_all(&more).await.unwrap();
    wait_until(
        "1000 more rows with one replica down",
        Duration::from_secs(30),
        || async { metrics.summary().stored >= 1000 },
    )
    .await;
    running.stop().await.unwrap();
    let cluster = blocking(move || {
        cluster.replica(0).restart();
        cluster
    })
    .await;
    wait_for_both(&cluster, &table, 3000).await;
}

/// Waits until every replica holds `n` distinct rows, each once.
async fn wait_for_both(cluster: &ClickHouseCluster, table: &str, n: u64) {
    for index in 0..cluster.replicas().len() {
        let replica = cluster.replica(index);
        wait_until(
            &format!("{n} rows on replica {index}"),
            Duration::from_secs(30),
            || async {
                let out = replica.query(&format!(
                    "SELECT uniqExact(short_code), count() FROM {table}"
                ));
                out.trim() == format!("{n}\t{n}")
            },
        )
        .await;
    }
}
