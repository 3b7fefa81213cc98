//! The binary's HTTP listener under clients that misbehave, and its formats: a slow-loris
//! client is cut off, an idle kept-alive connection is closed, a flood of connections
//! beyond the cap does not stop `/health` once it is over; `/metrics` negotiates its
//! format on `Accept` and every path answers HEAD.

mod support;

use std::{
    io::{Read, Write},
    net::TcpStream,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use click_consumer_testkit::shared;
use support::{Service, Stack, wait_until};

/// The listener's header-read (and keep-alive idle) timeout, `serve::HEADER_READ_TIMEOUT`.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Its connection cap, `serve::MAX_CONNECTIONS`.
const MAX_CONNECTIONS: usize = 64;

fn start(setup: &Stack<'_>) -> Service {
    let service = setup.spawn(&[("LOG_LEVEL", "warn")]);
    wait_until("the listener", Duration::from_secs(30), || {
        TcpStream::connect(("127.0.0.1", setup.metrics_port)).is_ok()
    });
    service
}

fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).expect("connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream
}

/// Reads until the server closes the connection; how long that took.
fn time_until_closed(stream: &mut TcpStream, started: Instant) -> Duration {
    let mut buf = [0; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return started.elapsed(),
            Ok(_) => {}
        }
    }
}

/// One request on a fresh connection: the status line, the headers and the body.
fn request(port: u16, method: &str, path: &str, accept: Option<&str>) -> (String, String) {
    let mut stream = connect(port);
    let accept = accept.map_or(String::new(), |a| format!("Accept: {a}\r\n"));
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: x\r\n{accept}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    let (head, body) = reply.split_once("\r\n\r\n").expect("a complete response");
    (head.to_ascii_lowercase(), body.to_owned())
}

#[test]
fn a_slow_loris_client_is_cut_off() {
    let servers = shared();
    let setup = Stack::new(&servers.rabbitmq, &servers.clickhouse, "loris");
    let _service = start(&setup);
    let mut stream = connect(setup.metrics_port);
    let started = Instant::now();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    // One header byte every 500 ms, never the blank line that ends the headers.
    let trickle = {
        let mut stream = stream.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..60 {
                if stream.write_all(b"X").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let closed_after = time_until_closed(&mut stream, started);
    assert!(
        closed_after >= HEADER_TIMEOUT - Duration::from_millis(500)
            && closed_after < HEADER_TIMEOUT + Duration::from_secs(3),
        "a client that never finishes its headers is cut off after about {HEADER_TIMEOUT:?}, was after {closed_after:?}"
    );
    trickle.join().unwrap();
    let (head, _) = request(setup.metrics_port, "GET", "/health", None);
    assert!(head.starts_with("http/1.1 200"), "{head}");
    eprintln!("slow-loris client cut off after {closed_after:?}");
}

#[test]
fn an_idle_keep_alive_connection_is_closed() {
    let servers = shared();
    let setup = Stack::new(&servers.rabbitmq, &servers.clickhouse, "idle");
    let _service = start(&setup);
    let mut stream = connect(setup.metrics_port);
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut reply = [0; 1024];
    let n = stream.read(&mut reply).unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]).into_owned();
    assert!(
        reply.starts_with("HTTP/1.1 200") && reply.ends_with("ok\n"),
        "{reply}"
    );
    let started = Instant::now();
    let closed_after = time_until_closed(&mut stream, started);
    assert!(
        closed_after < HEADER_TIMEOUT + Duration::from_secs(3),
        "an idle kept-alive connection is closed after about {HEADER_TIMEOUT:?}, was after {closed_after:?}"
    );
    eprintln!("idle keep-alive connection closed after {closed_after:?}");
}

#[test]
fn connections_beyond_the_cap_do_not_stop_health_once_closed() {
    let servers = shared();
    let setup = Stack::new(&servers.rabbitmq, &servers.clickhouse, "cap");
    let _service = start(&setup);
    let flood: Vec<TcpStream> = (0..MAX_CONNECTIONS + 16)
        .map(|_| connect(setup.metrics_port))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    // While idle connections hold every slot, a new client waits for one (until they are
    // cut off), it is neither refused nor served beyond the cap.
    let started = Instant::now();
    let (head, _) = request(setup.metrics_port, "GET", "/health", None);
    let waited = started.elapsed();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(
        waited >= HEADER_TIMEOUT - Duration::from_secs(1)
            && waited < HEADER_TIMEOUT * 2 + Duration::from_secs(3),
        "with {MAX_CONNECTIONS} idle connections open, /health waits for the idle ones to be cut off; waited {waited:?}"
    );
    drop(flood);
    // A second flood, closed by the clients themselves.
    let flood: Vec<TcpStream> = (0..MAX_CONNECTIONS * 3)
        .map(|_| connect(setup.metrics_port))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    drop(flood);
    let started = Instant::now();
    let (head, body) = request(setup.metrics_port, "GET", "/health", None);
    let answered = started.elapsed();
    assert!(
        head.starts_with("http/1.1 200") && body == "ok\n",
        "{head}\n{body}"
    );
    assert!(
        answered < Duration::from_secs(2),
        "/health answers at once after the flood closed, took {answered:?}"
    );
    // The listener still serves many clients in a row.
    for _ in 0..MAX_CONNECTIONS * 2 {
        let (head, _) = request(setup.metrics_port, "GET", "/health", None);
        assert!(head.starts_with("http/1.1 200"), "{head}");
    }
    eprintln!(
        "beyond the cap /health waited {waited:?}; {} connections opened and closed, then /health answered in {answered:?}",
        MAX_CONNECTIONS * 3
    );
}

