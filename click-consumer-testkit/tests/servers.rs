//! The testkit against the real servers (install them with `scripts/install-services.sh`).
//!
//! Timings are printed to stderr; see them with `cargo test -- --nocapture`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use click_consumer_testkit::{ClickHouse, RabbitMq, shared, unique_name};

/// Set in the re-executed test binary that plays the test process to be killed.
const CHILD_ENV: &str = "TESTKIT_SIGKILL_CHILD";
const KILL_TEST: &str = "servers_die_with_a_sigkilled_test_process";

fn accepts(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
}

/// A raw AMQP 0-9-1 handshake: protocol header in, connection.start frame out.
fn amqp_answers(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) else {
        return false;
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream.write_all(b"AMQP\x00\x00\x09\x01").unwrap();
    let mut frame_header = [0u8; 7];
    if stream.read_exact(&mut frame_header).is_err() {
        return false;
    }
    // Frame type 1 (method) on channel 0.
    frame_header[0] == 1 && frame_header[1..3] == [0, 0]
}

fn timed<T>(what: &str, f: impl FnOnce() -> T) -> T {
    let started = Instant::now();
    let value = f();
    eprintln!("timing: {what}: {:.2?}", started.elapsed());
    value
}

fn eventually(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    done()
}

#[test]
fn shared_clickhouse_answers_select_1() {
    let clickhouse = &shared().clickhouse;
    assert_eq!(clickhouse.query("SELECT 1"), "1\n");
    assert!(
        clickhouse
            .url()
            .ends_with(&clickhouse.http_port().to_string())
    );
    assert!(clickhouse.is_running());
}

#[test]
fn clickhouse_query_errors_carry_the_server_text() {
    let clickhouse = &shared().clickhouse;
    let failure = std::panic::catch_unwind(|| clickhouse.query("SELECT no_such_column"))
        .expect_err("a bad query must panic");
    let message = failure
        .downcast_ref::<String>()
        .expect("panic with a message");
    assert!(message.contains("no_such_column"), "{message}");
    assert!(message.contains("Code: "), "{message}");
}

#[test]
fn clickhouse_keeps_merge_tree_rows_across_stop_kill_and_restart() {
    let clickhouse = timed("ClickHouse start", ClickHouse::start);
    let table = unique_name("rows");
    clickhouse.query(&format!(
        "CREATE TABLE {table} (id UInt64, name String) ENGINE = MergeTree ORDER BY id"
    ));
    clickhouse.query(&format!(
        "INSERT INTO {table} VALUES (1, 'a'), (2, 'b'), (3, 'c')"
    ));
    let count = format!("SELECT count() FROM {table}");

    timed("ClickHouse stop (SIGTERM)", || clickhouse.stop());
    assert!(!clickhouse.is_running());
    assert!(
        !accepts(clickhouse.http_port()),
        "stopped server still listens"
    );
    timed("ClickHouse restart after stop", || clickhouse.restart());
    assert_eq!(clickhouse.query(&count), "3\n");

    clickhouse.query(&format!("INSERT INTO {table} VALUES (4, 'd')"));
    clickhouse.kill();
    assert!(!clickhouse.is_running());
    timed("ClickHouse restart after kill", || clickhouse.restart());
    assert_eq!(clickhouse.query(&count), "4\n");
}

#[test]
fn shared_rabbitmq_answers_amqp_and_rabbitmqctl() {
    let rabbitmq = &shared().rabbitmq;
    assert!(amqp_answers(rabbitmq.port()));
    assert_eq!(
        rabbitmq.amqp_url(),
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", rabbitmq.port())
    );
    let listing = timed("rabbitmqctl list_queues", || rabbitmq.ctl(&["list_queues"]));
    assert!(listing.contains("Listing queues"), "{listing}");
}

#[test]
fn rabbitmqctl_failures_panic_with_its_output() {
    let rabbitmq = &shared().rabbitmq;
    let failure = std::panic::catch_unwind(|| rabbitmq.ctl(&["no_such_command"]))
        .expect_err("an unknown command must panic");
    let message = failure
        .downcast_ref::<String>()
        .expect("panic with a message");
    assert!(message.contains("no_such_command"), "{message}");
}

/// Declares a durable queue holding one persistent message, confirmed by the broker,
/// through a real AMQP client (the broker's internal publish function of 3.10 is gone
/// in RabbitMQ 4).
fn declare_queue_with_persistent_message(rabbitmq: &RabbitMq, queue: &str) {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::{BasicProperties, Connection, ConnectionProperties, types::FieldTable};

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let connection = Connection::connect(&rabbitmq.amqp_url(), ConnectionProperties::default())
            .await
            .expect("AMQP connection");
        let channel = connection.create_channel().await.expect("channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        let durable = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel
            .queue_declare(queue.into(), durable, FieldTable::default())
            .await
            .expect("queue.declare");
        let confirm = channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b"persistent",
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("basic.publish")
            .await
            .expect("publisher confirm");
        assert!(confirm.is_ack(), "the broker did not confirm: {confirm:?}");
        connection.close(200, "done".into()).await.expect("close");
    });
}

