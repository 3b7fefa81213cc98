//! A private ClickHouse server (`clickhouse-server` from Debian, 18.16 here).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::http;
use crate::janitor;
use crate::ports::{free_ports, wait_bindable};
use crate::process::{
    BootFailure, INSTALL_HINT, ServerProcess, find_program, log_tail, search_path, wait_ready,
};

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_GRACE: Duration = Duration::from_secs(15);
const PORT_RELEASE_TIMEOUT: Duration = Duration::from_secs(10);
const QUERY_TIMEOUT: Duration = Duration::from_secs(120);
/// Boots tried before giving up. A server that exits during start-up has most likely
/// lost a port: to another process between choosing and binding it (start picks
/// fresh ports then), or to its own previous run not yet gone (restart).
const ATTEMPTS: u32 = 3;

/// A private `clickhouse-server` on free loopback ports, with its configuration,
/// data and logs in a fresh temporary directory.
///
/// The server is killed when this value is dropped and, in any case, when the test
/// process ends (however it ends). The `default` user has no password.
pub struct ClickHouse {
    dir: TempDir,
    binary: PathBuf,
    http_port: u16,
    tcp_port: u16,
    /// The HTTPS port, for a server started with [`ClickHouse::start_with_tls`].
    https_port: Option<u16>,
    server: ServerProcess,
}

impl ClickHouse {
    /// Starts a new server and waits until `GET /ping` answers `Ok.`.
    ///
    /// # Panics
    /// If ClickHouse is not installed (the message says to run
    /// `scripts/install-services.sh`), or if it does not come up within 30 s (the
    /// message holds the end of its logs).
    pub fn start() -> ClickHouse {
        let binary = find_program("clickhouse-server").unwrap_or_else(|| {
            panic!("clickhouse-server is not installed (not in PATH, /usr/sbin, /usr/bin): {INSTALL_HINT}")
        });
        for attempt in 1..=ATTEMPTS {
            let server = ClickHouse::prepare(binary.clone());
            match server.boot() {
                Ok(()) => return server,
                Err(failure @ BootFailure::Exited(_)) if attempt < ATTEMPTS => {
                    eprintln!("testkit: ClickHouse start: {failure}; retrying on fresh ports");
                }
                Err(failure) => server.fail("start", &failure),
            }
        }
        unreachable!("the last attempt either returns or panics")
    }

    /// Starts a server that also serves HTTPS, with a certificate for `localhost` signed
    /// by a private CA made for it (with the `openssl` command); [`ClickHouse::ca_file`]
    /// is that CA.
    ///
    /// # Panics
    /// As [`ClickHouse::start`], or if `openssl` fails.
    pub fn start_with_tls() -> ClickHouse {
        let binary = find_program("clickhouse-server")
            .unwrap_or_else(|| panic!("clickhouse-server is not installed: {INSTALL_HINT}"));
        let mut server = ClickHouse::prepare(binary);
        let [https_port] = free_ports();
        server.https_port = Some(https_port);
        crate::tls::make_certificates(server.dir());
        server.write_config();
        if let Err(failure) = server.boot() {
            server.fail("start with TLS", &failure);
        }
        server
    }

    /// `https://localhost:{https port}` of a server started with
    /// [`ClickHouse::start_with_tls`].
    pub fn https_url(&self) -> String {
        let port = self
            .https_port
            .expect("the server was started with start_with_tls");
        format!("https://localhost:{port}")
    }

