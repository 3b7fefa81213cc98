//! Child processes whose resource usage we measure: each is reaped by `wait4` on a
//! thread of its own, which records when it exited and its CPU time (user + system,
//! over its whole life).
//!
//! Peak memory is *not* taken from `ru_maxrss`: a child spawned the way std spawns
//! (posix_spawn, which shares the parent's memory until exec) starts its `ru_maxrss`
//! at the parent's own peak RSS, since the kernel folds the pre-exec address space's
//! high-water mark into it. The benchmark's own RSS would show up as the consumer's.
//! Instead, [`peak_rss_kib`] reads `VmHWM` from `/proc/<pid>/status`: the high-water
//! mark of the process's own address space, which is read while it still runs.

use std::{
    fs, io,
    io::Read,
    os::unix::process::ExitStatusExt,
    process::{ChildStdout, Command, ExitStatus},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    thread,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context, bail};

/// User plus system CPU time of process `pid` so far, from `/proc/<pid>/stat`; `None`
/// if it cannot be read (gone).
pub(crate) fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces, in parentheses): state is
    // field 3, utime field 14, stime field 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(
        ticks as f64 / clock_ticks_per_second(),
    ))
}

#[allow(unsafe_code)]
fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a system constant.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// A child process that has exited and been reaped.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reaped {
    pub(crate) status: ExitStatus,
    /// When `wait4` returned.
    pub(crate) at: Instant,
    /// User plus system CPU time.
    pub(crate) cpu: Duration,
}

/// Peak resident set size (`VmHWM`) of process `pid` (or `"self"`) in KiB; `None` once
/// it has exited.
pub(crate) fn peak_rss_kib(pid: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmHWM:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// A running child, reaped in the background. Killed (SIGKILL) if dropped before it
/// has exited.
#[derive(Debug)]
pub(crate) struct Watched {
    name: String,
    pid: u32,
    spawned: Instant,
    /// The wall clock at `spawned`, to place file times (see [`Watched::at`]).
    spawned_wall: SystemTime,
    exit: Receiver<io::Result<Reaped>>,
    reaped: Option<Reaped>,
    stdout: Option<ChildStdout>,
}

impl Watched {
    /// Spawns `command` and starts reaping it.
    pub(crate) fn spawn(name: &str, mut command: Command) -> anyhow::Result<Watched> {
        let spawned = Instant::now();
        let spawned_wall = SystemTime::now();
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {name} ({command:?})"))?;
        let pid = child.id();
        let stdout = child.stdout.take();
        // The reaper thread is the only one to wait for this pid; `child` is dropped
        // without waiting (dropping a `Child` neither waits nor kills).
        drop(child);
        let (sender, exit) = mpsc::channel();
        thread::Builder::new()
            .name(format!("reap-{pid}"))
            .spawn(move || {
                let result = wait4(pid as libc::pid_t);
                let _ = sender.send(result);
            })
            .context("cannot start a reaper thread")?;
        Ok(Watched {
            name: name.to_owned(),
            pid,
            spawned,
            spawned_wall,
            exit,
            reaped: None,
            stdout,
        })
    }

    pub(crate) fn spawned(&self) -> Instant {
        self.spawned
    }

    /// The instant of wall-clock time `wall` (a file's modification time, say), by its
    /// distance from the spawn; `None` if `wall` is before the spawn.
    pub(crate) fn at(&self, wall: SystemTime) -> Option<Instant> {
        Some(self.spawned + wall.duration_since(self.spawned_wall).ok()?)
    }

    /// Its peak RSS so far, in KiB; `None` once it has exited.
    pub(crate) fn peak_rss_kib(&self) -> Option<u64> {
        peak_rss_kib(&self.pid.to_string())
    }

    /// Everything it wrote on its standard output (when spawned with `Stdio::piped()`);
    /// call once it has exited.
    pub(crate) fn read_stdout(&mut self) -> anyhow::Result<String> {
        let mut out = String::new();
        if let Some(stdout) = self.stdout.as_mut() {
            stdout
                .read_to_string(&mut out)
                .with_context(|| format!("cannot read the output of {}", self.name))?;
        }
        Ok(out)
    }

    /// The exit, if the process has exited.
    pub(crate) fn try_exited(&mut self) -> anyhow::Result<Option<Reaped>> {
        self.wait_exit(Duration::ZERO)
    }

    /// Waits up to `limit` for the process to exit.
    pub(crate) fn wait_exit(&mut self, limit: Duration) -> anyhow::Result<Option<Reaped>> {
        if self.reaped.is_none() {
            match self.exit.recv_timeout(limit) {
                Ok(result) => {
                    let reaped =
                        result.with_context(|| format!("wait4 for {} failed", self.name))?;
                    self.reaped = Some(reaped);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("the reaper thread of {} is gone", self.name)
                }
            }
        }
        Ok(self.reaped)
    }

    /// An error if the process has exited (it should still be running).
    pub(crate) fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.try_exited()? {
            None => Ok(()),
            Some(reaped) => bail!("{} exited unexpectedly ({})", self.name, reaped.status),
        }
    }

    /// Sends SIGTERM and waits up to `limit` for the exit, which must be a success.
    pub(crate) fn terminate(&mut self, limit: Duration) -> anyhow::Result<Reaped> {
        if self.try_exited()?.is_none() {
            self.signal("-TERM")?;
        }
        let reaped = self
            .wait_exit(limit)?
            .with_context(|| format!("{} did not exit within {limit:?} of SIGTERM", self.name))?;
        if !reaped.status.success() {
            bail!("{} exited with {} after SIGTERM", self.name, reaped.status);
        }
        Ok(reaped)
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let status = Command::new("kill")
            .args([signal, &self.pid.to_string()])
            .status()
            .context("cannot run kill")?;
        anyhow::ensure!(status.success(), "kill {signal} {} failed", self.pid);
        Ok(())
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if matches!(self.try_exited(), Ok(None)) {
            let _ = self.signal("-KILL");
            let _ = self.wait_exit(Duration::from_secs(5));
        }
    }
}

