//! A private RabbitMQ broker (Debian's rabbitmq-server) with its own epmd: the
//! machine's own (3.10 on Debian bookworm) or, when `CLICK_CONSUMER_TEST_RABBITMQ=4`,
//! RabbitMQ 4 from a Debian trixie chroot (see [`rabbitmq_chroot`]).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::janitor;
use crate::ports::{connect, free_ports, wait_bindable};
use crate::process::{
    BootFailure, INSTALL_HINT, ServerProcess, find_program, log_tail, search_path, spawn_tied,
    wait_for, wait_ready,
};
use crate::rabbitmq_chroot::{self, Chroot, INSTALL_HINT_4};
use crate::rabbitmq_home;

const RABBITMQ_LIB: &str = "/usr/lib/rabbitmq/lib";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const EPMD_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_GRACE: Duration = Duration::from_secs(15);
const PORT_RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
/// Boots tried before giving up. A server that exits during start-up has most likely
/// lost a port: to another process between choosing and binding it (start picks
/// fresh ports then), or to its own previous run not yet gone (restart).
const ATTEMPTS: u32 = 3;
/// AMQP 0-9-1 protocol header; the broker answers with connection.start (frame type 1).
const AMQP_HEADER: &[u8] = b"AMQP\x00\x00\x09\x01";

/// PATH inside the chroot.
const CHROOT_PATH: &str = "/usr/sbin:/usr/bin:/sbin:/bin";

/// The installed broker's scripts and Erlang's epmd.
#[derive(Debug, Clone)]
struct Install {
    /// The chroot the broker runs in, or None for the machine's own RabbitMQ.
    chroot: Option<Chroot>,
    /// The paths below are as the broker sees them (inside the chroot, if any).
    sbin: PathBuf,
    server: PathBuf,
    ctl: PathBuf,
    epmd: PathBuf,
    /// The broker's version, from its folder's name (`rabbitmq_server-4.0.5`).
    version: String,
}

impl Install {
    /// Finds the installation that `CLICK_CONSUMER_TEST_RABBITMQ` asks for, or panics
    /// saying how to install it.
    fn find() -> Install {
        let Some(chroot) = rabbitmq_chroot::selected() else {
            return Install::system();
        };
        let lib = chroot.host_path(Path::new(RABBITMQ_LIB));
        let host_sbin = rabbitmq_sbin(&lib).unwrap_or_else(|| {
            panic!(
                "RabbitMQ is not installed in the chroot (no {}/rabbitmq_server-*/sbin/rabbitmq-server): {INSTALL_HINT_4}",
                lib.display()
            )
        });
        let epmd = PathBuf::from("/usr/bin/epmd");
        if !chroot.host_path(&epmd).is_file() {
            panic!(
                "the RabbitMQ chroot has no {}: {INSTALL_HINT_4}",
                epmd.display()
            );
        }
        Install::new(Some(chroot.clone()), chroot.inner_path(&host_sbin), epmd)
    }

    /// The machine's own RabbitMQ.
    fn system() -> Install {
        let sbin = rabbitmq_sbin(Path::new(RABBITMQ_LIB)).unwrap_or_else(|| {
            panic!("RabbitMQ is not installed (no {RABBITMQ_LIB}/rabbitmq_server-*/sbin/rabbitmq-server): {INSTALL_HINT}")
        });
        let epmd = find_program("epmd").unwrap_or_else(|| {
            panic!(
                "Erlang's epmd is not installed (not in PATH, /usr/sbin, /usr/bin): {INSTALL_HINT}"
            )
        });
        Install::new(None, sbin, epmd)
    }

    fn new(chroot: Option<Chroot>, sbin: PathBuf, epmd: PathBuf) -> Install {
        let folder = sbin
            .parent()
            .and_then(Path::file_name)
            .unwrap_or_default()
            .to_string_lossy();
        let version = folder
            .strip_prefix("rabbitmq_server-")
            .unwrap_or(&folder)
            .to_owned();
        Install {
            chroot,
            server: sbin.join("rabbitmq-server"),
            ctl: sbin.join("rabbitmqctl"),
            sbin,
            epmd,
            version,
        }
    }

