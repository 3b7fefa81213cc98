//! `local-stack [--demo-rate N] -- <click-consumer>`: starts a private RabbitMQ and
//! ClickHouse on free loopback ports, runs the consumer (and a demo publisher) against
//! them, and stops everything when the consumer exits. `scripts/run-local.sh` uses it.

use std::{
    process::{Child, Command, ExitCode},
    thread,
    time::Duration,
};

use click_consumer_testkit::shared;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (rate, consumer) = match parse(&args) {
        Some(parsed) => parsed,
        None => {
            eprintln!("usage: local-stack [--demo-rate N] -- <path to click-consumer>");
            return ExitCode::from(2);
        }
    };
    eprintln!("local-stack: starting RabbitMQ and ClickHouse on free loopback ports ...");
    let servers = shared();
    let amqp = servers.rabbitmq.amqp_url().replace("/%2f", "/");
    let http_port = servers.clickhouse.http_port().to_string();
    let database =
        std::env::var("CLICKHOUSE_DATABASE").unwrap_or_else(|_| "url_shortener".to_owned());
    let table = std::env::var("CLICKHOUSE_TABLE").unwrap_or_else(|_| "click_events".to_owned());
    eprintln!(
        "local-stack: RabbitMQ   {amqp}\n\
         local-stack: ClickHouse http://127.0.0.1:{http_port}\n\
         local-stack: look at the rows from another shell:\n  \
         curl 'http://127.0.0.1:{http_port}/' --data-binary 'SELECT count(), max(timestamp) FROM {database}.{table}'\n  \
         curl 'http://127.0.0.1:{http_port}/' --data-binary 'SELECT * FROM {database}.{table} ORDER BY timestamp DESC LIMIT 5 FORMAT Vertical'\n\
         local-stack: Ctrl-C stops the consumer (it drains and exits), then the servers."
    );
    let with_env = |command: &mut Command| {
        command
            .env("RABBITMQ_URL", &amqp)
            .env("CLICKHOUSE_HOST", "127.0.0.1")
            .env("CLICKHOUSE_PORT", &http_port);
    };
    let mut service = Command::new(&consumer);
    with_env(&mut service);
    let mut service = service.spawn().expect("the command starts");
    let mut demo = (rate > 0).then(|| {
        thread::sleep(Duration::from_secs(1));
        let mut demo = Command::new(&consumer);
        with_env(&mut demo);
        demo.args(["publish-demo", "--rate", &rate.to_string()])
            .env("METRICS_ADDR", "off")
            .spawn()
            .expect("the demo publisher starts")
    });
    // Ctrl-C reaches the whole process group; this process only waits for the others.
    ignore_interrupts();
    let status = service.wait().expect("wait for the command");
    if let Some(demo) = demo.as_mut() {
        stop(demo);
    }
    eprintln!("local-stack: {consumer} exited ({status}); stopping the servers");
    servers.rabbitmq.stop();
    servers.clickhouse.stop();
    ExitCode::from(u8::try_from(status.code().unwrap_or(1)).unwrap_or(1))
}

fn parse(args: &[String]) -> Option<(u32, String)> {
    let split = args.iter().position(|a| a == "--")?;
    let (options, rest) = (&args[..split], &args[split + 1..]);
    let rate = match options {
        [] => 0,
        [flag, value] if flag == "--demo-rate" => value.parse().ok()?,
        _ => return None,
    };
    Some((rate, rest.first()?.clone()))
}

fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

#[allow(unsafe_code)]
fn ignore_interrupts() {
    // SAFETY: setting SIGINT to SIG_IGN installs no handler code; it only tells the
    // kernel to drop the signal for this process.
    unsafe {
        libc::signal(libc::SIGINT, libc::SIG_IGN);
    }
}
