//! The fault-injection suite: each scenario publishes a known stream (valid clicks with
//! 5% poison of every kind) to the real `click-consumer` binary while a fault happens,
//! lets a consumer drain what is left, and counts every message: stored exactly once,
//! stored twice, dead-lettered, still queued, lost.
//!
//! Pass: nothing lost; every poison message dead-lettered with its kind; no duplicates
//! where the fault allows it, and never more than one batch where it does not.
//!
//! It prints a Markdown table and a closing `faults: N passed, N failed` line (it runs
//! without libtest's harness so the table shows in CI logs).

mod support;

use std::{
    collections::BTreeMap,
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use click_consumer::{ClickEvent, ClickPublisher};
use click_consumer_testkit::{ClickHouse, RabbitMq, shared};
use support::{Service, Stack, wait_until};

/// Rows per batch in every scenario (BATCH_SIZE): the most rows a fault may duplicate
/// (the batch whose commit was not acknowledged).
const BATCH: u64 = 500;
/// The most dead letters a fault may duplicate: the poison (1 in 20) among the messages
/// in flight, which is at most the prefetch window (2 x BATCH_SIZE).
const DEAD_LETTER_WINDOW: u64 = 2 * BATCH / 20;
const VALID: usize = 3000;

/// One message of a scenario's stream.
struct Message {
    body: Vec<u8>,
    /// The dead-letter kind expected for poison; `None` for a valid click.
    poison: Option<&'static str>,
}

/// Valid clicks with distinct short codes; every 20th message is poison, cycling
/// through every kind of bad input.
fn stream(tag: &str) -> Vec<Message> {
    let mut messages = Vec::new();
    let mut valid = 0;
    let mut poison = 0;
    while valid < VALID {
        if messages.len() % 20 == 19 {
            messages.push(poison_message(poison));
            poison += 1;
        } else {
            let event = ClickEvent::new(format!("{tag}{valid:05}"), "2024-01-15T10:30:00Z")
                .with_user_agent("fault-suite")
                .with_original_url(format!("https://example.com/{valid}"));
            messages.push(Message {
                body: serde_json::to_vec(&event).unwrap(),
                poison: None,
            });
            valid += 1;
        }
    }
    messages
}

fn poison_message(i: usize) -> Message {
    let ts = "2024-01-15T10:30:00Z";
    let (body, kind): (Vec<u8>, &str) = match i % 9 {
        0 => (format!("not json {i}").into_bytes(), "not_json"),
        1 => (
            [b"\xff\xfe".as_slice(), i.to_string().as_bytes()].concat(),
            "not_utf8",
        ),
        2 => (format!("[\"p{i}\",\"{ts}\"]").into_bytes(), "not_an_object"),
        3 => (
            format!(r#"{{"short_code":{i},"timestamp":"{ts}"}}"#).into_bytes(),
            "invalid_field",
        ),
        4 => (
            format!(r#"{{"short_code":"p{i}","timestamp":"not a time"}}"#).into_bytes(),
            "invalid_timestamp",
        ),
        5 => (Vec::new(), "not_json"),
        6 => {
            let deep = format!(
                r#"{{"short_code":"p{i}","timestamp":"{ts}","x":{}{}}}"#,
                "[".repeat(200),
                "]".repeat(200)
            );
            (deep.into_bytes(), "not_json")
        }
        7 => {
            let huge = format!(
                r#"{{"short_code":"p{i}","timestamp":"{ts}","user_agent":"{}"}}"#,
                "x".repeat(1_100_000)
            );
            (huge.into_bytes(), "too_large")
        }
        _ => (
            format!(r#"{{"timestamp":"{ts}","n":{i}}}"#).into_bytes(),
            "invalid_field",
        ),
    };
    Message {
        body,
        poison: Some(kind),
    }
}

/// What became of a scenario's stream.
struct Counts {
    name: &'static str,
    valid: u64,
    poison: u64,
    stored_once: u64,
    stored_twice: u64,
    dead_lettered: u64,
    /// Dead letters beyond one per poison message (its ack was lost, it came back).
    dead_lettered_twice: u64,
    /// Every kind has at least as many dead letters as poison messages of that kind.
    dead_letter_kinds_match: bool,
    /// The fault was really exercised (e.g. INSERTs failed while ClickHouse was down).
    exercised: bool,
    still_queued: u64,
    lost: u64,
    duplicates_allowed: u64,
    note: String,
}

impl Counts {
    fn dead_letter_duplicates_allowed(&self) -> u64 {
        if self.duplicates_allowed > 0 {
            DEAD_LETTER_WINDOW
        } else {
            0
        }
    }

    fn passed(&self) -> bool {
        self.lost == 0
            && self.exercised
            && self.still_queued == 0
            && self.dead_letter_kinds_match
            && self.stored_twice <= self.duplicates_allowed
            && self.dead_lettered_twice <= self.dead_letter_duplicates_allowed()
    }
}

/// A scenario's stack, stream and publisher.
struct Run<'a> {
    name: &'static str,
    stack: Stack<'a>,
    messages: Vec<Message>,
    runtime: tokio::runtime::Runtime,
    publisher: ClickPublisher,
}

impl<'a> Run<'a> {
    fn new(
        name: &'static str,
        tag: &str,
        rabbitmq: &'a RabbitMq,
        clickhouse: &'a ClickHouse,
    ) -> Self {
        let stack = Stack::new(rabbitmq, clickhouse, tag);
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let publisher = stack.publisher(&runtime);
        Run {
            name,
            stack,
            messages: stream(tag),
            runtime,
            publisher,
        }
    }

    /// Publishes messages `range` now, with confirms.
    fn publish(&self, range: std::ops::Range<usize>) {
        self.runtime.block_on(async {
            for message in &self.messages[range] {
                self.publisher.publish_bytes(&message.body).await.unwrap();
            }
        });
    }

    fn wait_rows(&self, at_least: u64) {
        wait_until(&format!("{at_least} rows"), Duration::from_secs(60), || {
            self.stack.rows().0 >= at_least
        });
    }

    /// Lets `consumer` (or a new one) drain what is left, stops it, and counts.
    fn finish(self, consumer: Option<Service>, duplicates_allowed: u64, note: String) -> Counts {
        let mut consumer = consumer.unwrap_or_else(|| self.stack.spawn(&[]));
        let valid = self.messages.iter().filter(|m| m.poison.is_none()).count() as u64;
        let poison = self.messages.len() as u64 - valid;
        let drained = poll(Duration::from_secs(90), || {
            let dead = self
                .stack
                .queue_counts(&self.stack.dead_letter_queue())
                .map_or(0, |q| q.0);
            self.stack.rows().1 == valid && self.stack.queue() == (0, 0) && dead >= poison
        });
        let status = consumer.stop();
        let (rows, distinct) = self.stack.rows();
        let (ready, unacked) = self.stack.queue();
        let kinds = self.stack.take_dead_letters(&self.runtime);
        let mut expected: BTreeMap<String, u64> = BTreeMap::new();
        for kind in self.messages.iter().filter_map(|m| m.poison) {
            *expected.entry(kind.to_owned()).or_default() += 1;
        }
        let dead_lettered: u64 = kinds.values().sum();
        let kinds_match = expected
            .iter()
            .all(|(kind, n)| kinds.get(kind).is_some_and(|got| got >= n))
            && kinds.keys().all(|kind| expected.contains_key(kind));
        let mut note = note;
        if !drained {
            note.push_str(" (did not drain within 90 s)");
        }
        if !status.success() {
            note.push_str(&format!(" (consumer exited {status})"));
        }
        Counts {
            name: self.name,
            valid,
            poison,
            stored_once: distinct,
            stored_twice: rows - distinct,
            dead_lettered,
            dead_lettered_twice: dead_lettered.saturating_sub(poison),
            dead_letter_kinds_match: kinds_match,
            exercised: true,
            still_queued: ready + unacked,
            lost: valid.saturating_sub(distinct) + poison.saturating_sub(dead_lettered),
            duplicates_allowed,
            note,
        }
    }
}

fn poll(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    while started.elapsed() < limit {
        if check() {
            return true;
        }
        thread::sleep(Duration::from_millis(200));
    }
    false
}

fn clickhouse_stopped_10s() -> Counts {
    let clickhouse = ClickHouse::start();
    let run = Run::new(
        "ClickHouse stopped for 10 s mid-stream",
        "chstop",
        &shared().rabbitmq,
        &clickhouse,
    );
    let consumer = run.stack.spawn(&[]);
    let half = run.messages.len() / 2;
    run.publish(0..half);
    run.wait_rows(500);
    let outage = Instant::now();
    clickhouse.stop();
    run.publish(half..run.messages.len()); // arrives while ClickHouse is down
    thread::sleep(Duration::from_secs(10).saturating_sub(outage.elapsed()));
    let retries = run.stack.metric("click_consumer_insert_retries_total");
    let stored_during = run.stack.metric("click_consumer_rows_inserted_total");
    clickhouse.restart();
    let mut counts = run.finish(
        Some(consumer),
        0,
        format!("{retries} INSERT retries during the outage"),
    );
    counts.exercised = retries > 0 && stored_during < counts.valid;
    counts
}

fn clickhouse_killed_mid_insert() -> Counts {
    let clickhouse = ClickHouse::start();
    let run = Run::new(
        "ClickHouse killed (SIGKILL) mid-insert",
        "chkill",
        &shared().rabbitmq,
        &clickhouse,
    );
    run.publish(0..run.messages.len());
    let consumer = run.stack.spawn(&[]);
    run.wait_rows(1);
    let stored_before = run.stack.rows().0;
    clickhouse.kill();
    thread::sleep(Duration::from_secs(2));
    clickhouse.restart();
    let mut counts = run.finish(
        Some(consumer),
        BATCH,
        format!(
            "killed with {stored_before} rows stored; an INSERT may commit just before the kill"
        ),
    );
    counts.exercised = stored_before < counts.valid;
    counts
}

fn clickhouse_outage_past_release_limit() -> Counts {
    let clickhouse = ClickHouse::start();
    let run = Run::new(
        "ClickHouse down past INSERT_RELEASE_AFTER_MS (2 s)",
        "chlong",
        &shared().rabbitmq,
        &clickhouse,
    );
    let consumer = run.stack.spawn(&[("INSERT_RELEASE_AFTER_MS", "2000")]);
    let half = run.messages.len() / 2;
    run.publish(0..half);
    run.wait_rows(500);
    clickhouse.stop();
    run.publish(half..run.messages.len()); // arrives while ClickHouse is down
    thread::sleep(Duration::from_secs(8));
    let released = run.stack.metric("click_consumer_messages_released_total");
    let retries = run.stack.metric("click_consumer_insert_retries_total");
    let (ready, unacked) = run.stack.queue();
    clickhouse.restart();
    let mut counts = run.finish(
        Some(consumer),
        0,
        format!("{released} messages released; {retries} INSERT retries in 8 s; during the pause {ready} ready, {unacked} unacked"),
    );
    // Released, paused (nothing held unacked), and no busy loop of retries.
    counts.exercised = released > 0 && unacked == 0 && retries < 40;
    counts
}

fn rabbitmq_restarted() -> Counts {
    let rabbitmq = RabbitMq::start();
    let run = Run::new(
        "RabbitMQ restarted mid-stream",
        "rmqrestart",
        &rabbitmq,
        &shared().clickhouse,
    );
    run.publish(0..run.messages.len());
    let consumer = run.stack.spawn(&[]);
    run.wait_rows(1000);
    let stored_before = run.stack.rows().0;
    rabbitmq.restart();
    let mut counts = run.finish(
        Some(consumer),
        BATCH,
        format!("restarted with {stored_before} rows stored; the acks of the batch in flight can be lost"),
    );
    counts.exercised = stored_before < counts.valid;
    drop(rabbitmq);
    counts
}

fn consumer_killed_and_restarted() -> Counts {
    let run = Run::new(
        "consumer SIGKILLed mid-stream, restarted",
        "sigkill",
        &shared().rabbitmq,
        &shared().clickhouse,
    );
    run.publish(0..run.messages.len());
    let mut consumer = run.stack.spawn(&[]);
    run.wait_rows(1000);
    consumer.sigkill();
    let stored_before = run.stack.rows().0;
    let mut counts = run.finish(
        None,
        BATCH,
        format!(
            "killed with {stored_before} rows stored; a batch committed but not acked comes back"
        ),
    );
    counts.exercised = stored_before < counts.valid;
    counts
}

fn sigterm_mid_batch() -> Counts {
    let run = Run::new(
        "SIGTERM mid-batch, restarted",
        "sigterm",
        &shared().rabbitmq,
        &shared().clickhouse,
    );
    // A batch that only the shutdown flushes.
    let mut consumer = run.stack.spawn(&[("BATCH_TIMEOUT_MS", "60000")]);
    run.publish(0..300);
    wait_until("300 deliveries", Duration::from_secs(30), || {
        run.stack.metric("click_consumer_messages_received_total") >= 300
    });
    let status = consumer.stop();
    let stored = run.stack.rows().0;
    run.publish(300..run.messages.len());
    let mut counts = run.finish(
        None,
        0,
        format!("{status}, {stored} rows flushed at SIGTERM"),
    );
    if !status.success() {
        counts.lost = counts.lost.max(1);
    }
    counts
}

fn queue_deleted() -> Counts {
    let run = Run::new(
        "queue deleted under the consumer",
        "qdel",
        &shared().rabbitmq,
        &shared().clickhouse,
    );
    let consumer = run.stack.spawn(&[]);
    let half = run.messages.len() / 2;
    run.publish(0..half);
    let first_valid = run.messages[..half]
        .iter()
        .filter(|m| m.poison.is_none())
        .count() as u64;
    run.wait_rows(first_valid);
    wait_until("the queue to drain", Duration::from_secs(30), || {
        run.stack.queue() == (0, 0)
    });
    run.stack.rabbitmq.ctl(&["delete_queue", &run.stack.queue]);
    wait_until(
        "the consumer to declare the queue again",
        Duration::from_secs(30),
        || run.stack.queue_counts(&run.stack.queue).is_some(),
    );
    let reconnects = run.stack.metric("click_consumer_broker_reconnects_total");
    run.publish(half..run.messages.len());
    run.finish(Some(consumer), 0, format!("{reconnects} reconnect(s)"))
}

fn main() -> ExitCode {
    type Scenario = (&'static str, fn() -> Counts);
    let scenarios: [Scenario; 7] = [
        ("clickhouse_stopped_10s", clickhouse_stopped_10s),
        ("clickhouse_killed_mid_insert", clickhouse_killed_mid_insert),
        (
            "clickhouse_outage_past_release_limit",
            clickhouse_outage_past_release_limit,
        ),
        ("rabbitmq_restarted", rabbitmq_restarted),
        (
            "consumer_killed_and_restarted",
            consumer_killed_and_restarted,
        ),
        ("sigterm_mid_batch", sigterm_mid_batch),
        ("queue_deleted", queue_deleted),
    ];
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let mut results = Vec::new();
    for (id, scenario) in scenarios {
        if filter.as_ref().is_some_and(|f| !id.contains(f.as_str())) {
            continue;
        }
        eprintln!("\n--- fault scenario: {id}");
        let started = Instant::now();
        let outcome = std::panic::catch_unwind(scenario);
        match outcome {
            Ok(counts) => {
                eprintln!(
                    "--- {id}: {} in {:?}",
                    if counts.passed() { "passed" } else { "FAILED" },
                    started.elapsed()
                );
                results.push(Ok(counts));
            }
            Err(_) => {
                eprintln!("--- {id}: FAILED (panicked)");
                results.push(Err(id));
            }
        }
    }
    print_table(&results);
    let passed = results
        .iter()
        .filter(|r| matches!(r, Ok(c) if c.passed()))
        .count();
    let failed = results.len() - passed;
    println!("faults: {passed} passed, {failed} failed");
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn print_table(results: &[Result<Counts, &str>]) {
    println!(
        "\n| scenario | valid | poison | stored once | stored twice | dead-lettered (twice) | duplicates allowed (rows, dead letters) | still queued | lost | result | notes |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for result in results {
        match result {
            Ok(c) => println!(
                "| {} | {} | {} | {} | {} | {} ({}){} | {}, {} | {} | {} | {} | {} |",
                c.name,
                c.valid,
                c.poison,
                c.stored_once,
                c.stored_twice,
                c.dead_lettered,
                c.dead_lettered_twice,
                if c.dead_letter_kinds_match {
                    ""
                } else {
                    ", kinds differ"
                },
                c.duplicates_allowed,
                c.dead_letter_duplicates_allowed(),
                c.still_queued,
                c.lost,
                match (c.passed(), c.exercised) {
                    (true, _) => "pass",
                    (false, false) => "FAIL (fault not exercised)",
                    (false, true) => "FAIL",
                },
                c.note
            ),
            Err(id) => println!("| {id} | | | | | | | | | FAIL (panicked) | |"),
        }
    }
}