    /// Makes `cmd` run as this installation needs: inside the chroot as its
    /// `rabbitmq` user, in `cwd` (a path as the broker sees it), or as is.
    fn confine(&self, cmd: &mut Command, cwd: &Path) {
        match &self.chroot {
            Some(chroot) => chroot.confine(cmd, cwd),
            None => {
                cmd.current_dir(cwd);
            }
        }
    }

    /// The message for a broker that will not start.
    fn hint(&self) -> &'static str {
        if self.chroot.is_some() {
            INSTALL_HINT_4
        } else {
            INSTALL_HINT
        }
    }
}

/// The `sbin` directory of the newest `rabbitmq_server-*` under `lib`.
///
/// Its scripts run the broker as the current user; `/usr/sbin/rabbitmq-server` would
/// switch to the `rabbitmq` user and the system-wide node.
fn rabbitmq_sbin(lib: &Path) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(lib)
        .ok()?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| {
            let name = path.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("rabbitmq_server-") && path.join("sbin/rabbitmq-server").is_file()
        })
        .collect();
    dirs.sort();
    dirs.pop().map(|dir| dir.join("sbin"))
}

/// A private RabbitMQ node on free loopback ports, with its own epmd, configuration,
/// database and logs in a fresh temporary directory. User `guest`, password `guest`.
///
/// The broker and its epmd are killed when this value is dropped and, in any case,
/// when the test process ends (however it ends).
pub struct RabbitMq {
    dir: TempDir,
    install: Install,
    /// `RABBITMQ_SCRIPTS_DIR` and `RABBITMQ_PLUGINS_DIR` of the slim private home.
    home: Option<(PathBuf, PathBuf)>,
    node: String,
    amqp_port: u16,
    /// The `amqps://` port, for a broker started with [`RabbitMq::start_with_tls`].
    tls_port: Option<u16>,
    dist_port: u16,
    epmd_port: u16,
    epmd: ServerProcess,
    broker: ServerProcess,
}

impl RabbitMq {
    /// Starts a new broker and waits until it answers the AMQP protocol header.
    ///
    /// # Panics
    /// If RabbitMQ is not installed (the message says to run
    /// `scripts/install-services.sh`), or if it does not come up within 30 s (the
    /// message holds the end of its logs).
    pub fn start() -> RabbitMq {
        let install = Install::find();
        for attempt in 1..=ATTEMPTS {
            let broker = RabbitMq::prepare(install.clone());
            match broker.boot() {
                Ok(()) => return broker,
                Err(failure @ BootFailure::Exited(_)) if attempt < ATTEMPTS => {
                    eprintln!("testkit: RabbitMQ start: {failure}; retrying on fresh ports");
                }
                Err(failure) => broker.fail("start", &failure),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// Starts a broker that also listens for `amqps://` with a certificate for
    /// `localhost` signed by a private CA made for it (with the `openssl` command);
    /// [`RabbitMq::ca_file`] is that CA.
    ///
    /// # Panics
    /// As [`RabbitMq::start`], or if `openssl` fails.
    pub fn start_with_tls() -> RabbitMq {
        let install = Install::find();
        let mut broker = RabbitMq::prepare(install);
        let [tls_port] = free_ports();
        broker.tls_port = Some(tls_port);
        crate::tls::make_certificates(broker.dir());
        let dir = broker.broker_dir().display().to_string();
        let config = format!(
            "listeners.tcp.1 = 127.0.0.1:{}\nlisteners.ssl.1 = 127.0.0.1:{tls_port}\n\
             ssl_options.cacertfile = {dir}/ca.pem\nssl_options.certfile = {dir}/server.pem\n\
             ssl_options.keyfile = {dir}/server.key\nssl_options.verify = verify_none\n\
             ssl_options.fail_if_no_peer_cert = false\nlog.console = false\nlog.file.level = info\n",
            broker.amqp_port
        );
        broker.write("rabbitmq.conf", &config);
        if let Err(failure) = broker.boot() {
            broker.fail("start with TLS", &failure);
        }
        // RabbitMQ 4 opens the TLS listener a moment after the plain one.
        if !wait_for(READY_TIMEOUT, || {
            connect(tls_port, Duration::from_secs(1)).is_ok()
        }) {
            broker.fail("start with TLS", &BootFailure::TimedOut(READY_TIMEOUT));
        }
        broker
    }

    /// `amqps://guest:guest@localhost:{tls port}/%2f` of a broker started with
    /// [`RabbitMq::start_with_tls`].
    pub fn amqps_url(&self) -> String {
        let port = self
            .tls_port
            .expect("the broker was started with start_with_tls");
        format!("amqps://guest:guest@localhost:{port}/%2f")
    }

    /// The PEM of the CA that signed the `amqps://` certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir().join("ca.pem")
    }

    /// The AMQP URL for the default vhost: `amqp://guest:guest@127.0.0.1:{port}/%2f`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp_port)
    }

    /// The AMQP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.amqp_port
    }

