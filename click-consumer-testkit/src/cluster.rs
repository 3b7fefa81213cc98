//! A private ClickHouse cluster: one ZooKeeper (Debian's `zookeeper` package, standalone)
//! and replicas of one shard, each a [`ClickHouse`] with a `config.d/cluster.xml` that
//! names the ZooKeeper, the cluster, its own `{shard}`/`{replica}` macros, an interserver
//! port (replicas fetch parts from each other) and the distributed DDL queue (`ON
//! CLUSTER`).

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::clickhouse::ClickHouse;
use crate::janitor;
use crate::ports::{free_ports, wait_bindable};
use crate::process::{BootFailure, ServerProcess, find_program, log_tail, wait_ready};

const ZOOKEEPER_JAR: &str = "/usr/share/java/zookeeper.jar";
const ZOOKEEPER_HINT: &str = "install ZooKeeper with `scripts/install-services.sh` (Debian's `zookeeper` package, which needs Java)";
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A private standalone ZooKeeper on a free port of 127.0.0.1, its data in a fresh
/// temporary directory; killed when dropped and when the test process ends.
pub struct ZooKeeper {
    dir: TempDir,
    java: PathBuf,
    port: u16,
    server: ServerProcess,
}

impl ZooKeeper {
    /// Starts ZooKeeper and waits until it serves sessions (2-4 s).
    ///
    /// # Panics
    /// If Java or ZooKeeper is missing, or it does not come up within 60 s.
    pub fn start() -> ZooKeeper {
        let java = find_program("java")
            .unwrap_or_else(|| panic!("java is not installed: {ZOOKEEPER_HINT}"));
        assert!(
            Path::new(ZOOKEEPER_JAR).is_file(),
            "{ZOOKEEPER_JAR} is missing: {ZOOKEEPER_HINT}"
        );
        let dir = tempfile::Builder::new()
            .prefix("testkit-zookeeper-")
            .tempdir()
            .unwrap_or_else(|err| panic!("cannot create a temp dir for ZooKeeper: {err}"));
        janitor::remove_after_exit(dir.path());
        let [port] = free_ports();
        let zk = ZooKeeper {
            dir,
            java,
            port,
            server: ServerProcess::new("zookeeper"),
        };
        let data = zk.dir().join("data");
        fs::create_dir_all(&data).expect("ZooKeeper data dir");
        // A short tick makes sessions expire (and tables go read-only) within seconds
        // of an outage, as a test wants; ClickHouse asks for its own session timeout.
        let config = format!(
            "tickTime=500\ninitLimit=10\nsyncLimit=5\ndataDir={}\nclientPort={port}\n\
             clientPortAddress=127.0.0.1\nadmin.enableServer=false\n\
             4lw.commands.whitelist=ruok,srvr\nmaxClientCnxns=0\n",
            data.display()
        );
        fs::write(zk.dir().join("zoo.cfg"), config).expect("write zoo.cfg");
        zk.boot();
        zk
    }

    /// The client port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory holding `zoo.cfg`, the data and `stdout.log`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops ZooKeeper (SIGTERM, SIGKILL after 10 s).
    pub fn stop(&self) {
        self.server.stop(STOP_GRACE);
    }

    /// Kills ZooKeeper with SIGKILL.
    pub fn kill(&self) {
        self.server.kill();
    }

    /// Starts it again on the same port with the same data.
    ///
    /// # Panics
    /// If the port is not released within 10 s or it does not come up.
    pub fn restart(&self) {
        self.stop();
        assert!(
            wait_bindable(&[self.port], Duration::from_secs(10)),
            "ZooKeeper restart: port {} still in use",
            self.port
        );
        self.boot();
    }

    /// Whether the process is alive.
    pub fn is_running(&self) -> bool {
        self.server.is_running()
    }

