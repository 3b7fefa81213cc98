//! A private RabbitMQ 3.10 cluster on loopback: `n` nodes (`rc<i>-<unique>@localhost`)
//! sharing one private epmd and one Erlang cookie, formed at boot by classic-config peer
//! discovery. Each node is its own process, so a test can SIGKILL one and start it again
//! (it rejoins with its data), or cut it off from the others ([`RabbitMqCluster::partition`]).
//!
//! Partitions are handled as in a production cluster of quorum queues:
//! `cluster_partition_handling = pause_minority` (a node that finds itself in the
//! minority stops serving clients, which then move to the majority, instead of serving
//! a queue replica that cannot make progress), a `net_ticktime` of
//! [`RabbitMqCluster::NET_TICKTIME_SECS`], so that a node that stops answering is
//! declared down within 0.75-1.25 times that, a `net_setuptime` of
//! [`RabbitMqCluster::NET_SETUPTIME_SECS`], so that a call to an unreachable node fails
//! within that, and an `aten` `poll_interval` of
//! [`RabbitMqCluster::ATEN_POLL_INTERVAL_MS`], so that a quorum queue elects a new leader
//! within about 3 s of losing its leader's node rather than 5-6 s.
//!
//! To tell its distribution connections apart from those of the other nodes and of
//! `rabbitmqctl` (all on 127.0.0.1), node `i` opens its connections to peers from its own
//! loopback address, `127.0.0.<11 + i>` (Erlang's `inet_dist_connect_options`).
//! Everything else, AMQP, epmd and the CLI, stays on 127.0.0.1.

use std::fmt;
use std::fs;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::janitor;
use crate::partition::{Flow, Partition};
use crate::ports::{free_ports, wait_bindable};
use crate::process::{
    INSTALL_HINT, ServerProcess, find_program, log_tail, search_path, spawn_tied, wait_ready,
};
use crate::rabbitmq::{NodeEnv, QUEUE_COUNTS, private_node_env, queue_counts_in};

const READY_TIMEOUT: Duration = Duration::from_secs(90);

struct Node {
    name: String,
    amqp_port: u16,
    dist_port: u16,
    /// The source address of its distribution connections to peers.
    dist_ip: Ipv4Addr,
    dir: PathBuf,
    process: ServerProcess,
}

/// A RabbitMQ cluster of private nodes; every node is killed when this is dropped and
/// when the test process ends.
pub struct RabbitMqCluster {
    dir: TempDir,
    sbin: PathBuf,
    epmd_port: u16,
    epmd: ServerProcess,
    nodes: Vec<Node>,
}

impl RabbitMqCluster {
    /// The nodes' `net_ticktime` in seconds (Erlang's default: 60). A peer that stops
    /// answering is declared down after 0.75-1.25 times this; much lower values risk
    /// false alarms on a loaded machine.
    pub const NET_TICKTIME_SECS: u32 = 5;

    /// The nodes' `net_setuptime` in seconds (Erlang's default: 7): how long a node
    /// waits for a distribution connection to come up. During a partition the nodes
    /// of the majority still reach for the cut-off node now and then, and each attempt
    /// blocks for this long since its packets are dropped: a consumer that moved to
    /// the majority waited 7.1 s for its session (queue declared, consumer registered)
    /// with the default, 2.4 s with 2.
    pub const NET_SETUPTIME_SECS: u32 = 2;

    /// How often, in milliseconds, the nodes' failure detector (`aten`, which Ra's
    /// quorum queues watch besides Erlang's own monitors) looks at its peers. RabbitMQ
    /// 3.10 sets 5000 (aten's own default is 1000) to avoid elections on false alarms,
    /// but Ra 2.2 then delays the election after a real loss: when aten flags the
    /// leader's node first (1-3 s after a partition), the follower arms a pre-vote
    /// timer of this interval plus up to 1 s, and the quicker timer (0.1-0.6 s) that
    /// Erlang's `noconnection` would arm a few seconds later is ignored while that one
    /// is pending. Measured with 5000: the new leader came 5.0-5.5 s after aten's alarm,
    /// 1-3 s after the node was declared down (the partition's 7.8-10.6 s recovery).
    /// Overridable with `TESTKIT_ATEN_POLL_INTERVAL_MS` to measure other values.
    pub const ATEN_POLL_INTERVAL_MS: u32 = 2000;