    /// The broker's process id (the `beam.smp` process itself), while it runs: for
    /// reading its CPU time from `/proc/<pid>/stat`.
    pub fn pid(&self) -> Option<u32> {
        self.broker.pid()
    }

    /// The directory holding the configuration, the database (`mnesia/`) and the
    /// logs (`log/`). For RabbitMQ 4 it lies inside the chroot's `/tmp`.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The broker's version, e.g. `3.10.8` or `4.0.5`, from its installation folder.
    pub fn version(&self) -> &str {
        &self.install.version
    }

    /// The major version, e.g. 3 or 4 (0 if the version is not a number).
    pub fn major_version(&self) -> u32 {
        self.version()
            .split('.')
            .next()
            .and_then(|major| major.parse().ok())
            .unwrap_or(0)
    }

    /// [`RabbitMq::dir`] as the broker sees it (inside the chroot, if any).
    fn broker_dir(&self) -> PathBuf {
        match &self.install.chroot {
            Some(chroot) => chroot.inner_path(self.dir()),
            None => self.dir().to_path_buf(),
        }
    }

    /// Stops the broker with SIGTERM (a clean shutdown, about 1 s) and waits for it
    /// to exit (SIGKILL after 15 s). Its epmd keeps running for [`RabbitMq::restart`].
    pub fn stop(&self) {
        self.broker.stop(STOP_GRACE);
    }

    /// Kills the broker with SIGKILL and waits for it to exit.
    pub fn kill(&self) {
        self.broker.kill();
    }

