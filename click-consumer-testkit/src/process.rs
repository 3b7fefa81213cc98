//! Child processes that cannot outlive the test process, and small helpers around them.
//!
//! Every server is spawned by one long-lived thread ("testkit-spawner") with
//! `PR_SET_PDEATHSIG = SIGKILL`. The kernel sends that signal when the thread that
//! forked the child exits; that thread only ends with the process, so the servers die
//! with the test process however it ends (normal exit, panic, SIGKILL).

use std::any::Any;
use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::{Mutex, MutexGuard, OnceLock, mpsc};
use std::thread;
use std::time::{Duration, Instant};

/// What to tell the user when a server is missing.
pub(crate) const INSTALL_HINT: &str =
    "run `scripts/install-services.sh` (as root or with sudo) to install RabbitMQ and ClickHouse";

/// How often readiness and exit are polled.
const POLL: Duration = Duration::from_millis(25);

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

/// Spawns `cmd` so that the kernel kills it (SIGKILL) when this process ends.
pub(crate) fn spawn_tied(mut cmd: Command) -> io::Result<Child> {
    die_with_parent(&mut cmd);
    let (reply_tx, reply_rx) = mpsc::channel();
    spawner()
        .send((cmd, reply_tx))
        .expect("the testkit spawner thread has stopped");
    reply_rx
        .recv()
        .expect("the testkit spawner thread dropped a request")
}

/// The long-lived thread that forks every tied child (see the module docs).
fn spawner() -> &'static mpsc::Sender<SpawnRequest> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        thread::Builder::new()
            .name("testkit-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    // The requester may have given up; nothing to do then.
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("cannot start the testkit spawner thread");
        tx
    })
}