    fn boot(&self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir().join("stdout.log"))
            .expect("ZooKeeper log file");
        let mut cmd = Command::new(&self.java);
        cmd.args(["-Xmx256m", "-XX:+UseSerialGC", "-cp", ZOOKEEPER_JAR])
            .arg(format!("-Dzookeeper.log.dir={}", self.dir().display()))
            .arg("org.apache.zookeeper.server.ZooKeeperServerMain")
            .arg(self.dir().join("zoo.cfg"))
            .current_dir(self.dir())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .process_group(0);
        self.server.launch(cmd);
        if let Err(failure) = wait_ready(&self.server, READY_TIMEOUT, || self.serves_sessions()) {
            self.fail(&failure);
        }
    }

    /// `srvr` names the server's mode only once it serves sessions; `ruok` answers
    /// `imok` earlier, and a ClickHouse 18.16 whose first ZooKeeper handshake is refused
    /// then crashes (NULL pointer in its DDL worker) on the first `ON CLUSTER` query.
    fn serves_sessions(&self) -> bool {
        let Ok(mut stream) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut reply = String::new();
        stream.write_all(b"srvr").is_ok()
            && stream.read_to_string(&mut reply).is_ok()
            && reply.contains("Mode: ")
    }

    fn fail(&self, failure: &BootFailure) -> ! {
        panic!(
            "ZooKeeper start failed: {failure} (port {}, dir {}).\n{}\nIf it is missing, {ZOOKEEPER_HINT}.",
            self.port,
            self.dir().display(),
            log_tail(&[self.dir().join("stdout.log")], 30)
        );
    }
}

impl fmt::Debug for ZooKeeper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ZooKeeper")
            .field("port", &self.port)
            .field("dir", &self.dir())
            .field("pid", &self.server.pid())
            .finish()
    }
}

impl Drop for ZooKeeper {
    fn drop(&mut self) {
        self.server.kill_quietly();
    }
}

/// A ZooKeeper and `n` ClickHouse replicas of one shard, forming the cluster
/// [`ClickHouseCluster::name`] (in every replica's `remote_servers`).
///
/// ```no_run
/// let cluster = click_consumer_testkit::ClickHouseCluster::start(2);
/// let engine = cluster.replicated_engine("clicks");
/// cluster.replica(0).query(&format!(
///     "CREATE TABLE default.t ON CLUSTER {} (id UInt64) ENGINE = {engine} ORDER BY id",
///     cluster.name()
/// ));
/// ```
#[derive(Debug)]
pub struct ClickHouseCluster {
    replicas: Vec<ClickHouse>,
    /// The ZooKeeper the replicas share (stop it to make the tables read-only).
    pub zookeeper: ZooKeeper,
}

impl ClickHouseCluster {
    /// How many of the latest blocks (INSERTs) a Replicated table remembers, in
    /// ZooKeeper, to drop a block inserted again (`replicated_deduplication_window`,
    /// 100 by default, set here for every MergeTree table in the replicas' config). An
    /// INSERT that was committed but whose answer was lost is retried only after the
    /// consumer's 60 s timeout: with 100, the retry of a replica that hung found its
    /// first attempt forgotten after 282 other blocks and stored it twice. A retry must
    /// come within this many blocks of the first attempt: 2000 covers the 60 s at about
    /// 30 INSERTs a second.
    pub const DEDUPLICATION_WINDOW: u32 = 2000;