    /// Starts the broker again on the same port with the same database (stopping it
    /// first if it runs), so durable queues and persistent messages survive; waits
    /// until it answers.
    ///
    /// # Panics
    /// If the port is not released within 10 s or the broker does not come up.
    pub fn restart(&self) {
        self.stop();
        if !wait_bindable(&[self.amqp_port, self.dist_port], PORT_RELEASE_TIMEOUT) {
            panic!(
                "RabbitMQ restart: port {} or {} still in use after {PORT_RELEASE_TIMEOUT:?}",
                self.amqp_port, self.dist_port
            );
        }
        if !self.epmd.is_running() {
            self.start_epmd();
        }
        for attempt in 1..=ATTEMPTS {
            match self.boot_broker() {
                Ok(()) => return,
                Err(failure @ BootFailure::Exited(_)) if attempt < ATTEMPTS => {
                    eprintln!("testkit: RabbitMQ restart: {failure}; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(failure) => self.fail("restart", &failure),
            }
        }
    }

    /// Whether the broker process is alive.
    pub fn is_running(&self) -> bool {
        self.broker.is_running()
    }

    /// `(ready, unacknowledged)` messages of `queue` from the broker's own bookkeeping
    /// (`rabbitmqctl list_queues`), or `None` if the queue does not exist.
    pub fn queue_counts(&self, queue: &str) -> Option<(u64, u64)> {
        queue_counts_in(&self.ctl(&QUEUE_COUNTS), queue)
    }

    /// Runs `rabbitmqctl` against this node and returns its standard output, e.g.
    /// `ctl(&["list_queues", "name", "messages_ready", "messages_unacknowledged"])`.
    /// Put `-q` first (and `--no-table-headers` after the command) for bare output.
    ///
    /// # Panics
    /// With rabbitmqctl's output if it fails.
    pub fn ctl(&self, args: &[&str]) -> String {
        self.try_ctl(args)
            .unwrap_or_else(|failure| panic!("rabbitmqctl {args:?} failed {failure}"))
    }

    /// As [`RabbitMq::ctl`], but a failing rabbitmqctl (such as a command this
    /// broker's version does not have) is an `Err` holding its exit status and output.
    ///
    /// # Panics
    /// If rabbitmqctl cannot be run at all.
    pub fn try_ctl(&self, args: &[&str]) -> Result<String, String> {
        let mut cmd = Command::new(&self.install.ctl);
        self.node_env(&mut cmd)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        self.install.confine(&mut cmd, &self.broker_dir());
        let output = spawn_tied(cmd)
            .and_then(|child| child.wait_with_output())
            .unwrap_or_else(|err| panic!("cannot run rabbitmqctl {args:?}: {err}"));
        if !output.status.success() {
            return Err(format!(
                "({}):\n{}{}",
                output.status,
                String::from_utf8_lossy(&output.stderr),
                String::from_utf8_lossy(&output.stdout)
            ));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// A new, not yet started broker: fresh directory, ports and configuration.
    fn prepare(install: Install) -> RabbitMq {
        let mut builder = tempfile::Builder::new();
        builder.prefix("testkit-rabbitmq-");
        let dir = match &install.chroot {
            Some(chroot) => builder.tempdir_in(chroot.tmp()),
            None => builder.tempdir(),
        }
        .unwrap_or_else(|err| panic!("cannot create a temp dir for RabbitMQ: {err}"));
        janitor::remove_after_exit(dir.path());
        let [amqp_port, dist_port, epmd_port] = free_ports();
        // The slim home links host paths, which mean nothing inside a chroot; RabbitMQ 4
        // starts in about 3 s without it (measured here).
        let home = match install.chroot {
            Some(_) => None,
            None => slim_home(&install, dir.path()),
        };
        let broker = RabbitMq {
            dir,
            install,
            home,
            node: format!("rabbit-testkit-{amqp_port}@localhost"),
            amqp_port,
            tls_port: None,
            dist_port,
            epmd_port,
            epmd: ServerProcess::new("epmd"),
            broker: ServerProcess::new("rabbitmq-server"),
        };
        broker.write_files();
        broker
    }

    fn write_files(&self) {
        let config = format!(
            "listeners.tcp.1 = 127.0.0.1:{}\nlog.console = false\nlog.file.level = info\n",
            self.amqp_port
        );
        for (name, content) in [
            ("rabbitmq.conf", config.as_str()),
            ("advanced.config", "[].\n"),
            ("enabled_plugins", "[].\n"),
            ("rabbitmq-env.conf", ""),
        ] {
            self.write(name, content);
        }
        for sub in ["mnesia", "log"] {
            fs::create_dir_all(self.dir().join(sub)).unwrap_or_else(|err| {
                panic!("cannot create {sub} in {}: {err}", self.dir().display())
            });
        }
    }

    fn write(&self, name: &str, content: &str) {
        let path = self.dir().join(name);
        fs::write(&path, content)
            .unwrap_or_else(|err| panic!("cannot write {}: {err}", path.display()));
    }

    /// The environment shared by the broker and rabbitmqctl: everything private.
    fn node_env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        let dir = &self.broker_dir();
        let path = match self.install.chroot {
            Some(_) => CHROOT_PATH.to_owned(),
            None => search_path(),
        };
        private_node_env(
            cmd,
            &path,
            dir,
            &NodeEnv {
                name: &self.node,
                amqp_port: self.amqp_port,
                dist_port: self.dist_port,
                epmd_port: self.epmd_port,
                dir,
            },
        );
        if let Some((scripts, plugins)) = &self.home {
            cmd.env("RABBITMQ_SCRIPTS_DIR", scripts)
                .env("RABBITMQ_PLUGINS_DIR", plugins);
        }
        cmd
    }

    fn boot(&self) -> Result<(), BootFailure> {
        if let Some(chroot) = &self.install.chroot {
            chroot.hand_over(self.dir()).unwrap_or_else(|err| {
                panic!(
                    "cannot give {} to the chroot's rabbitmq user: {err}",
                    self.dir().display()
                )
            });
        }
        self.start_epmd();
        self.boot_broker()
    }

    /// A private epmd, so the node does not start a shared one that outlives it.
    fn start_epmd(&self) {
        let mut cmd = Command::new(&self.install.epmd);
        cmd.args([
            "-port",
            &self.epmd_port.to_string(),
            "-address",
            "127.0.0.1",
        ])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(self.output_log("epmd.log"))
        .stderr(self.output_log("epmd.log"))
        .process_group(0);
        self.install.confine(&mut cmd, Path::new("/"));
        self.epmd.launch(cmd);
        let up = wait_for(EPMD_TIMEOUT, || {
            connect(self.epmd_port, Duration::from_secs(1)).is_ok() || !self.epmd.is_running()
        });
        if !up || !self.epmd.is_running() {
            panic!(
                "epmd did not start on port {} within {EPMD_TIMEOUT:?}.\n{}",
                self.epmd_port,
                log_tail(&[self.dir().join("epmd.log")], 20)
            );
        }
    }

    fn boot_broker(&self) -> Result<(), BootFailure> {
        let mut cmd = Command::new(&self.install.server);
        self.node_env(&mut cmd)
            // With input allowed the script execs straight into beam.smp, so the pid
            // we hold is the broker itself; -noinput keeps the shell off.
            .env("RABBITMQ_ALLOW_INPUT", "1")
            .env("RABBITMQ_SERVER_START_ARGS", "-noinput")
            .stdin(Stdio::null())
            .stdout(self.output_log("log/stdout.log"))
            .stderr(self.output_log("log/stdout.log"))
            .process_group(0);
        self.install.confine(&mut cmd, &self.broker_dir());
        self.broker.launch(cmd);
        wait_ready(&self.broker, READY_TIMEOUT, || {
            amqp_handshake(self.amqp_port)
        })
    }

    fn output_log(&self, name: &str) -> File {
        let path = self.dir().join(name);
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|err| panic!("cannot open {}: {err}", path.display()))
    }

    fn fail(&self, what: &str, failure: &BootFailure) -> ! {
        let logs = [
            self.dir().join("log/stdout.log"),
            self.dir().join(format!("log/{}.log", self.node)),
        ];
        panic!(
            "RabbitMQ {what} failed: {failure} (AMQP port {}, dir {}).\n{}\n\
             If RabbitMQ {} is missing or broken, {}.",
            self.amqp_port,
            self.dir().display(),
            log_tail(&logs, 30),
            self.version(),
            self.install.hint()
        );
    }
}

/// The slim private home (see [`rabbitmq_home`]), or None (the installed home, a
/// slower start) if it cannot be built.
fn slim_home(install: &Install, dir: &Path) -> Option<(PathBuf, PathBuf)> {
    match rabbitmq_home::build(&install.sbin, &dir.join("home")) {
        Ok(dirs) => Some(dirs),
        Err(err) => {
            eprintln!(
                "testkit: cannot build a slim RabbitMQ home ({err}); using {} (slower start)",
                install.sbin.display()
            );
            None
        }
    }
}

/// Whether an AMQP 0-9-1 broker answers the protocol header on `port`.
pub(crate) fn amqp_handshake(port: u16) -> bool {
    let Ok(mut stream) = connect(port, Duration::from_secs(2)) else {
        return false;
    };
    let mut first = [0u8; 1];
    stream.write_all(AMQP_HEADER).is_ok() && stream.read_exact(&mut first).is_ok() && first[0] == 1
}

impl fmt::Debug for RabbitMq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitMq")
            .field("version", &self.version())
            .field("chroot", &self.install.chroot.is_some())
            .field("node", &self.node)
            .field("amqp_port", &self.amqp_port)
            .field("dist_port", &self.dist_port)
            .field("epmd_port", &self.epmd_port)
            .field("dir", &self.dir())
            .field("pid", &self.broker.pid())
            .field("running", &self.is_running())
            .finish()
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        self.broker.kill_quietly();
        self.epmd.kill_quietly();
        // The TempDir field removes the directory next.
    }
}

