//! The cluster suite: a steady stream from a publisher using confirms, three replicas of
//! the real `click-consumer` binary, and a cluster that loses a node mid-stream. For each
//! scenario it counts lost events (must be 0), rows stored twice, dead letters, and the
//! seconds from each fault until everything published before it is stored.
//!
//! Scenarios that ran here (see the README's Scaling section for the figures):
//! - a 3-node RabbitMQ 3.10 cluster with a quorum queue: the node holding the queue's
//!   leader is killed (SIGKILL) mid-stream, then started again;
//! - two ClickHouse 18.16 replicas with ZooKeeper: the first replica is killed (SIGKILL)
//!   mid-stream, brought back, then the second is killed;
//! - the same cluster with ZooKeeper stopped for 20 s (the tables go read-only); the
//!   recovery counts from ZooKeeper's return.
//!
//! - the same RabbitMQ cluster restarted node by node (SIGTERM, start, next node).
//!
//! Not yet: a RabbitMQ node partitioned for 30 s.
//!
//! It prints a Markdown table and a closing `cluster: N passed, N failed` line (no libtest
//! harness, so the table shows in CI logs).

mod support;

use std::{
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use click_consumer::{ClickEvent, ClickPublisher, Config};
use click_consumer_testkit::{
    ClickHouse, ClickHouseCluster, RabbitMq, RabbitMqCluster, unique_name,
};
use support::{Service, Stack, free_port, http_get, wait_until};

/// Events per second of the steady stream.
const RATE: u64 = 500;
/// Events per confirmed publish round (every 1000 / (RATE / CHUNK) ms).
const CHUNK: u64 = 10;
/// Consumer replicas.
const REPLICAS: usize = 3;
/// The target of the issue: resumed within 10 s of a node killed or cut off.
const RECOVERY_TARGET: Duration = Duration::from_secs(10);

/// What one scenario measured.
#[derive(Debug, Default)]
struct Outcome {
    name: &'static str,
    published: u64,
    rows: u64,
    distinct: u64,
    lost: u64,
    dead_letters: u64,
    /// Seconds from each fault until every event confirmed before it is stored.
    recoveries: Vec<f64>,
    /// Whether the recoveries must meet `RECOVERY_TARGET` (a node killed or cut off);
    /// other faults (ZooKeeper away) report theirs.
    target_applies: bool,
    note: String,
}

impl Outcome {
    fn duplicates(&self) -> u64 {
        self.rows - self.distinct
    }

    fn passed(&self) -> bool {
        self.lost == 0
            && self.dead_letters == 0
            && (!self.target_applies
                || self
                    .recoveries
                    .iter()
                    .all(|s| *s <= RECOVERY_TARGET.as_secs_f64()))
    }
}

/// A publisher that sends `RATE` events a second in confirmed chunks until stopped,
/// counting what the broker confirmed.
struct Steady {
    confirmed: Arc<AtomicU64>,
    /// Events of chunks whose publish failed (and that are sent again): the broker may
    /// hold these twice.
    unconfirmed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: thread::JoinHandle<()>,
}

impl Steady {
    fn start(config: Config, tag: String) -> Steady {
        let confirmed = Arc::new(AtomicU64::new(0));
        let unconfirmed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (confirmed, unconfirmed, stop) =
                (confirmed.clone(), unconfirmed.clone(), stop.clone());
            thread::spawn(move || {
                let runtime = tokio::runtime::Runtime::new().unwrap();
                runtime.block_on(publish_steadily(config, tag, confirmed, unconfirmed, stop));
            })
        };
        Steady {
            confirmed,
            unconfirmed,
            stop,
            thread,
        }
    }

    fn confirmed(&self) -> u64 {
        self.confirmed.load(Ordering::Acquire)
    }

    fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Release);
        self.thread.join().expect("publisher thread");
        self.confirmed.load(Ordering::Acquire)
    }
}

