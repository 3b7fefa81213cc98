//! Replicas: three `click-consumer` processes on one queue share it round-robin; one is
//! stopped mid-stream and nothing is lost or stored twice.

mod support;

use std::time::Duration;

use click_consumer::ClickEvent;
use click_consumer_testkit::shared;
use support::{Stack, free_port, http_get, wait_until};

const EVENTS: usize = 6000;

fn received(port: u16) -> u64 {
    http_get(port, "/metrics")
        .lines()
        .find(|line| line.starts_with("click_consumer_messages_received_total"))
        .and_then(|line| line.rsplit(' ').next())
        .map_or(0, |v| v.parse::<f64>().unwrap() as u64)
}

#[test]
fn three_replicas_share_the_queue_and_one_can_stop_mid_stream() {
    let servers = shared();
    let stack = Stack::new(&servers.rabbitmq, &servers.clickhouse, "replicas");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let publisher = stack.publisher(&runtime);
    let ports = [free_port(), free_port(), free_port()];
    let mut replicas: Vec<_> = ports
        .iter()
        .map(|port| {
            let addr = format!("127.0.0.1:{port}");
            // Small batches and prefetch so that the broker spreads deliveries evenly.
            stack.spawn(&[("METRICS_ADDR", addr.as_str()), ("BATCH_SIZE", "100")])
        })
        .collect();
    for port in ports {
        wait_until(
            "every replica to serve /ready",
            Duration::from_secs(30),
            || {
                std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
                    && http_get(port, "/ready").starts_with("HTTP/1.1 200")
            },
        );
    }

    let events: Vec<ClickEvent> = (0..EVENTS)
        .map(|i| ClickEvent::new(format!("rep{i:05}"), "2024-01-15T10:30:00Z"))
        .collect();
    let (first, second) = events.split_at(EVENTS / 2);
    for chunk in first.chunks(200) {
        runtime.block_on(publisher.publish_all(chunk)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_until("half of the rows", Duration::from_secs(60), || {
        stack.rows().0 >= (EVENTS / 2) as u64
    });
    let shares: Vec<u64> = ports.iter().map(|port| received(*port)).collect();
    eprintln!("deliveries per replica after the first half: {shares:?}");
    for (i, share) in shares.iter().enumerate() {
        assert!(*share > 0, "replica {i} took no share: {shares:?}");
    }

    // Stop one replica while the second half streams in.
    let publishing = {
        let publisher = publisher.clone();
        let second = second.to_vec();
        let handle = runtime.handle().clone();
        std::thread::spawn(move || {
            for chunk in second.chunks(200) {
                handle.block_on(publisher.publish_all(chunk)).unwrap();
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let mut stopped = replicas.remove(0);
    assert!(
        stopped.stop().success(),
        "a replica stopped mid-stream exits 0"
    );
    publishing.join().unwrap();
    wait_until("every row", Duration::from_secs(60), || {
        stack.rows().0 >= EVENTS as u64
    });
    wait_until("the queue to drain", Duration::from_secs(30), || {
        stack.queue() == (0, 0)
    });
    for mut replica in replicas {
        assert!(replica.stop().success());
    }
    assert_eq!(
        stack.rows(),
        (EVENTS as u64, EVENTS as u64),
        "every event stored exactly once"
    );
}
