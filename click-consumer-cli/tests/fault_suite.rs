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
    sync::atomic::{AtomicUsize, Ordering},
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
/// Messages a consumer can hold unacknowledged at most: the prefetch window (2 x
/// BATCH_SIZE), plus, while its first consumer drains, that consumer's window (sized for
/// messages of MAX_MESSAGE_BYTES: 64 MiB / 1 MiB).
const IN_FLIGHT: u64 = 2 * BATCH + 64;
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
    stream_of(tag, VALID)
}

/// [`stream`] with `valid_count` valid clicks.
fn stream_of(tag: &str, valid_count: usize) -> Vec<Message> {
    let mut messages = Vec::new();
    let mut valid = 0;
    let mut poison = 0;
    while valid < valid_count {
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
    /// The most dead letters a fault may duplicate in this scenario.
    dead_letter_window: u64,
    /// Copies of a message that the same consumer had copied already (empty bodies,
    /// which cannot be told apart, left out).
    dead_lettered_twice_by_one: u64,
    /// Every duplicate dead letter must come from two consumers (the one killed and its
    /// successor): none may be copied twice by one consumer.
    duplicates_need_two_consumers: bool,
    /// Every kind has at least as many dead letters as poison messages of that kind.
    dead_letter_kinds_match: bool,
    /// The fault was really exercised (e.g. INSERTs failed while ClickHouse was down).
    exercised: bool,
    still_queued: u64,
    lost: u64,
    duplicates_allowed: u64,
    /// A check made while the fault lasted that failed (`None`: all held).
    during_fault: Option<String>,
    /// A consumer was restarted while dead letters were unconfirmed: copies it had sent
    /// may still reach the dead-letter queue after its originals were copied again.
    restarted_with_dead_letters_pending: bool,
    note: String,
}

impl Counts {
    fn dead_letter_duplicates_allowed(&self) -> u64 {
        if self.duplicates_allowed > 0 || self.restarted_with_dead_letters_pending {
            self.dead_letter_window
        } else {
            0
        }
    }

    fn passed(&self) -> bool {
        self.lost == 0
            && self.exercised
            && self.during_fault.is_none()
            && self.still_queued == 0
            && self.dead_letter_kinds_match
            && self.stored_twice <= self.duplicates_allowed
            && self.dead_lettered_twice <= self.dead_letter_duplicates_allowed()
            && !(self.duplicates_need_two_consumers && self.dead_lettered_twice_by_one > 0)
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
        Self::with_stream(name, tag, rabbitmq, clickhouse, stream(tag))
    }

    fn with_stream(
        name: &'static str,
        tag: &str,
        rabbitmq: &'a RabbitMq,
        clickhouse: &'a ClickHouse,
        messages: Vec<Message>,
    ) -> Self {
        let stack = Stack::new(rabbitmq, clickhouse, tag);
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let publisher = stack.publisher(&runtime);
        Run {
            name,
            stack,
            messages,
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
        self.finish_with_deleted(consumer, duplicates_allowed, note, 0)
    }

    /// [`Run::finish`] when `deleted` dead letters were deleted with the dead-letter
    /// queue: they count as dead-lettered (their originals were rightly acknowledged), but
    /// their kinds are unknown, so each kind needs only as many copies as are left.
    fn finish_with_deleted(
        self,
        consumer: Option<Service>,
        duplicates_allowed: u64,
        note: String,
        deleted: u64,
    ) -> Counts {
        let mut consumer = consumer.unwrap_or_else(|| self.stack.spawn(&[]));
        let valid = self.messages.iter().filter(|m| m.poison.is_none()).count() as u64;
        let poison = self.messages.len() as u64 - valid;
        let drained = poll(Duration::from_secs(90), || {
            let dead = self
                .stack
                .queue_counts(&self.stack.dead_letter_queue())
                .map_or(0, |q| q.0);
            self.stack.rows().1 == valid && self.stack.queue() == (0, 0) && dead + deleted >= poison
        });
        let status = consumer.stop();
        let (rows, distinct) = self.stack.rows();
        let (ready, unacked) = self.stack.queue();
        let (kinds, dead_lettered_twice_by_one) = self.stack.take_dead_letters(&self.runtime);
        let mut expected: BTreeMap<String, u64> = BTreeMap::new();
        for kind in self.messages.iter().filter_map(|m| m.poison) {
            *expected.entry(kind.to_owned()).or_default() += 1;
        }
        let dead_lettered: u64 = kinds.values().sum::<u64>() + deleted;
        let kinds_match = if deleted == 0 {
            expected
                .iter()
                .all(|(kind, n)| kinds.get(kind).is_some_and(|got| got >= n))
        } else {
            // Every kind has at least its count less what may have been deleted.
            expected
                .iter()
                .all(|(kind, n)| kinds.get(kind).copied().unwrap_or(0) + deleted >= *n)
        } && kinds.keys().all(|kind| expected.contains_key(kind));
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
            dead_letter_window: DEAD_LETTER_WINDOW,
            dead_lettered_twice_by_one,
            duplicates_need_two_consumers: false,
            dead_letter_kinds_match: kinds_match,
            exercised: true,
            still_queued: ready + unacked,
            lost: valid.saturating_sub(distinct) + poison.saturating_sub(dead_lettered),
            duplicates_allowed,
            during_fault: None,
            restarted_with_dead_letters_pending: false,
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
    // Poison waits unacknowledged for its copy's confirm while the valid messages around
    // it are acked at once, so the messages in flight at the kill can hold more than one
    // poison in 20 (seen: 64 under load, 46 before the byte budget): any of them may be
    // copied again by the successor. What must hold is that each was copied once by the
    // killed consumer and once by its successor, never twice by one.
    counts.dead_letter_window = IN_FLIGHT;
    counts.duplicates_need_two_consumers = true;
    counts.note.push_str(&format!(
        "; {} dead letters copied twice by one consumer",
        counts.dead_lettered_twice_by_one
    ));
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

/// Valid clicks in the resource-alarm scenarios: with 5% poison, 5,000 messages.
const ALARM_VALID: usize = 4750;
/// How long each resource alarm lasts. Longer than the dead-letter outbox's confirm
/// timeout (30 s), so a round of dead letters that a blocked connection holds back is
/// seen to wait (not dropped, not published elsewhere) past that timeout.
const ALARM_HOLD: Duration = Duration::from_secs(35);
const BLOCKED_GAUGE: &str = "click_consumer_broker_connection_state{state=\"blocked\"}";
const DEAD_LETTERED: &str = "click_consumer_messages_dead_lettered_total";

/// A RabbitMQ resource alarm a scenario raises and clears with rabbitmqctl.
struct Alarm {
    /// The resource as `rabbit_alarm:get_alarms()` names it (`memory`, `disk`).
    resource: &'static str,
    raise: &'static [&'static str],
    clear: &'static [&'static str],
}

/// `(ready, unacknowledged)` of every queue, from one `rabbitmqctl list_queues`.
fn queue_table(rabbitmq: &RabbitMq) -> BTreeMap<String, (u64, u64)> {
    let out = rabbitmq.ctl(&[
        "-q",
        "list_queues",
        "--no-table-headers",
        "name",
        "messages_ready",
        "messages_unacknowledged",
    ]);
    out.lines()
        .filter_map(
            |line| match line.split_whitespace().collect::<Vec<_>>()[..] {
                [name, ready, unacked] => Some((
                    name.to_owned(),
                    (ready.parse().ok()?, unacked.parse().ok()?),
                )),
                _ => None,
            },
        )
        .collect()
}

/// The copies in the dead-letter queue per `x-consumer-tag`, read without taking them
/// (they return to the queue when the reading connection closes).
fn dead_letters_by_consumer(run: &Run<'_>) -> BTreeMap<String, u64> {
    run.runtime.block_on(async {
        let connection = lapin::Connection::connect(
            &run.stack.rabbitmq.amqp_url(),
            lapin::ConnectionProperties::default(),
        )
        .await
        .expect("connect");
        let channel = connection.create_channel().await.expect("channel");
        let queue = run.stack.dead_letter_queue();
        let mut tags = BTreeMap::new();
        while let Some(message) = channel
            .basic_get(
                queue.as_str().into(),
                lapin::options::BasicGetOptions::default(),
            )
            .await
            .expect("basic.get")
        {
            let tag = message
                .delivery
                .properties
                .headers()
                .as_ref()
                .and_then(|h| match h.inner().get("x-consumer-tag") {
                    Some(lapin::types::AMQPValue::LongString(s)) => Some(s.to_string()),
                    _ => None,
                })
                .unwrap_or_else(|| "missing x-consumer-tag".to_owned());
            *tags.entry(tag).or_default() += 1;
        }
        let _ = connection.close(200, "done".into()).await;
        tags
    })
}

/// The node's alarms, e.g. `[{{resource_limit,memory,'rabbit@localhost'},[]}]`.
fn alarms(rabbitmq: &RabbitMq) -> String {
    rabbitmq.ctl(&["-q", "eval", "rabbit_alarm:get_alarms()."])
}

fn memory_alarm() -> Counts {
    resource_alarm(
        "RabbitMQ memory alarm (35 s) with a backlog",
        "memalarm",
        &Alarm {
            resource: "memory",
            raise: &["set_vm_memory_high_watermark", "0.0000001"],
            clear: &["set_vm_memory_high_watermark", "0.4"],
        },
    )
}

fn disk_alarm() -> Counts {
    resource_alarm(
        "RabbitMQ disk alarm (35 s) with a backlog",
        "diskalarm",
        &Alarm {
            resource: "disk",
            // 1 EB free required: always short; then back to the default 50 MB.
            raise: &["set_disk_free_limit", "1000000000000000000"],
            clear: &["set_disk_free_limit", "50000000"],
        },
    )
}

/// A backlog (5,000 messages, 5% poison) published, then a resource alarm raised (it
/// blocks every connection that publishes), then the consumer started. While the alarm
/// lasts every valid click must be stored and acknowledged, the poison held unacked
/// with nothing reaching the dead-letter queue, and the gauge must say blocked; once it
/// clears, every poison message must be dead-lettered.
fn resource_alarm(name: &'static str, tag: &str, alarm: &Alarm) -> Counts {
    let rabbitmq = RabbitMq::start();
    let run = Run::with_stream(
        name,
        tag,
        &rabbitmq,
        &shared().clickhouse,
        stream_of(tag, ALARM_VALID),
    );
    let valid = run.messages.iter().filter(|m| m.poison.is_none()).count() as u64;
    let poison = run.messages.len() as u64 - valid;
    run.publish(0..run.messages.len()); // a publisher is blocked during the alarm
    rabbitmq.ctl(alarm.raise);
    wait_until(
        &format!("the {} alarm", alarm.resource),
        Duration::from_secs(10),
        || alarms(&rabbitmq).contains(alarm.resource),
    );
    let raised = Instant::now();
    let mut consumer = run.stack.spawn(&[]);
    let dead_letter_queue = run.stack.dead_letter_queue();
    let mut problems: Vec<String> = Vec::new();
    let mut problem = |p: String| {
        if !problems.contains(&p) {
            eprintln!("{name}: {p}");
            problems.push(p);
        }
    };
    // Every valid click stored and acked, every poison message received and held.
    let acked_all = poll(ALARM_HOLD, || {
        run.stack.rows() == (valid, valid) && run.stack.queue() == (0, poison)
    });
    let acked_after = raised.elapsed();
    if !acked_all {
        let (rows, distinct) = run.stack.rows();
        let (ready, unacked) = run.stack.queue();
        problem(format!(
            "after {acked_after:.0?}: {rows} rows ({distinct} distinct) of {valid}, queue {ready} ready, {unacked} unacked (want 0, {poison})"
        ));
    }
    // Then, until the alarm has lasted ALARM_HOLD, the same must hold every second.
    let mut samples = 0;
    loop {
        samples += 1;
        let (rows, distinct) = run.stack.rows();
        let queues = queue_table(&rabbitmq);
        let (ready, unacked) = queues[&run.stack.queue];
        let dead = queues.get(&dead_letter_queue).copied();
        let received = run.stack.metric("click_consumer_messages_received_total");
        let poison_received = received.saturating_sub(valid);
        let blocked = run.stack.metric(BLOCKED_GAUGE);
        let confirmed = run.stack.metric(DEAD_LETTERED);
        let at = raised.elapsed();
        if (rows, distinct) != (valid, valid) {
            problem(format!(
                "at {at:.0?}: {rows} rows, {distinct} distinct, want {valid}"
            ));
        }
        if ready != 0 || unacked != poison_received || poison_received != poison {
            problem(format!(
                "at {at:.0?}: queue {ready} ready, {unacked} unacked; {poison_received} poison received of {poison}"
            ));
        }
        if dead != Some((0, 0)) || confirmed != 0 {
            problem(format!(
                "at {at:.0?}: dead-letter queue {dead:?}, {confirmed} copies confirmed while blocked"
            ));
        }
        if blocked != 1 {
            problem(format!("at {at:.0?}: {BLOCKED_GAUGE} = {blocked}"));
        }
        if raised.elapsed() >= ALARM_HOLD {
            break;
        }
        thread::sleep(Duration::from_secs(1));
    }
    // A restart while the alarm lasts: the shutdown must not hang on the blocked
    // dead-letter connection (the unconfirmed poison goes back to the queue), and the
    // next consumer must hold the poison again, blocked, without dead-lettering it.
    let first_consumer = format!("-{}", consumer.0.id());
    consumer.sigterm();
    let stopping = Instant::now();
    poll(Duration::from_secs(10), || {
        consumer.0.try_wait().unwrap().is_some()
    });
    let stop_took = stopping.elapsed();
    match consumer.0.try_wait().unwrap() {
        // Nothing to flush: the shutdown must not wait for dead letters that cannot be
        // confirmed while the alarm lasts (it took 8.7 s, most of its 8 s budget).
        Some(status) if status.success() && stop_took < Duration::from_secs(3) => {}
        other => problem(format!(
            "SIGTERM during the alarm: {other:?} after {stop_took:.1?} (want a clean exit within 3 s)"
        )),
    }
    let restarted = Instant::now();
    let consumer = run.stack.spawn(&[]);
    let held_again = poll(Duration::from_secs(30), || {
        let queues = queue_table(&rabbitmq);
        queues[&run.stack.queue] == (0, poison)
            && queues.get(&dead_letter_queue) == Some(&(0, 0))
            && run.stack.metric(BLOCKED_GAUGE) == 1
    });
    let held_again_after = restarted.elapsed();
    if !held_again {
        problem(format!(
            "after a restart during the alarm: queue {:?}, dead-letter queue {:?}, blocked gauge {}",
            run.stack.queue(),
            run.stack.queue_counts(&dead_letter_queue),
            run.stack.metric(BLOCKED_GAUGE)
        ));
    }
    if run.stack.rows() != (valid, valid) {
        problem(format!(
            "after a restart during the alarm: {:?} rows",
            run.stack.rows()
        ));
    }
    if !alarms(&rabbitmq).contains(alarm.resource) {
        problem(format!("the {} alarm cleared by itself", alarm.resource));
    }
    let held = raised.elapsed();
    let cleared = Instant::now();
    rabbitmq.ctl(alarm.clear);
    wait_until(
        &format!("the {} alarm to clear", alarm.resource),
        Duration::from_secs(10),
        || !alarms(&rabbitmq).contains(alarm.resource),
    );
    let dead_lettered_all = poll(Duration::from_secs(60), || {
        run.stack.metric(DEAD_LETTERED) >= poison
    });
    let dead_letter_wait = cleared.elapsed();
    let unblocked = run.stack.metric(BLOCKED_GAUGE) == 0;
    if !dead_lettered_all {
        problem(format!(
            "dead letters not all confirmed {dead_letter_wait:.0?} after the alarm cleared"
        ));
    }
    if !unblocked {
        problem("the gauge still says blocked after the alarm cleared".to_owned());
    }
    // Which consumer sent each copy: the running one must have sent exactly one per
    // poison message; the stopped one's copies (stuck in its blocked socket) are the
    // only duplicates at-least-once allows here.
    thread::sleep(Duration::from_secs(2));
    let by_consumer = dead_letters_by_consumer(&run);
    let from_stopped: u64 = by_consumer
        .iter()
        .filter(|(tag, _)| tag.ends_with(&first_consumer))
        .map(|(_, n)| n)
        .sum();
    let from_running = by_consumer.values().sum::<u64>() - from_stopped;
    if from_running != poison {
        problem(format!(
            "the running consumer sent {from_running} copies for {poison} poison messages ({by_consumer:?})"
        ));
    }
    let retries = run.stack.metric("click_consumer_dead_letter_retries_total");
    let reconnects = run.stack.metric("click_consumer_broker_reconnects_total");
    let acked = if acked_all {
        format!("all {valid} valid stored once and acked {acked_after:.1?} into it")
    } else {
        format!("valid NOT all stored and acked within {ALARM_HOLD:?}")
    };
    let dead_lettered = if dead_lettered_all {
        format!("all {poison} dead letters confirmed {dead_letter_wait:.1?} after the clear")
    } else {
        format!("dead letters NOT all confirmed {dead_letter_wait:.0?} after the clear")
    };
    let mut counts = run.finish(
        Some(consumer),
        0,
        format!(
            "alarm held {held:.0?}, {samples} checks while held; {acked}; restarted during the alarm (stopped in {stop_took:.1?}, poison held again {held_again_after:.1?} later); {dead_lettered}, {from_running} by the running consumer, {from_stopped} sent by the stopped one before it stopped; {retries} dead-letter retries, {reconnects} reconnects"
        ),
    );
    // Copies the first consumer had sent when it stopped reach the dead-letter queue when
    // the alarm clears (RabbitMQ reads a blocked connection's socket again), after their
    // originals came back and were copied again: at-least-once allows those.
    counts.restarted_with_dead_letters_pending = true;
    if !problems.is_empty() {
        counts.during_fault = Some(problems.join("; "));
    }
    counts
}

/// The dead-letter queue deleted while poison flows: copies published to it after that
/// come back (mandatory) and their originals must return to the queue, not be
/// acknowledged; the consumer declares the queue again and they are dead-lettered.
fn dead_letter_queue_deleted() -> Counts {
    let rabbitmq = RabbitMq::start();
    let run = Run::new(
        "dead-letter queue deleted 3 times mid-stream",
        "dlqdel",
        &rabbitmq,
        &shared().clickhouse,
    );
    let consumer = run.stack.spawn(&[]);
    let dead_letter_queue = run.stack.dead_letter_queue();
    let n = run.messages.len();
    let (first, second) = (n / 3, 2 * n / 3);
    run.publish(0..first);
    let poison_first = run.messages[..first]
        .iter()
        .filter(|m| m.poison.is_some())
        .count() as u64;
    wait_until(
        "the first chunk's dead letters",
        Duration::from_secs(60),
        || run.stack.metric(DEAD_LETTERED) >= poison_first,
    );
    // The middle chunk is published at a pace (20 messages every 50 ms) so that its
    // poison is still flowing while the dead-letter queue is deleted, three times: each
    // time once it exists again and more copies have been confirmed into it. It goes in
    // four parts, part i only after the i-th deletion, so that poison (one in 20, some
    // 13 per part) follows every deletion however slow the machine: the queue is declared
    // again only when a copy comes back, and the wait below needs copies after that.
    let mut deletions: Vec<u64> = Vec::new(); // messages deleted with the queue
    let deleted_so_far = AtomicUsize::new(0);
    thread::scope(|scope| {
        let publishing = scope.spawn(|| {
            let part = (second - first).div_ceil(4);
            for (i, part_start) in (first..second).step_by(part).enumerate() {
                // Bounded, so that a failed wait below fails the scenario, not hangs it.
                let gate = Instant::now() + Duration::from_secs(180);
                while deleted_so_far.load(Ordering::SeqCst) < i && Instant::now() < gate {
                    thread::sleep(Duration::from_millis(10));
                }
                let part_end = (part_start + part).min(second);
                for start in (part_start..part_end).step_by(20) {
                    run.publish(start..(start + 20).min(part_end));
                    thread::sleep(Duration::from_millis(50));
                }
            }
        });
        let mut confirmed = poison_first;
        for _ in 0..3 {
            wait_until(
                "the dead-letter queue, and more dead letters in it",
                Duration::from_secs(60),
                || {
                    run.stack.queue_counts(&dead_letter_queue).is_some()
                        && run.stack.metric(DEAD_LETTERED) >= confirmed + 2
                },
            );
            let out = rabbitmq.ctl(&["delete_queue", &dead_letter_queue]);
            deletions.push(deleted_count(&out));
            confirmed = run.stack.metric(DEAD_LETTERED);
            deleted_so_far.fetch_add(1, Ordering::SeqCst);
        }
        publishing.join().expect("the middle chunk is published");
    });
    run.publish(second..n);
    wait_until(
        "the dead-letter queue declared again",
        Duration::from_secs(60),
        || run.stack.queue_counts(&dead_letter_queue).is_some(),
    );
    let refused = run
        .stack
        .metric("click_consumer_dead_letters_refused_total");
    let redeclared = run
        .stack
        .metric("click_consumer_topology_redeclarations_total");
    let reconnects = run.stack.metric("click_consumer_broker_reconnects_total");
    let deleted: u64 = deletions.iter().sum();
    // RabbitMQ confirms a copy routed to a queue that it deletes before enqueuing the
    // copy ("Deleted queue is a special case. Do not nack" in rabbit_channel), so such a
    // copy is neither in the queue nor in delete_queue's count, and its original is
    // rightly acknowledged. Count them: copies the broker confirmed (the consumer's
    // counter) that are neither left nor deleted. At most one per deletion is allowed.
    let poison = run.messages.iter().filter(|m| m.poison.is_some()).count() as u64;
    poll(Duration::from_secs(90), || {
        run.stack.queue() == (0, 0) && run.stack.metric(DEAD_LETTERED) >= poison
    });
    let confirmed = run.stack.metric(DEAD_LETTERED);
    let left = run
        .stack
        .queue_counts(&dead_letter_queue)
        .map_or(0, |(ready, _)| ready);
    let vanished = confirmed.saturating_sub(left + deleted);
    let mut counts = run.finish_with_deleted(
        Some(consumer),
        0,
        format!(
            "deleted with {deletions:?} dead letters; {vanished} confirmed by RabbitMQ as their queue was deleted; {refused} copies returned, {redeclared} redeclarations, {reconnects} reconnects"
        ),
        deleted + vanished.min(deletions.len() as u64),
    );
    if vanished > deletions.len() as u64 {
        counts.during_fault = Some(format!(
            "{vanished} confirmed copies neither left nor deleted with the queue"
        ));
    }
    // Copies were returned, so the path that must not ack their originals ran.
    counts.exercised = refused > 0 && deletions.len() == 3;
    counts
}

/// The message count of `rabbitmqctl delete_queue`'s "Queue was successfully deleted
/// with N messages".
fn deleted_count(out: &str) -> u64 {
    out.lines()
        .find_map(|line| {
            let rest = line.split("deleted with ").nth(1)?;
            rest.split_whitespace().next()?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no message count in delete_queue's output: {out}"))
}

fn main() -> ExitCode {
    type Scenario = (&'static str, fn() -> Counts);
    let scenarios: [Scenario; 10] = [
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
        ("memory_alarm", memory_alarm),
        ("disk_alarm", disk_alarm),
        ("dead_letter_queue_deleted", dead_letter_queue_deleted),
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
                match (c.passed(), c.exercised, &c.during_fault) {
                    (true, _, _) => "pass".to_owned(),
                    (false, false, _) => "FAIL (fault not exercised)".to_owned(),
                    (false, true, Some(check)) => format!("FAIL (during the fault: {check})"),
                    (false, true, None) => "FAIL".to_owned(),
                },
                c.note
            ),
            Err(id) => println!("| {id} | | | | | | | | | FAIL (panicked) | |"),
        }
    }
}