fn ready_messages(rabbitmq: &RabbitMq, queue: &str) -> Option<String> {
    let listing = rabbitmq.ctl(&[
        "-q",
        "list_queues",
        "name",
        "messages_ready",
        "--no-table-headers",
    ]);
    listing.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        (fields.next() == Some(queue)).then(|| fields.next().unwrap_or_default().to_owned())
    })
}

#[test]
fn rabbitmq_restarts_on_the_same_port_with_its_data() {
    let rabbitmq = timed("RabbitMQ start", RabbitMq::start);
    let port = rabbitmq.port();
    let queue = unique_name("durable");
    declare_queue_with_persistent_message(&rabbitmq, &queue);
    assert_eq!(ready_messages(&rabbitmq, &queue).as_deref(), Some("1"));

    timed("RabbitMQ stop (SIGTERM)", || rabbitmq.stop());
    assert!(!rabbitmq.is_running());
    assert!(!accepts(port), "stopped broker still listens");
    timed("RabbitMQ restart after stop", || rabbitmq.restart());
    assert_eq!(rabbitmq.port(), port);
    assert!(amqp_answers(port));
    assert_eq!(ready_messages(&rabbitmq, &queue).as_deref(), Some("1"));

    rabbitmq.kill();
    assert!(!rabbitmq.is_running());
    timed("RabbitMQ restart after kill", || rabbitmq.restart());
    assert!(amqp_answers(port));
    assert_eq!(ready_messages(&rabbitmq, &queue).as_deref(), Some("1"));
}

#[test]
fn dropping_a_server_kills_it_and_removes_its_directory() {
    let clickhouse = ClickHouse::start();
    let (port, dir) = (clickhouse.http_port(), clickhouse.dir().to_path_buf());
    drop(clickhouse);
    assert!(!accepts(port));
    assert!(!dir.exists(), "{} is left behind", dir.display());
}

/// What the killed child reports about its shared servers.
struct ChildServers {
    ports: Vec<u16>,
    dirs: Vec<PathBuf>,
}

fn parse_child_report(line: &str) -> ChildServers {
    // libtest may have printed "test NAME ... " on the same line first.
    let report = &line[line.find("SERVERS ").expect("a report line")..];
    let fields: Vec<&str> = report.split_whitespace().skip(1).collect();
    let [amqp, epmd, http, rabbit_dir, clickhouse_dir] = fields[..] else {
        panic!("bad child report: {line}");
    };
    ChildServers {
        ports: [amqp, epmd, http]
            .map(|port| port.parse().unwrap())
            .to_vec(),
        dirs: vec![rabbit_dir.into(), clickhouse_dir.into()],
    }
}

/// The child side: start the shared servers, report them, then wait to be killed.
fn run_as_doomed_child() {
    let servers = shared();
    // The broker's private epmd port is only shown by its Debug output.
    let debug = format!("{:?}", servers.rabbitmq);
    let epmd_port = debug
        .split("epmd_port: ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .expect("epmd_port in the Debug output");
    println!(
        "\nSERVERS {} {epmd_port} {} {} {}",
        servers.rabbitmq.port(),
        servers.clickhouse.http_port(),
        servers.rabbitmq.dir().display(),
        servers.clickhouse.dir().display()
    );
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(120));
    panic!("the parent test did not kill this process");
}

#[test]
fn servers_die_with_a_sigkilled_test_process() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return run_as_doomed_child();
    }
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", KILL_TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, "1")
        .stdout(Stdio::piped())
        .spawn()
        .expect("re-run the test binary");
    let report = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .find(|line| line.contains("SERVERS "))
        .expect("the child exited without starting its servers");
    let servers = parse_child_report(&report);
    for &port in &servers.ports {
        assert!(accepts(port), "the child's server on port {port} is not up");
    }

    child.kill().unwrap(); // SIGKILL: no destructor, no atexit, nothing runs in the child.
    child.wait().unwrap();

    let started = Instant::now();
    for &port in &servers.ports {
        assert!(
            eventually(Duration::from_secs(5), || !accepts(port)),
            "a server of the killed process still listens on port {port}"
        );
    }
    eprintln!(
        "timing: servers gone after SIGKILL: {:.2?}",
        started.elapsed()
    );
    for dir in &servers.dirs {
        assert!(
            eventually(Duration::from_secs(10), || !Path::new(dir).exists()),
            "{} is left behind",
            dir.display()
        );
    }
}