    /// Starts `n` nodes at once and waits until every one answers AMQP and the cluster
    /// lists all of them as running (about 15-30 s on 2 cores).
    ///
    /// # Panics
    /// If RabbitMQ is not installed or the cluster does not form within 90 s.
    pub fn start(n: usize) -> RabbitMqCluster {
        let sbin = installed_sbin();
        let dir = tempfile::Builder::new()
            .prefix("testkit-rabbitmq-cluster-")
            .tempdir()
            .unwrap_or_else(|err| panic!("cannot create a temp dir: {err}"));
        janitor::remove_after_exit(dir.path());
        let home = dir.path().join("home");
        fs::create_dir_all(&home).expect("home");
        let cookie = home.join(".erlang.cookie");
        fs::write(&cookie, format!("TESTKIT{}", std::process::id())).expect("cookie");
        fs::set_permissions(&cookie, fs::Permissions::from_mode(0o400)).expect("cookie mode");
        let [epmd_port] = free_ports();
        let tag = std::process::id();
        let nodes: Vec<Node> = (0..n)
            .map(|i| {
                let [amqp_port, dist_port] = free_ports();
                Node {
                    name: format!("rc{i}-{tag}@localhost"),
                    amqp_port,
                    dist_port,
                    dist_ip: node_dist_ip(i),
                    dir: dir.path().join(format!("node{i}")),
                    process: ServerProcess::new("rabbitmq cluster node"),
                }
            })
            .collect();
        let peers: String = nodes
            .iter()
            .enumerate()
            .map(|(i, node)| {
                format!(
                    "cluster_formation.classic_config.nodes.{} = {}\n",
                    i + 1,
                    node.name
                )
            })
            .collect();
        // `TESTKIT_RABBITMQ_LOG_LEVEL=debug` to follow elections in the nodes' logs.
        let log_level = std::env::var("TESTKIT_RABBITMQ_LOG_LEVEL")
            .map(|level| format!("log.file.level = {level}\n"))
            .unwrap_or_default();
        for node in &nodes {
            fs::create_dir_all(&node.dir).expect("node dir");
            let conf = format!(
                "listeners.tcp.1 = 127.0.0.1:{}\nlog.console = false\nloopback_users = none\n\
                 cluster_partition_handling = pause_minority\n\
                 cluster_formation.peer_discovery_backend = classic_config\n{log_level}{peers}",
                node.amqp_port
            );
            fs::write(node.dir.join("rabbitmq.conf"), conf).expect("rabbitmq.conf");
            fs::write(
                node.dir.join("advanced.config"),
                advanced_config(node.dist_ip),
            )
            .expect("advanced.config");
            fs::write(node.dir.join("rabbitmq-env.conf"), "").expect("env file");
            fs::write(node.dir.join("enabled_plugins"), "[].\n").expect("plugins file");
        }
        let cluster = RabbitMqCluster {
            dir,
            sbin,
            epmd_port,
            epmd: ServerProcess::new("epmd"),
            nodes,
        };
        cluster.start_epmd();
        for index in 0..n {
            cluster.launch(index);
        }
        for index in 0..n {
            cluster.wait_node(index);
        }
        let all_running = crate::process::wait_for(READY_TIMEOUT, || {
            cluster.running_nodes_seen_by(0).len() == n
        });
        assert!(
            all_running,
            "the RabbitMQ cluster did not form within {READY_TIMEOUT:?}"
        );
        cluster
    }

