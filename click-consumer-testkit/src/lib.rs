//! Test support for click-consumer: private, real RabbitMQ and ClickHouse servers for
//! integration tests and benchmarks, through a blocking std-only API.
//!
//! Each server runs from a fresh temporary directory on free ports of 127.0.0.1, so
//! test runs never share state with each other or with a system-wide service:
//!
//! * [`RabbitMq`]: RabbitMQ 3.10 (Debian's package) with a private epmd; ready in
//!   about 3-4 s on 2 cores. With `CLICK_CONSUMER_TEST_RABBITMQ=4`, RabbitMQ 4.0 from
//!   a Debian trixie chroot instead (build it with `scripts/install-rabbitmq4.sh`),
//!   run there as its `rabbitmq` user; `=/some/path` names another chroot. A variable
//!   that asks for a chroot that is not there makes the test panic: it never falls
//!   back to 3.10.
//! * [`ClickHouse`]: `clickhouse-server` (18.16 from Debian); ready in about 0.15 s.
//! * [`shared`]: one of each per test process, started on first use, in parallel.
//! * [`ClickHouseCluster`]: a [`ZooKeeper`] (Debian's `zookeeper`) and ClickHouse
//!   replicas of one shard, for `ON CLUSTER` DDL and Replicated tables.
//! * [`RabbitMqCluster`]: RabbitMQ nodes clustered on loopback (quorum queues); one
//!   node can be cut off from the others ([`RabbitMqCluster::partition`]).
//! * [`Partition`]: TCP flows on loopback dropped until the guard is dropped (nftables;
//!   needs root).
//!
//! The servers die with the test process however it ends (normal exit, panic,
//! SIGKILL): they are spawned with `PR_SET_PDEATHSIG`, from a thread that lives as long
//! as the process. Their directories are removed on drop and, for servers that are
//! never dropped (such as the shared ones), by a small cleanup shell just after the
//! process ends.
//!
//! The servers must be installed: run `scripts/install-services.sh`. Nothing is
//! skipped silently; a missing server makes the test panic with that advice.
//!
//! ```no_run
//! let servers = click_consumer_testkit::shared();
//! let table = click_consumer_testkit::unique_name("clicks");
//! servers.clickhouse.query(&format!("CREATE TABLE {table} (id UInt64) ENGINE = Memory"));
//! let url = servers.rabbitmq.amqp_url();
//! # let _ = url;
//! ```
#![warn(missing_docs)]

mod clickhouse;
mod cluster;
mod http;
mod janitor;
mod partition;
mod ports;
mod process;
mod rabbitmq;
mod rabbitmq_chroot;
mod rabbitmq_cluster;
mod rabbitmq_home;
mod tls;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

pub use clickhouse::ClickHouse;
pub use cluster::{ClickHouseCluster, ZooKeeper};
pub use partition::{Flow, Partition};
pub use rabbitmq::RabbitMq;
pub use rabbitmq_cluster::RabbitMqCluster;

/// One RabbitMQ broker and one ClickHouse server, as handed out by [`shared`].
#[derive(Debug)]
pub struct Servers {
    /// The private RabbitMQ broker.
    pub rabbitmq: RabbitMq,
    /// The private ClickHouse server.
    pub clickhouse: ClickHouse,
}

/// The servers shared by all tests of this process, started on first call (both at
/// once, on two threads).
///
/// Tests that share them should use [`unique_name`] for queues, exchanges and tables,
/// and must not stop or restart them: start a private [`RabbitMq`] or [`ClickHouse`]
/// for that.
///
/// # Panics
/// If either server cannot be started; every later call panics with the same message
/// at once instead of trying again.
pub fn shared() -> &'static Servers {
    static SHARED: OnceLock<Result<Servers, String>> = OnceLock::new();
    match SHARED.get_or_init(start_both) {
        Ok(servers) => servers,
        Err(message) => panic!("the shared test servers could not be started:\n{message}"),
    }
}

fn start_both() -> Result<Servers, String> {
    let (rabbitmq, clickhouse) = thread::scope(|scope| {
        let rabbitmq = scope.spawn(RabbitMq::start);
        let clickhouse = scope.spawn(ClickHouse::start);
        (rabbitmq.join(), clickhouse.join())
    });
    match (rabbitmq, clickhouse) {
        (Ok(rabbitmq), Ok(clickhouse)) => Ok(Servers {
            rabbitmq,
            clickhouse,
        }),
        (rabbitmq, clickhouse) => {
            let errors: Vec<String> = [rabbitmq.err(), clickhouse.err()]
                .into_iter()
                .flatten()
                .map(|payload| process::panic_text(payload.as_ref()))
                .collect();
            Err(errors.join("\n\n"))
        }
    }
}

/// A name no other call returns, in this or any other process:
/// `{prefix}_{pid}_{counter}_{nanoseconds}`.
///
/// It only holds `[A-Za-z0-9_]` and starts with a letter or `_`, so it can be used
/// as a queue or exchange name and, unquoted, as a ClickHouse identifier. Characters
/// of `prefix` outside that set become `_`; a prefix that starts with a digit gets
/// `t_` in front.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let count = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    let mut clean: String = prefix
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    if !clean.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_') {
        clean.insert_str(0, "t_");
    }
    format!("{clean}_{}_{count}_{nanos}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::unique_name;

    #[test]
    fn unique_names_are_distinct_identifiers() {
        let a = unique_name("clicks");
        let b = unique_name("clicks");
        assert_ne!(a, b);
        assert!(a.starts_with("clicks_"));
        for name in [a, b, unique_name("9 lives-x"), unique_name("")] {
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{name}"
            );
            assert!(
                name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_'),
                "{name}"
            );
        }
        assert!(unique_name("9 lives-x").starts_with("t_9_lives_x_"));
    }
}