async fn publish_steadily(
    config: Config,
    tag: String,
    confirmed: Arc<AtomicU64>,
    unconfirmed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) {
    let mut publisher: Option<ClickPublisher> = None;
    let period = Duration::from_millis(1000 * CHUNK / RATE);
    let mut next = tokio::time::Instant::now();
    while !stop.load(Ordering::Acquire) {
        let start = confirmed.load(Ordering::Acquire);
        let events: Vec<ClickEvent> = (start..start + CHUNK)
            .map(|i| {
                ClickEvent::new(format!("{tag}{i:07}"), "2024-01-15T10:30:00Z")
                    .with_user_agent("cluster-suite")
            })
            .collect();
        if publisher.is_none() {
            publisher = ClickPublisher::connect(&config).await.ok();
        }
        // An unconfirmed chunk is sent again (on a new connection): the broker may then
        // hold some of its events twice, which the consumer stores twice.
        let sent = match &publisher {
            Some(p) => {
                let ok = p.publish_all(&events).await.is_ok();
                if !ok {
                    unconfirmed.fetch_add(CHUNK, Ordering::AcqRel);
                }
                ok
            }
            None => false,
        };
        if sent {
            confirmed.fetch_add(CHUNK, Ordering::AcqRel);
            next += period;
            tokio::time::sleep_until(next).await;
        } else {
            publisher = None;
            tokio::time::sleep(Duration::from_millis(100)).await;
            next = tokio::time::Instant::now();
        }
    }
}

/// Three replicas of the binary on one stack, each with its own metrics port.
struct Replicas {
    services: Vec<(Service, u16)>,
}

impl Replicas {
    fn start(stack: &Stack<'_>, env: &[(&str, &str)]) -> Replicas {
        Replicas::spawn(&stack.queue, env, |all| stack.spawn(all))
    }

    /// Starts the replicas one after the other through `spawn` (the first creates the
    /// table, the others find it), each with its own metrics port and consumer tag.
    fn spawn(
        queue: &str,
        env: &[(&str, &str)],
        spawn: impl Fn(&[(&str, &str)]) -> Service,
    ) -> Replicas {
        let mut services = Vec::new();
        for i in 0..REPLICAS {
            let port = free_port();
            let metrics = format!("127.0.0.1:{port}");
            let tag = format!("{queue}-replica{i}");
            let mut all: Vec<(&str, &str)> = env.to_vec();
            all.push(("METRICS_ADDR", &metrics));
            all.push(("CONSUMER_TAG", &tag));
            all.push(("LOG_LEVEL", "warn"));
            services.push((spawn(&all), port));
            wait_until("a replica ready", Duration::from_secs(60), || ready(port));
        }
        Replicas { services }
    }

    /// Rows inserted, summed over the replicas.
    fn inserted(&self) -> u64 {
        self.services
            .iter()
            .map(|(_, port)| counter(*port, "click_consumer_rows_inserted_total"))
            .sum()
    }

    fn stop(mut self) {
        for (service, _) in &mut self.services {
            let status = service.stop();
            assert!(status.success(), "a replica exited with {status}");
        }
    }
}

/// Polls `done` until it holds (true) or `limit` passes (false).
fn support_wait(limit: Duration, mut done: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while !done() {
        if started.elapsed() >= limit {
            return false;
        }
        thread::sleep(Duration::from_millis(200));
    }
    true
}

fn ready(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        && http_get(port, "/ready").starts_with("HTTP/1.1 200")
}