#[test]
fn metrics_negotiates_its_format_and_every_path_answers_head() {
    let servers = shared();
    let setup = Stack::new(&servers.rabbitmq, &servers.clickhouse, "fmt");
    let _service = start(&setup);
    let port = setup.metrics_port;
    wait_until("ready", Duration::from_secs(30), || {
        request(port, "GET", "/ready", None)
            .0
            .starts_with("http/1.1 200")
    });
    let classic = "content-type: text/plain; version=0.0.4; charset=utf-8";
    let openmetrics = "content-type: application/openmetrics-text; version=1.0.0; charset=utf-8";
    let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    for (accept, content_type) in [
        (None, classic),
        (Some("text/plain"), classic),
        (Some("*/*"), classic),
        (Some("application/openmetrics-text"), openmetrics),
        (Some(prometheus), openmetrics),
    ] {
        let (head, body) = request(port, "GET", "/metrics", accept);
        assert!(
            head.starts_with("http/1.1 200") && head.contains(content_type),
            "Accept {accept:?}: expected {content_type}, got\n{head}"
        );
        let eof = body.ends_with("# EOF\n");
        assert_eq!(
            eof,
            content_type == openmetrics,
            "Accept {accept:?}: `# EOF` only in OpenMetrics"
        );
        assert!(
            body.contains("# HELP click_consumer_messages_received")
                && body.contains("\nclick_consumer_messages_received_total 0\n"),
            "{body}"
        );
    }
    for path in ["/metrics", "/health", "/ready"] {
        let (get_head, get_body) = request(port, "GET", path, None);
        let (head, body) = request(port, "HEAD", path, None);
        assert!(head.starts_with("http/1.1 200"), "HEAD {path}: {head}");
        assert!(body.is_empty(), "HEAD {path} has no body, got {body:?}");
        let header = |head: &str, name: &str| {
            head.lines()
                .find(|l| l.starts_with(name))
                .map(str::to_owned)
                .unwrap_or_else(|| panic!("no {name} in {head}"))
        };
        assert_eq!(
            header(&head, "content-type"),
            header(&get_head, "content-type"),
            "{path}"
        );
        let length: usize = header(&head, "content-length")["content-length: ".len()..]
            .parse()
            .unwrap();
        // /metrics changes between the two requests only in its figures.
        assert!(
            length.abs_diff(get_body.len()) < 64,
            "HEAD {path}: Content-Length {length}, GET body {}",
            get_body.len()
        );
    }
    let (head, _) = request(port, "HEAD", "/nowhere", None);
    assert!(head.starts_with("http/1.1 404"), "{head}");
}

/// CPU time (user + system) of a process so far, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    let per_second = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(100);
    Duration::from_millis(ticks * 1000 / per_second)
}

/// Out of file descriptors (EMFILE), the listener pauses between failed accepts instead
/// of spinning, says so once at warn, and serves again once descriptors are free.
#[test]
fn out_of_file_descriptors_the_listener_does_not_spin() {
    let port = support::free_port();
    let log_path = std::env::temp_dir().join(click_consumer_testkit::unique_name("emfile"));
    let log = std::fs::File::create(&log_path).unwrap();
    // No servers: the listener serves while start-up waits for ClickHouse, with a
    // descriptor limit that a few connections exhaust.
    let child = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -n 32 && exec '{}'",
            env!("CARGO_BIN_EXE_click-consumer")
        ))
        .env_clear()
        .env("CLICKHOUSE_HOST", "127.0.0.1")
        .env("CLICKHOUSE_PORT", support::free_port().to_string())
        .env("STARTUP_TIMEOUT_MS", "120000")
        .env("RETRY_INITIAL_BACKOFF_MS", "5000")
        .env("RETRY_MAX_BACKOFF_MS", "5000")
        .env("METRICS_ADDR", format!("127.0.0.1:{port}"))
        .env("LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let service = Service(child);
    wait_until("the listener", Duration::from_secs(30), || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    // Connections held open until the binary has no descriptor left for the next one.
    let held: Vec<TcpStream> = (0..40).map(|_| connect(port)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let pid = service.0.id();
    let before = cpu_time(pid);
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_time(pid) - before;
    let log = std::fs::read_to_string(&log_path).unwrap();
    let warnings = log.matches("cannot accept a connection").count();
    assert!(
        spent < Duration::from_millis(200),
        "2 s out of descriptors cost {spent:?} of CPU: a busy loop"
    );
    assert!(
        log.contains("Too many open files") && warnings == 1,
        "the failed accepts are logged once at warn (got {warnings}):\n{log}"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    let (head, body) = request(port, "GET", "/health", None);
    assert!(
        head.starts_with("http/1.1 200") && body == "ok\n",
        "{head}\n{body}"
    );
    eprintln!("out of descriptors for 2 s: {spent:?} of CPU, one warning; /health answers after");
}