    /// The PEM of the CA that signed the HTTPS certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir().join("ca.pem")
    }

    /// The HTTP port on 127.0.0.1.
    pub fn http_port(&self) -> u16 {
        self.http_port
    }

    /// The server's process id, while it runs: for reading its CPU time from
    /// `/proc/<pid>/stat`.
    pub fn pid(&self) -> Option<u32> {
        self.server.pid()
    }

    /// The HTTP base URL, `http://127.0.0.1:{http_port}`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// The directory holding the configuration (`config.xml`), data and logs (`log/`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the server with SIGTERM and waits for it to exit (SIGKILL after 15 s).
    pub fn stop(&self) {
        self.server.stop(STOP_GRACE);
    }

    /// Kills the server with SIGKILL and waits for it to exit.
    pub fn kill(&self) {
        self.server.kill();
    }

    /// Starts the server again on the same ports with the same data (stopping it
    /// first if it runs), and waits until it answers.
    ///
    /// # Panics
    /// If the ports are not released within 10 s or the server does not come up.
    pub fn restart(&self) {
        self.stop();
        let ports = [self.http_port, self.tcp_port];
        if !wait_bindable(&ports, PORT_RELEASE_TIMEOUT) {
            panic!(
                "ClickHouse restart: ports {ports:?} still in use after {PORT_RELEASE_TIMEOUT:?}"
            );
        }
        for attempt in 1..=ATTEMPTS {
            match self.boot() {
                Ok(()) => return,
                Err(failure @ BootFailure::Exited(_)) if attempt < ATTEMPTS => {
                    eprintln!("testkit: ClickHouse restart: {failure}; retrying");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(failure) => self.fail("restart", &failure),
            }
        }
    }

    /// Whether the server process is alive.
    pub fn is_running(&self) -> bool {
        self.server.is_running()
    }

    /// Runs `sql` through the HTTP interface (the query is the POST body) and returns
    /// the response body, e.g. `"1\n"` for `SELECT 1`.
    ///
    /// # Panics
    /// With the server's error text if the status is not 200, or if the server
    /// cannot be reached.
    pub fn query(&self, sql: &str) -> String {
        let response = http::request(self.http_port, "POST", "/", sql, QUERY_TIMEOUT)
            .unwrap_or_else(|err| panic!("ClickHouse query failed: {err}\nquery: {sql}"));
        if response.status != 200 {
            panic!(
                "ClickHouse query failed (HTTP {}): {}\nquery: {sql}",
                response.status,
                response.body.trim_end()
            );
        }
        response.body
    }

    /// A server prepared but not started, for a cluster (`crate::cluster`) that adds
    /// files to its `config.d/` (read by clickhouse-server beside `config.xml`) first;
    /// start it with [`ClickHouse::boot_or_panic`].
    pub(crate) fn unstarted() -> ClickHouse {
        let binary = find_program("clickhouse-server")
            .unwrap_or_else(|| panic!("clickhouse-server is not installed: {INSTALL_HINT}"));
        ClickHouse::prepare(binary)
    }

    /// The native TCP port on 127.0.0.1 (what `remote_servers` of a cluster names).
    pub(crate) fn tcp_port(&self) -> u16 {
        self.tcp_port
    }

    /// Boots a server made by [`ClickHouse::unstarted`].
    pub(crate) fn boot_or_panic(&self) {
        if let Err(failure) = self.boot() {
            self.fail("start", &failure);
        }
    }

    /// A new, not yet started server: fresh directory, ports and configuration.
    fn prepare(binary: PathBuf) -> ClickHouse {
        let dir = tempfile::Builder::new()
            .prefix("testkit-clickhouse-")
            .tempdir()
            .unwrap_or_else(|err| panic!("cannot create a temp dir for ClickHouse: {err}"));
        janitor::remove_after_exit(dir.path());
        let [http_port, tcp_port] = free_ports();
        let server = ClickHouse {
            dir,
            binary,
            http_port,
            tcp_port,
            https_port: None,
            server: ServerProcess::new("clickhouse-server"),
        };
        server.write_config();
        server
    }

    fn config_path(&self) -> PathBuf {
        self.dir().join("config.xml")
    }

    fn write_config(&self) {
        let dir = self.dir().display().to_string();
        let mut config = config_xml(&dir, self.http_port, self.tcp_port);
        if let Some(https_port) = self.https_port {
            let tls = format!(
                "    <https_port>{https_port}</https_port>\n    <openSSL><server>\n        \
                 <certificateFile>{dir}/server.pem</certificateFile>\n        \
                 <privateKeyFile>{dir}/server.key</privateKeyFile>\n        \
                 <verificationMode>none</verificationMode>\n        \
                 <loadDefaultCAFile>false</loadDefaultCAFile>\n        \
                 <disableProtocols>sslv2,sslv3</disableProtocols>\n    </server></openSSL>\n</yandex>"
            );
            config = config.replace("</yandex>", &tls);
        }
        fs::write(self.config_path(), config)
            .unwrap_or_else(|err| panic!("cannot write the ClickHouse config in {dir}: {err}"));
    }

    fn boot(&self) -> Result<(), BootFailure> {
        self.server.launch(self.command());
        wait_ready(&self.server, READY_TIMEOUT, || self.answers_ping())
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg(format!("--config-file={}", self.config_path().display()))
            .current_dir(self.dir())
            .env_clear()
            .env("PATH", search_path())
            // Servers from 21.x fork a watchdog when no terminal is attached: without
            // it, the process started is the server itself (its pid, its CPU time, its
            // kill). 18.16 has none and ignores this.
            .env("CLICKHOUSE_WATCHDOG_ENABLE", "0")
            .stdin(Stdio::null())
            .stdout(self.output_log())
            .stderr(self.output_log())
            .process_group(0);
        cmd
    }

    /// Where the server's own stdout and stderr go (start-up errors land here).
    fn output_log(&self) -> File {
        let path = self.dir().join("stdout.log");
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|err| panic!("cannot open {}: {err}", path.display()))
    }

    fn answers_ping(&self) -> bool {
        let timeout = Duration::from_secs(2);
        http::request(self.http_port, "GET", "/ping", "", timeout)
            .is_ok_and(|response| response.status == 200 && response.body.starts_with("Ok."))
    }

    fn fail(&self, what: &str, failure: &BootFailure) -> ! {
        let logs = [
            self.dir().join("stdout.log"),
            self.dir().join("log/clickhouse-server.err.log"),
        ];
        panic!(
            "ClickHouse {what} failed: {failure} (http port {}, dir {}).\n{}\n\
             If clickhouse-server is missing or broken, {INSTALL_HINT}.",
            self.http_port,
            self.dir().display(),
            log_tail(&logs, 30)
        );
    }
}