    /// How many nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The AMQP URLs of every node separated by commas (a `RABBITMQ_URL`), each with
    /// `query` appended (e.g. `heartbeat=2`) if not empty.
    pub fn amqp_urls(&self, query: &str) -> String {
        self.nodes
            .iter()
            .map(|node| {
                let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", node.amqp_port);
                if query.is_empty() {
                    url
                } else {
                    format!("{url}?{query}")
                }
            })
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The AMQP port of node `index`.
    pub fn port(&self, index: usize) -> u16 {
        self.nodes[index].amqp_port
    }

    /// The Erlang node name of node `index`.
    pub fn node_name(&self, index: usize) -> &str {
        &self.nodes[index].name
    }

    /// Cuts node `index` off from every other node: their Erlang distribution
    /// traffic is dropped both ways (AMQP, epmd and `rabbitmqctl` still reach every
    /// node) until the returned guard is dropped. The nodes notice after about
    /// [`RabbitMqCluster::NET_TICKTIME_SECS`]; the cut-off node, a minority, then pauses (closes its
    /// client connections and stops listening for AMQP) until it sees the others again.
    ///
    /// # Panics
    /// If the traffic cannot be cut (see [`Partition::cut`]).
    pub fn partition(&self, index: usize) -> Partition {
        let victim = &self.nodes[index];
        let flows: Vec<Flow> = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .flat_map(|(_, peer)| {
                [
                    Flow {
                        from: victim.dist_ip,
                        to_port: peer.dist_port,
                    },
                    Flow {
                        from: peer.dist_ip,
                        to_port: victim.dist_port,
                    },
                ]
            })
            .collect();
        Partition::cut(&flows)
    }

    /// The nodes that node `index` lists as running (empty if it does not answer).
    pub fn running_nodes_seen_by(&self, index: usize) -> Vec<usize> {
        let status = self.ctl(index, &["cluster_status", "--formatter", "json"]);
        let running = status.split("\"running_nodes\"").nth(1).unwrap_or("");
        let running = &running[..running.find(']').unwrap_or(0)];
        (0..self.len())
            .filter(|i| running.contains(&self.nodes[*i].name))
            .collect()
    }

    /// The lines of node `index`'s log that contain `needle`, oldest first (for a
    /// test's report of what the broker did).
    pub fn log_lines(&self, index: usize, needle: &str) -> Vec<String> {
        let node = &self.nodes[index];
        let log = node.dir.join("log").join(format!("{}.log", node.name));
        fs::read_to_string(log)
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains(needle))
            .map(str::to_string)
            .collect()
    }

    /// Kills node `index` with SIGKILL.
    pub fn kill(&self, index: usize) {
        self.nodes[index].process.kill();
    }

    /// Stops node `index` cleanly (SIGTERM).
    pub fn stop(&self, index: usize) {
        self.nodes[index].process.stop(Duration::from_secs(30));
    }

    /// Starts node `index` again with its data; it rejoins the cluster.
    ///
    /// # Panics
    /// If its ports are not released or it does not come up within 90 s.
    pub fn restart(&self, index: usize) {
        self.stop(index);
        let node = &self.nodes[index];
        assert!(
            wait_bindable(&[node.amqp_port, node.dist_port], Duration::from_secs(15)),
            "RabbitMQ node {} restart: ports still in use",
            node.name
        );
        self.launch(index);
        self.wait_node(index);
    }

    /// Whether node `index` runs.
    pub fn is_running(&self, index: usize) -> bool {
        self.nodes[index].process.is_running()
    }

    /// The index of the node that leads quorum queue `queue`, asked of each running
    /// node in turn until one answers (a paused node does not).
    pub fn leader_of(&self, queue: &str) -> Option<usize> {
        self.ask_running(|asked| {
            let out = self.ctl(
                asked,
                &["list_queues", "-q", "--no-table-headers", "name", "leader"],
            );
            let leader = out
                .lines()
                .map(|line| line.split_whitespace().collect::<Vec<_>>())
                .find(|f| f.len() == 2 && f[0] == queue)?
                .get(1)?
                .to_string();
            self.nodes.iter().position(|n| n.name == leader)
        })
    }

    /// `(ready, unacknowledged)` of `queue`, asked of each running node in turn until
    /// one answers.
    pub fn queue_counts(&self, queue: &str) -> Option<(u64, u64)> {
        self.ask_running(|asked| queue_counts_in(&self.ctl(asked, &QUEUE_COUNTS), queue))
    }

    /// The first answer of `ask` over the running nodes.
    fn ask_running<T>(&self, ask: impl Fn(usize) -> Option<T>) -> Option<T> {
        (0..self.len())
            .filter(|i| self.is_running(*i))
            .find_map(ask)
    }