/// Makes the child ask for SIGKILL when its parent thread exits.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut Command) {
    let parent = libc::pid_t::try_from(std::process::id()).expect("pid fits in pid_t");
    let hook = move || {
        // SAFETY: prctl and getppid are async-signal-safe system calls that only take
        // integers; PR_SET_PDEATHSIG reads its second argument as an unsigned long.
        let (status, ppid) = unsafe {
            (
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong),
                libc::getppid(),
            )
        };
        if status != 0 {
            return Err(io::Error::last_os_error());
        }
        // The parent died between fork and prctl: the signal will never come.
        if ppid != parent {
            return Err(io::Error::from_raw_os_error(libc::ESRCH));
        }
        Ok(())
    };
    // SAFETY: the hook runs in the forked child before exec. It only makes
    // async-signal-safe system calls and does not allocate (the io::Error values
    // above hold a plain error number), so it is sound in a fork of a threaded process.
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// Sends SIGTERM to a child that has not been reaped yet.
#[allow(unsafe_code)]
fn send_sigterm(child: &Child) -> io::Result<()> {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits in pid_t");
    // SAFETY: kill(2) has no memory-safety preconditions. The caller holds the
    // un-reaped child, so the pid cannot have been reused by another process.
    if unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One server process that can be stopped, killed and launched again.
#[derive(Debug)]
pub(crate) struct ServerProcess {
    name: &'static str,
    child: Mutex<Option<Child>>,
}

impl ServerProcess {
    /// A slot for a process named `name` in messages; nothing runs yet.
    pub(crate) fn new(name: &'static str) -> ServerProcess {
        ServerProcess {
            name,
            child: Mutex::new(None),
        }
    }

    /// Spawns `cmd` (tied to this process); panics if the previous one still runs.
    pub(crate) fn launch(&self, cmd: Command) {
        let mut slot = self.lock();
        if let Some(old) = slot.as_mut() {
            assert!(
                !matches!(old.try_wait(), Ok(None)),
                "{} is still running (pid {}): stop it before starting it again",
                self.name,
                old.id()
            );
        }
        let child = spawn_tied(cmd)
            .unwrap_or_else(|err| panic!("cannot start {}: {err}; {INSTALL_HINT}", self.name));
        *slot = Some(child);
    }

    /// The exit status if the process has ended (None while it runs or if never launched).
    pub(crate) fn exit_status(&self) -> Option<ExitStatus> {
        self.lock()
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Whether the process was launched and has not ended.
    pub(crate) fn is_running(&self) -> bool {
        self.lock()
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// The process id of the current (or last) launch.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.lock().as_ref().map(Child::id)
    }

    /// SIGTERM, then SIGKILL if it has not exited after `grace`; waits for the exit.
    pub(crate) fn stop(&self, grace: Duration) {
        let mut slot = self.lock();
        let Some(child) = slot.as_mut() else { return };
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        if let Err(err) = send_sigterm(child) {
            panic!("cannot send SIGTERM to {}: {err}", self.name);
        }
        if wait_timeout(child, grace).is_none() {
            eprintln!(
                "testkit: {} ignored SIGTERM for {grace:?}; killing it",
                self.name
            );
            kill_and_reap(self.name, child);
        }
    }

    /// SIGKILL and wait for the exit.
    pub(crate) fn kill(&self) {
        if let Some(child) = self.lock().as_mut() {
            kill_and_reap(self.name, child);
        }
    }

    /// SIGKILL and wait, ignoring errors (for Drop, where a panic could abort).
    pub(crate) fn kill_quietly(&self) {
        if let Some(child) = self.lock().as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Child>> {
        // A panic while holding the lock leaves the Child itself consistent.
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn kill_and_reap(name: &str, child: &mut Child) {
    // Child::kill does not signal a child that was already reaped.
    if let Err(err) = child.kill() {
        panic!("cannot kill {name}: {err}");
    }
    if let Err(err) = child.wait() {
        panic!("cannot wait for {name}: {err}");
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) if Instant::now() >= deadline => return None,
            Ok(None) => thread::sleep(POLL),
            Err(err) => panic!("cannot wait for pid {}: {err}", child.id()),
        }
    }
}

/// Polls `done` until it returns true (then true) or `timeout` passes (then false).
pub(crate) fn wait_for(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(POLL);
    }
}

/// Why a server did not become ready.
#[derive(Debug)]
pub(crate) enum BootFailure {
    /// The process ended before it was ready (a start error, or a port taken meanwhile).
    Exited(ExitStatus),
    /// Still not ready when the time was up.
    TimedOut(Duration),
}

impl std::fmt::Display for BootFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BootFailure::Exited(status) => write!(f, "it exited before it was ready ({status})"),
            BootFailure::TimedOut(limit) => write!(f, "it was not ready within {limit:?}"),
        }
    }
}

/// Waits until `ready` answers true, the process exits, or `timeout` passes.
pub(crate) fn wait_ready(
    server: &ServerProcess,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), BootFailure> {
    let deadline = Instant::now() + timeout;
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(status) = server.exit_status() {
            return Err(BootFailure::Exited(status));
        }
        if Instant::now() >= deadline {
            return Err(BootFailure::TimedOut(timeout));
        }
        thread::sleep(POLL);
    }
}

/// Finds an executable in PATH or in the usual system directories (sbin is often
/// not in a non-root PATH).
pub(crate) fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// PATH for server scripts, which run with an otherwise cleared environment.
pub(crate) fn search_path() -> String {
    std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into())
}

/// The last `lines` lines of each file, for failure messages.
pub(crate) fn log_tail(files: &[PathBuf], lines: usize) -> String {
    files
        .iter()
        .map(|file| {
            format!(
                "--- last {lines} lines of {} ---\n{}",
                file.display(),
                tail(file, lines)
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn tail(file: &Path, lines: usize) -> String {
    match fs::read(file) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(err) => format!("(cannot read: {err})"),
    }
}

/// The text of a panic payload.
pub(crate) fn panic_text(payload: &(dyn Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else {
        "(non-text panic)".to_owned()
    }
}
