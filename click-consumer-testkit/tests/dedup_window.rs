//! The deduplication window of the testkit's ClickHouse cluster: a Replicated table drops
//! a block inserted again (on any replica) only while ZooKeeper still remembers its hash,
//! that is within the last `replicated_deduplication_window` blocks. The consumer retries
//! an INSERT whose answer was lost after its 60 s timeout, when hundreds of other blocks
//! may have come in between (see the README's hung-replica scenario): this shows the
//! default of 100 forgetting such a block, and the cluster's own window keeping it.

use std::{
    thread,
    time::{Duration, Instant},
};

use click_consumer_testkit::{ClickHouseCluster, unique_name};

/// Blocks inserted between the first attempt and the retry: more than the default window.
const BETWEEN: u64 = 150;
/// The id of the block that is inserted twice.
const RETRIED: u64 = 1_000_000;

#[test]
fn a_retried_block_is_dropped_within_the_window_and_stored_again_beyond_it() {
    assert!(
        u64::from(ClickHouseCluster::DEDUPLICATION_WINDOW) > BETWEEN,
        "the cluster's window must cover the blocks in between"
    );
    let cluster = ClickHouseCluster::start(2);
    let tables = [
        (unique_name("cluster_window"), ""),
        (
            unique_name("default_window"),
            " SETTINGS replicated_deduplication_window = 100",
        ),
    ];
    for (table, settings) in &tables {
        let engine = cluster.replicated_engine(table);
        cluster.replica(0).query(&format!(
            "CREATE TABLE default.{table} ON CLUSTER {} (id UInt64) ENGINE = {engine} ORDER BY id{settings}",
            cluster.name()
        ));
        cluster
            .replica(0)
            .query(&format!("INSERT INTO default.{table} VALUES ({RETRIED})"));
        for id in 0..BETWEEN {
            cluster
                .replica(0)
                .query(&format!("INSERT INTO default.{table} VALUES ({id})"));
        }
    }
    // ZooKeeper's remembered blocks are trimmed to the window by each replica's cleanup
    // thread, every 30-40 s (cleanup_delay_period and its random addition).
    thread::sleep(Duration::from_secs(45));
    for (table, _) in &tables {
        cluster
            .replica(1)
            .query(&format!("INSERT INTO default.{table} VALUES ({RETRIED})"));
    }
    let rows = |table: &str, filter: &str| -> u64 {
        cluster
            .replica(1)
            .query(&format!("SELECT count() FROM default.{table}{filter}"))
            .trim()
            .parse()
            .expect("a count")
    };
    let count_of_retried = |table: &str, expected_total: u64| -> u64 {
        // Until replica 1 holds every block (it fetches those inserted on replica 0).
        let started = Instant::now();
        while rows(table, "") < expected_total && started.elapsed() < Duration::from_secs(60) {
            thread::sleep(Duration::from_millis(200));
        }
        rows(table, &format!(" WHERE id = {RETRIED}"))
    };
    let (kept, _) = &tables[0];
    let (forgotten, _) = &tables[1];
    assert_eq!(
        count_of_retried(kept, BETWEEN + 1),
        1,
        "with a window of {}, the retried block was stored twice",
        ClickHouseCluster::DEDUPLICATION_WINDOW
    );
    assert_eq!(
        count_of_retried(forgotten, BETWEEN + 2),
        2,
        "with a window of 100, a block retried after {BETWEEN} others was expected to be \
         stored twice (if ClickHouse now keeps it, the window is no longer the cause)"
    );
}