fn config_xml(dir: &str, http_port: u16, tcp_port: u16) -> String {
    // `TESTKIT_CLICKHOUSE_LOG_LEVEL=debug` logs every query with its client's port.
    let level =
        std::env::var("TESTKIT_CLICKHOUSE_LOG_LEVEL").unwrap_or_else(|_| "information".into());
    format!(
        r#"<?xml version="1.0"?>
<yandex>
    <logger>
        <level>{level}</level>
        <log>{dir}/log/clickhouse-server.log</log>
        <errorlog>{dir}/log/clickhouse-server.err.log</errorlog>
        <console>0</console>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>{http_port}</http_port>
    <tcp_port>{tcp_port}</tcp_port>
    <path>{dir}/data/</path>
    <tmp_path>{dir}/tmp/</tmp_path>
    <user_files_path>{dir}/user_files/</user_files_path>
    <format_schema_path>{dir}/format_schemas/</format_schema_path>
    <mark_cache_size>268435456</mark_cache_size>
    <uncompressed_cache_size>268435456</uncompressed_cache_size>
    <profiles>
        <default/>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default/>
    </quotas>
</yandex>
"#
    )
}

impl fmt::Debug for ClickHouse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClickHouse")
            .field("http_port", &self.http_port)
            .field("tcp_port", &self.tcp_port)
            .field("dir", &self.dir())
            .field("pid", &self.server.pid())
            .field("running", &self.is_running())
            .finish()
    }
}

impl Drop for ClickHouse {
    fn drop(&mut self) {
        self.server.kill_quietly();
        // The TempDir field removes the directory next.
    }
}