    /// Runs `rabbitmqctl` against node `index`; returns stdout (empty on failure).
    pub fn ctl(&self, index: usize, args: &[&str]) -> String {
        let mut cmd = Command::new(self.sbin.join("rabbitmqctl"));
        cmd.env_clear()
            .env("PATH", search_path())
            .env("LC_ALL", "C.UTF-8")
            .env("HOME", self.dir.path().join("home"))
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("RABBITMQ_CTL_DIST_PORT_MIN", "0")
            .env("RABBITMQ_CTL_DIST_PORT_MAX", "0")
            // The nodes' tick time: with Erlang's default of 60 s, the CLI would tick
            // only every 15 s and a node would drop it after 5 s of silence.
            .env(
                "RABBITMQ_CTL_ERL_ARGS",
                format!("-kernel net_ticktime {}", Self::NET_TICKTIME_SECS),
            )
            .arg("-n")
            .arg(&self.nodes[index].name)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let child = spawn_tied(cmd).expect("rabbitmqctl starts");
        let output = child.wait_with_output().expect("rabbitmqctl output");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn start_epmd(&self) {
        let epmd =
            find_program("epmd").unwrap_or_else(|| panic!("epmd is not installed: {INSTALL_HINT}"));
        let mut cmd = Command::new(epmd);
        cmd.args([
            "-port",
            &self.epmd_port.to_string(),
            "-address",
            "127.0.0.1",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0);
        self.epmd.launch(cmd);
        assert!(
            crate::process::wait_for(Duration::from_secs(10), || {
                TcpStream::connect(("127.0.0.1", self.epmd_port)).is_ok()
            }),
            "the cluster's epmd did not listen"
        );
    }

    fn launch(&self, index: usize) {
        let node = &self.nodes[index];
        let dir = &node.dir;
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("stdout.log"))
            .expect("node log");
        let mut cmd = Command::new(self.sbin.join("rabbitmq-server"));
        private_node_env(
            &mut cmd,
            &search_path(),
            &self.dir.path().join("home"),
            &NodeEnv {
                name: &node.name,
                amqp_port: node.amqp_port,
                dist_port: node.dist_port,
                epmd_port: self.epmd_port,
                dir,
            },
        )
        .env("RABBITMQ_ALLOW_INPUT", "1")
        .env("RABBITMQ_SERVER_START_ARGS", "-noinput")
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log)
        .process_group(0);
        node.process.launch(cmd);
    }

    fn wait_node(&self, index: usize) {
        let node = &self.nodes[index];
        if let Err(failure) = wait_ready(&node.process, READY_TIMEOUT, || {
            answers_amqp(node.amqp_port)
        }) {
            panic!(
                "RabbitMQ cluster node {} failed: {failure}\n{}",
                node.name,
                log_tail(&[node.dir.join("stdout.log")], 30)
            );
        }
    }
}

/// The loopback address node `index` opens its distribution connections from.
fn node_dist_ip(index: usize) -> Ipv4Addr {
    let last = u8::try_from(11 + index).expect("at most 244 nodes");
    Ipv4Addr::new(127, 0, 0, last)
}

/// The `advanced.config` of a node (Erlang terms that `rabbitmq.conf` cannot express).
fn advanced_config(dist_ip: Ipv4Addr) -> String {
    let [a, b, c, d] = dist_ip.octets();
    let poll = std::env::var("TESTKIT_ATEN_POLL_INTERVAL_MS")
        .ok()
        .and_then(|value| value.parse::<u32>().ok())
        .unwrap_or(RabbitMqCluster::ATEN_POLL_INTERVAL_MS);
    format!(
        "[{{kernel, [{{net_ticktime, {}}}, {{net_setuptime, {}}},\n\
         {{inet_dist_connect_options, [{{ip, {{{a},{b},{c},{d}}}}}]}}]}},\n\
         {{aten, [{{poll_interval, {poll}}}]}}].\n",
        RabbitMqCluster::NET_TICKTIME_SECS,
        RabbitMqCluster::NET_SETUPTIME_SECS
    )
}

/// Whether the port answers the AMQP 0-9-1 header with `connection.start`.
fn answers_amqp(port: u16) -> bool {
    let Ok(mut stream) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let mut first = [0u8; 1];
    stream.write_all(b"AMQP\x00\x00\x09\x01").is_ok()
        && stream.read_exact(&mut first).is_ok()
        && first[0] == 1
}

fn installed_sbin() -> PathBuf {
    let lib = Path::new("/usr/lib/rabbitmq/lib");
    fs::read_dir(lib)
        .ok()
        .and_then(|entries| {
            entries
                .flatten()
                .map(|e| e.path().join("sbin"))
                .find(|sbin| sbin.join("rabbitmq-server").is_file())
        })
        .unwrap_or_else(|| panic!("RabbitMQ is not installed: {INSTALL_HINT}"))
}

impl fmt::Debug for RabbitMqCluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMqCluster")
            .field("dir", &self.dir.path())
            .field(
                "nodes",
                &self
                    .nodes
                    .iter()
                    .map(|n| (&n.name, n.amqp_port))
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

impl Drop for RabbitMqCluster {
    fn drop(&mut self) {
        for node in &self.nodes {
            node.process.kill_quietly();
        }
        self.epmd.kill_quietly();
    }
}