fn counter(port: u16, name: &str) -> u64 {
    http_get(port, "/metrics")
        .lines()
        .filter(|line| line.starts_with(name))
        .map(|line| line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

/// Seconds from now until the replicas have stored everything confirmed now.
fn recovery(publisher: &Steady, replicas: &Replicas, fault: Instant) -> f64 {
    let target = publisher.confirmed();
    wait_until(
        "the stream to be stored again",
        Duration::from_secs(120),
        || replicas.inserted() >= target,
    );
    fault.elapsed().as_secs_f64()
}

/// The faults of a ClickHouse scenario, run while the stream flows; each returns the
/// instant its fault ended service (the kill, or the ZooKeeper restart).
type Faults = fn(&ClickHouseCluster, &Steady, &Replicas, &mut Outcome);

fn replicas_killed(
    cluster: &ClickHouseCluster,
    publisher: &Steady,
    replicas: &Replicas,
    outcome: &mut Outcome,
) {
    for victim in [0, 1] {
        let fault = Instant::now();
        cluster.replica(victim).kill();
        outcome
            .recoveries
            .push(recovery(publisher, replicas, fault));
        thread::sleep(Duration::from_secs(3));
        cluster.replica(victim).restart();
        thread::sleep(Duration::from_secs(3));
    }
}

fn zookeeper_stopped(
    cluster: &ClickHouseCluster,
    publisher: &Steady,
    replicas: &Replicas,
    outcome: &mut Outcome,
) {
    cluster.zookeeper.stop();
    thread::sleep(Duration::from_secs(20));
    let back = Instant::now();
    cluster.zookeeper.restart();
    // Recovery counts from ZooKeeper's return: while it is away, the tables are
    // read-only by design and nothing can be stored.
    outcome.recoveries.push(recovery(publisher, replicas, back));
    thread::sleep(Duration::from_secs(3));
}

fn clickhouse_scenario(
    rabbitmq: &RabbitMq,
    name: &'static str,
    faults: Faults,
    target_applies: bool,
) -> Outcome {
    let cluster = ClickHouseCluster::start(2);
    let stack = Stack::new(rabbitmq, cluster.replica(0), "chcluster");
    let engine = cluster.replicated_engine(&unique_name("clicks"));
    let urls = cluster.urls();
    let env = [
        ("CLICKHOUSE_URL", urls.as_str()),
        ("CLICKHOUSE_CLUSTER", cluster.name()),
        ("CLICKHOUSE_TABLE_ENGINE", engine.as_str()),
        ("RETRY_INITIAL_BACKOFF_MS", "100"),
    ];
    let replicas = Replicas::start(&stack, &env);
    let publisher = Steady::start(stack.config(), unique_name("chk"));
    let mut outcome = Outcome {
        name,
        target_applies,
        ..Outcome::default()
    };
    thread::sleep(Duration::from_secs(3));
    faults(&cluster, &publisher, &replicas, &mut outcome);
    outcome.published = publisher.finish();
    wait_until("everything stored", Duration::from_secs(60), || {
        replicas.inserted() >= outcome.published
    });
    let retries: u64 = replicas
        .services
        .iter()
        .map(|(_, port)| counter(*port, "click_consumer_insert_retries_total"))
        .sum();
    replicas.stop();
    let table = format!("{}.click_events", stack.database);
    let count = |ch: &ClickHouse| -> (u64, u64) {
        let out = ch.query(&format!(
            "SELECT count(), uniqExact(short_code) FROM {table}"
        ));
        let mut f = out.split_whitespace().map(|v| v.parse::<u64>().unwrap());
        (f.next().unwrap(), f.next().unwrap())
    };
    // Both replicas should converge on the same rows; if they have not within 30 s,
    // the replica holding more distinct rows is counted, and the note says so.
    let converged = support_wait(Duration::from_secs(30), || {
        count(cluster.replica(0)) == count(cluster.replica(1))
    });
    let (first, second) = (count(cluster.replica(0)), count(cluster.replica(1)));
    (outcome.rows, outcome.distinct) = if first.1 >= second.1 { first } else { second };
    outcome.lost = outcome.published.saturating_sub(outcome.distinct);
    outcome.dead_letters = stack
        .queue_counts(&stack.dead_letter_queue())
        .map_or(0, |(ready, unacked)| ready + unacked);
    let replication = if converged {
        format!("{} rows on each replica", outcome.rows)
    } else {
        format!("replicas NOT converged after 30 s: (rows, distinct) {first:?} and {second:?}")
    };
    outcome.note = format!(
        "{replication}; {retries} INSERTs retried after backoff (failovers to the other replica are immediate and not counted)"
    );
    outcome
}

/// The binary with `env` only (no Stack: the broker is a cluster).
fn spawn_binary(env: &[(&str, &str)]) -> Service {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_click-consumer"));
    command
        .env_clear()
        .env("CLICKHOUSE_USER", "default")
        .env("BATCH_SIZE", "500")
        .env("BATCH_TIMEOUT_MS", "200")
        .env("RETRY_INITIAL_BACKOFF_MS", "100")
        .env("RETRY_MAX_BACKOFF_MS", "1000")
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit());
    for (name, value) in env {
        command.env(name, value);
    }
    Service(command.spawn().expect("the click-consumer binary starts"))
}

/// Distinct clicks `0..confirmed` of `tag` stored in `table`.
fn stored_of(clickhouse: &ClickHouse, table: &str, tag: &str, confirmed: u64) -> (u64, u64) {
    let out = clickhouse.query(&format!(
        "SELECT uniqExactIf(short_code, short_code < '{tag}{confirmed:07}'), count() FROM {table}"
    ));
    let mut f = out
        .split_whitespace()
        .map(|v| v.parse::<u64>().unwrap_or(0));
    (f.next().unwrap_or(0), f.next().unwrap_or(0))
}

/// The RabbitMQ fault of a scenario.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BrokerFault {
    /// SIGKILL the node holding the quorum queue's leader, later start it again.
    LeaderKilled,
    /// Stop (SIGTERM) and start each node in turn.
    RollingRestart,
}

