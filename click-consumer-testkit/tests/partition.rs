//! Partitions on loopback (nftables; these tests need root, as the cluster suite does).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use click_consumer_testkit::{Flow, Partition};

/// Set in the re-executed test binary that cuts a port and is then killed.
const CHILD_ENV: &str = "TESTKIT_PARTITION_CHILD";
const KILL_TEST: &str = "a_partition_heals_when_the_test_process_is_killed";

/// How long a connection attempt may take before it counts as hanging.
const HANG: Duration = Duration::from_secs(1);

fn connects(port: u16) -> bool {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    TcpStream::connect_timeout(&addr, HANG).is_ok()
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

fn listener() -> (TcpListener, u16) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let port = listener.local_addr().unwrap().port();
    (listener, port)
}

#[test]
fn a_partition_hangs_the_cut_port_until_it_is_healed() {
    let (cut, cut_port) = listener();
    let (_other, other_port) = listener();
    let mut client = TcpStream::connect((Ipv4Addr::LOCALHOST, cut_port)).unwrap();
    let (mut server, _) = cut.accept().unwrap();
    server.set_read_timeout(Some(HANG)).unwrap();

    let partition = Partition::cut(&[Flow {
        from: Ipv4Addr::LOCALHOST,
        to_port: cut_port,
    }]);
    client.write_all(b"x").unwrap();
    let mut byte = [0u8; 1];
    let read = server.read(&mut byte);
    assert!(
        read.is_err(),
        "a byte crossed the partition on an open connection: {read:?}"
    );
    assert!(
        !connects(cut_port),
        "a new connection to the cut port went through"
    );
    assert!(
        connects(other_port),
        "a port that is not cut must stay reachable"
    );

    partition.heal();
    assert!(
        connects(cut_port),
        "the cut port is still unreachable after the heal"
    );
    // The byte sent during the partition arrives once TCP retransmits it.
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    server.read_exact(&mut byte).unwrap();
    assert_eq!(&byte, b"x");
}

#[test]
fn a_partition_heals_when_the_test_process_is_killed() {
    if let Some(port) = std::env::var_os(CHILD_ENV) {
        let port: u16 = port.to_str().unwrap().parse().unwrap();
        let _partition = Partition::cut(&[Flow {
            from: Ipv4Addr::LOCALHOST,
            to_port: port,
        }]);
        println!("CUT");
        std::thread::sleep(Duration::from_secs(600));
        return;
    }
    let (_listener, port) = listener();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", KILL_TEST, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, port.to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("re-run the test binary");
    let cut = BufReader::new(child.stdout.take().unwrap())
        .lines()
        .map(Result::unwrap)
        .any(|line| line.contains("CUT"));
    assert!(cut, "the child exited without cutting the port");
    assert!(!connects(port), "the child's partition does not hold");

    child.kill().unwrap(); // SIGKILL: no destructor runs in the child.
    child.wait().unwrap();
    assert!(
        eventually(Duration::from_secs(10), || connects(port)),
        "port {port} is still cut after the process that cut it was killed"
    );
}