    /// Starts ZooKeeper, then `replicas` ClickHouse servers in the cluster `testkit`.
    ///
    /// # Panics
    /// If a server cannot be started (see [`ZooKeeper::start`], [`ClickHouse::start`]).
    pub fn start(replicas: usize) -> ClickHouseCluster {
        let zookeeper = ZooKeeper::start();
        let servers: Vec<ClickHouse> = (0..replicas).map(|_| ClickHouse::unstarted()).collect();
        let members: String = servers
            .iter()
            .map(|s| {
                format!(
                    "<replica><host>127.0.0.1</host><port>{}</port></replica>",
                    s.tcp_port()
                )
            })
            .collect();
        for (index, server) in servers.iter().enumerate() {
            let [interserver] = free_ports();
            let xml = format!(
                r#"<?xml version="1.0"?>
<yandex>
    <interserver_http_host>127.0.0.1</interserver_http_host>
    <interserver_http_port>{interserver}</interserver_http_port>
    <zookeeper>
        <node><host>127.0.0.1</host><port>{zk}</port></node>
        <session_timeout_ms>6000</session_timeout_ms>
    </zookeeper>
    <macros><shard>01</shard><replica>replica{index}</replica></macros>
    <remote_servers>
        <{name}><shard><internal_replication>true</internal_replication>{members}</shard></{name}>
    </remote_servers>
    <distributed_ddl><path>/clickhouse/task_queue/ddl</path></distributed_ddl>
    <merge_tree><replicated_deduplication_window>{window}</replicated_deduplication_window></merge_tree>
</yandex>
"#,
                zk = zookeeper.port(),
                name = Self::NAME,
                window = Self::DEDUPLICATION_WINDOW,
            );
            let dir = server.dir().join("config.d");
            fs::create_dir_all(&dir).expect("config.d");
            fs::write(dir.join("cluster.xml"), xml).expect("write cluster.xml");
        }
        for server in &servers {
            server.boot_or_panic();
        }
        let cluster = ClickHouseCluster {
            replicas: servers,
            zookeeper,
        };
        cluster.probe_distributed_ddl();
        cluster
    }

    /// Runs a harmless `ON CLUSTER` statement until every replica takes part. A
    /// ClickHouse 18.16 whose first ZooKeeper handshake failed crashes (NULL pointer in
    /// its DDL worker) on the first distributed DDL it sees; seen here now and then on a
    /// loaded machine. A replica that crashed is started again.
    fn probe_distributed_ddl(&self) {
        let sql = format!(
            "CREATE DATABASE IF NOT EXISTS testkit_probe ON CLUSTER {}",
            Self::NAME
        );
        for attempt in 1..=4 {
            let answer = crate::http::request(
                self.replicas[0].http_port(),
                "POST",
                "/",
                &sql,
                Duration::from_secs(20),
            );
            if matches!(&answer, Ok(r) if r.status == 200) {
                return;
            }
            eprintln!(
                "testkit: ClickHouse cluster: distributed DDL probe failed (attempt {attempt}): {}",
                answer.map_or_else(|e| e.to_string(), |r| r.body)
            );
            // A crashing server takes a moment to write its stack trace and exit.
            std::thread::sleep(Duration::from_secs(3));
            for replica in &self.replicas {
                let answers = crate::http::request(
                    replica.http_port(),
                    "GET",
                    "/ping",
                    "",
                    Duration::from_secs(2),
                )
                .is_ok_and(|r| r.status == 200);
                if !answers || !replica.is_running() {
                    eprintln!("testkit: ClickHouse cluster: restarting {}", replica.url());
                    replica.restart();
                }
            }
        }
        panic!("the ClickHouse cluster does not run distributed DDL");
    }

    const NAME: &'static str = "testkit";

    /// The cluster's name, for `ON CLUSTER` and `CLICKHOUSE_CLUSTER`.
    pub fn name(&self) -> &str {
        Self::NAME
    }

    /// The replicas, in `remote_servers` order.
    pub fn replicas(&self) -> &[ClickHouse] {
        &self.replicas
    }

    /// Replica `index`.
    pub fn replica(&self, index: usize) -> &ClickHouse {
        &self.replicas[index]
    }

    /// The HTTP URLs of all replicas, separated by commas (a `CLICKHOUSE_URL`).
    pub fn urls(&self) -> String {
        self.replicas
            .iter()
            .map(ClickHouse::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// A `ReplicatedMergeTree` clause for a table whose ZooKeeper path ends in `path`
    /// (use a unique one per test), with the replicas' own macros.
    pub fn replicated_engine(&self, path: &str) -> String {
        format!("ReplicatedMergeTree('/clickhouse/tables/{{shard}}/{path}', '{{replica}}')")
    }
}