fn rabbitmq_scenario(clickhouse: &ClickHouse, fault_kind: BrokerFault) -> Outcome {
    let cluster = RabbitMqCluster::start(3);
    let exchange = unique_name("rq_ex");
    let queue = unique_name("rq_q");
    let database = unique_name("rq_db");
    let table = format!("{database}.click_events");
    // A heartbeat of 2 s: a node that vanishes without closing its sockets is noticed
    // within about 4 s.
    let urls = cluster.amqp_urls("heartbeat=2");
    let ch_url = clickhouse.url();
    let env = [
        ("RABBITMQ_URL", urls.as_str()),
        ("RABBITMQ_EXCHANGE", exchange.as_str()),
        ("RABBITMQ_QUEUE", queue.as_str()),
        ("RABBITMQ_QUEUE_TYPE", "quorum"),
        ("CLICKHOUSE_URL", ch_url.as_str()),
        ("CLICKHOUSE_DATABASE", database.as_str()),
    ];
    let replicas = Replicas::spawn(&queue, &env, spawn_binary);
    let config = Config::default()
        .with_rabbitmq_url(&urls)
        .with_exchange(&exchange)
        .with_queue(&queue)
        .with_queue_type(click_consumer::QueueType::Quorum);
    let tag = unique_name("rq");
    let publisher = Steady::start(config, tag.clone());
    let mut outcome = Outcome {
        name: match fault_kind {
            BrokerFault::LeaderKilled => {
                "RabbitMQ: 3-node cluster, quorum queue, leader node killed (SIGKILL)"
            }
            BrokerFault::RollingRestart => {
                "RabbitMQ: 3-node cluster, quorum queue, rolling restart of the 3 nodes"
            }
        },
        target_applies: true,
        ..Outcome::default()
    };
    thread::sleep(Duration::from_secs(3));
    let leader = cluster
        .leader_of(&queue)
        .expect("the quorum queue has a leader");
    // Until every click confirmed before the fault is stored, then until every
    // replica is ready again (also the ones whose node went away).
    let recover = |fault: Instant, outcome: &mut Outcome| {
        let target = publisher.confirmed();
        wait_until(
            "the stream to be stored again",
            Duration::from_secs(120),
            || stored_of(clickhouse, &table, &tag, target).0 >= target,
        );
        outcome.recoveries.push(fault.elapsed().as_secs_f64());
        wait_until("every replica ready again", Duration::from_secs(60), || {
            replicas.services.iter().all(|(_, port)| ready(*port))
        });
        outcome.recoveries.push(fault.elapsed().as_secs_f64());
    };
    let mut new_leader = None;
    match fault_kind {
        BrokerFault::LeaderKilled => {
            let fault = Instant::now();
            cluster.kill(leader);
            recover(fault, &mut outcome);
            new_leader = cluster.leader_of(&queue);
            thread::sleep(Duration::from_secs(3));
            cluster.restart(leader);
        }
        BrokerFault::RollingRestart => {
            for node in 0..cluster.len() {
                let fault = Instant::now();
                cluster.stop(node);
                recover(fault, &mut outcome);
                cluster.restart(node);
                thread::sleep(Duration::from_secs(2));
            }
        }
    }
    thread::sleep(Duration::from_secs(3));
    let unconfirmed = publisher.unconfirmed.load(Ordering::Acquire);
    outcome.published = publisher.finish();
    let published = outcome.published;
    wait_until("everything stored", Duration::from_secs(90), || {
        stored_of(clickhouse, &table, &tag, published).0 >= published
    });
    // Let redeliveries settle before counting what was stored twice.
    thread::sleep(Duration::from_secs(2));
    replicas.stop();
    (outcome.distinct, outcome.rows) = stored_of(clickhouse, &table, &tag, published);
    outcome.lost = published.saturating_sub(outcome.distinct);
    let dead_letter_queue = format!("{queue}.dead-letter");
    outcome.dead_letters = cluster
        .queue_counts(&dead_letter_queue)
        .map_or(0, |(ready, unacked)| ready + unacked);
    outcome.note = format!(
        "leader was node {leader} (after a kill: {new_leader:?}); recoveries per fault: every click confirmed before it stored, then every replica ready again; the publisher sent {unconfirmed} clicks again after a failed publish (the broker may hold those twice: they count in rows stored twice)"
    );
    outcome
}