/// Waits for the child `pid` to exit and returns its exit status and CPU time.
#[allow(unsafe_code)]
fn wait4(pid: libc::pid_t) -> io::Result<Reaped> {
    let mut status: libc::c_int = 0;
    // SAFETY: `rusage` is a plain C struct of integers, for which all-zero bytes are a
    // valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `status` and `usage` are valid, writable and outlive the call; `pid` is
        // a child of this process that nothing else waits for.
        let reaped = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if reaped == pid {
            break;
        }
        let error = io::Error::last_os_error();
        if error.kind() != io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
    Ok(Reaped {
        status: ExitStatus::from_raw(status),
        at: Instant::now(),
        cpu: duration(usage.ru_utime) + duration(usage.ru_stime),
    })
}

fn duration(time: libc::timeval) -> Duration {
    let seconds = u64::try_from(time.tv_sec).unwrap_or(0);
    let micros = u64::try_from(time.tv_usec).unwrap_or(0);
    Duration::from_secs(seconds) + Duration::from_micros(micros)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_cpu_time_of_a_running_process() {
        let pid = std::process::id();
        let before = cpu_time(pid).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut spin = 0u64;
        // Spin until the kernel has counted 200 ms more of CPU for this process.
        while cpu_time(pid).unwrap() < before + Duration::from_millis(200) {
            assert!(Instant::now() < deadline, "CPU time did not grow");
            for _ in 0..100_000 {
                spin = std::hint::black_box(spin.wrapping_add(1));
            }
        }
        assert!(spin > 0);
        assert_eq!(cpu_time(u32::MAX), None);
    }

    #[test]
    fn reaps_with_cpu_time() {
        let mut command = Command::new("sh");
        command.args(["-c", "i=0; while [ $i -lt 20000 ]; do i=$((i+1)); done"]);
        let mut child = Watched::spawn("sh", command).unwrap();
        let reaped = child.wait_exit(Duration::from_secs(30)).unwrap().unwrap();
        assert!(reaped.status.success());
        assert!(reaped.cpu > Duration::ZERO);
    }

    #[test]
    fn peak_rss_is_the_childs_own() {
        // This test process holds more than the child will ever touch.
        let ballast = vec![1u8; 64 << 20];
        let mut command = Command::new("sleep");
        command.arg("30");
        let mut child = Watched::spawn("sleep", command).unwrap();
        thread::sleep(Duration::from_millis(100));
        let child_peak = child.peak_rss_kib().unwrap();
        assert!(child_peak > 0 && child_peak < 32 << 10, "{child_peak} KiB");
        assert!(peak_rss_kib("self").unwrap() >= 64 << 10);
        child.ensure_running().unwrap();
        let err = child.terminate(Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("after SIGTERM"), "{err}");
        assert_eq!(child.peak_rss_kib(), None);
        drop(ballast);
    }
}