/// What makes a broker node private: its name, ports and folder.
#[derive(Debug)]
pub(crate) struct NodeEnv<'a> {
    pub(crate) name: &'a str,
    pub(crate) amqp_port: u16,
    pub(crate) dist_port: u16,
    pub(crate) epmd_port: u16,
    /// Where the node keeps its data, logs and configuration files.
    pub(crate) dir: &'a Path,
}

/// The environment of a private node (or of rabbitmqctl talking to it): nothing
/// inherited, every port and path its own. Shared by single brokers and clusters.
pub(crate) fn private_node_env<'c>(
    cmd: &'c mut Command,
    path: &str,
    home: &Path,
    node: &NodeEnv<'_>,
) -> &'c mut Command {
    let dir = node.dir;
    cmd.env_clear()
        .env("PATH", path)
        .env("LC_ALL", "C.UTF-8")
        .env("HOME", home)
        .env("RABBITMQ_NODENAME", node.name)
        .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
        .env("RABBITMQ_NODE_PORT", node.amqp_port.to_string())
        .env("RABBITMQ_DIST_PORT", node.dist_port.to_string())
        .env("ERL_EPMD_PORT", node.epmd_port.to_string())
        // 0: each rabbitmqctl run lets the OS pick its distribution port, so
        // concurrent runs cannot collide.
        .env("RABBITMQ_CTL_DIST_PORT_MIN", "0")
        .env("RABBITMQ_CTL_DIST_PORT_MAX", "0")
        .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
        .env("RABBITMQ_LOG_BASE", dir.join("log"))
        .env("RABBITMQ_PID_FILE", dir.join("rabbitmq.pid"))
        .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq.conf"))
        .env("RABBITMQ_ADVANCED_CONFIG_FILE", dir.join("advanced.config"))
        .env("RABBITMQ_CONF_ENV_FILE", dir.join("rabbitmq-env.conf"))
        .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
}

/// The `rabbitmqctl` arguments whose output [`queue_counts_in`] reads.
pub(crate) const QUEUE_COUNTS: [&str; 6] = [
    "list_queues",
    "-q",
    "--no-table-headers",
    "name",
    "messages_ready",
    "messages_unacknowledged",
];

/// `(ready, unacknowledged)` of `queue` in the output of `rabbitmqctl` run with
/// [`QUEUE_COUNTS`], or `None` if it lists no such queue.
///
/// # Panics
/// On a count that is not a number.
pub(crate) fn queue_counts_in(out: &str, queue: &str) -> Option<(u64, u64)> {
    out.lines()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .find(|fields| fields.len() == 3 && fields[0] == queue)
        .map(|fields| {
            let count = |f: &str| {
                f.trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("bad count in {out}"))
            };
            (count(fields[1]), count(fields[2]))
        })
}