fn main() -> ExitCode {
    let started = Instant::now();
    let rabbitmq = RabbitMq::start();
    let clickhouse = ClickHouse::start();
    let outcomes = vec![
        rabbitmq_scenario(&clickhouse, BrokerFault::LeaderKilled),
        rabbitmq_scenario(&clickhouse, BrokerFault::RollingRestart),
        clickhouse_scenario(
            &rabbitmq,
            "ClickHouse: replica 1 killed, back, replica 2 killed",
            replicas_killed,
            true,
        ),
        clickhouse_scenario(
            &rabbitmq,
            "ClickHouse: ZooKeeper stopped for 20 s",
            zookeeper_stopped,
            false,
        ),
    ];
    println!(
        "\n| scenario | published | lost | stored twice | dead letters | recovery (s) | passed |"
    );
    println!("|---|---:|---:|---:|---:|---|---|");
    for o in &outcomes {
        let recoveries: Vec<String> = o.recoveries.iter().map(|s| format!("{s:.1}")).collect();
        println!(
            "| {} | {} | {} | {} | {} | {}{} | {} |",
            o.name,
            o.published,
            o.lost,
            o.duplicates(),
            o.dead_letters,
            recoveries.join(", "),
            if o.target_applies { "" } else { " (no target)" },
            if o.passed() { "yes" } else { "NO" }
        );
    }
    for o in &outcomes {
        println!("- {}: {}", o.name, o.note);
    }
    let failed = outcomes.iter().filter(|o| !o.passed()).count();
    println!(
        "cluster: {} passed, {failed} failed ({:.0} s)",
        outcomes.len() - failed,
        started.elapsed().as_secs_f64()
    );
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
