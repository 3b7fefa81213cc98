//! What the results were measured on: the machine, the date, the commit, the servers.

use std::{fs, process::Command};

use serde::Serialize;

use crate::stack::Servers;
use crate::time::Utc;

#[derive(Debug, Clone, Serialize)]
pub(crate) struct Machine {
    pub(crate) nproc: usize,
    pub(crate) cpu_model: String,
    pub(crate) memory_gib: f64,
    pub(crate) kernel: String,
    pub(crate) rabbitmq: String,
    pub(crate) clickhouse: String,
}

impl Machine {
    pub(crate) fn describe(servers: &Servers) -> Machine {
        Machine {
            nproc: std::thread::available_parallelism().map_or(0, usize::from),
            cpu_model: cpu_model().unwrap_or_else(|| "unknown".to_owned()),
            memory_gib: memory_kib().map_or(f64::NAN, |kib| kib as f64 / 1024.0 / 1024.0),
            kernel: read_trimmed("/proc/sys/kernel/osrelease")
                .unwrap_or_else(|| "unknown".to_owned()),
            rabbitmq: servers.rabbitmq_version(),
            clickhouse: servers.clickhouse_version(),
        }
    }
}

/// The machine's CPU time so far, all cores (`/proc/stat`'s `cpu` line), in ticks.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CpuTimes {
    total: u64,
    /// Time the hypervisor gave this machine's virtual CPUs to someone else.
    steal: u64,
}

impl CpuTimes {
    /// `None` where `/proc/stat` cannot be read or has no steal field.
    pub(crate) fn now() -> Option<CpuTimes> {
        CpuTimes::parse(&fs::read_to_string("/proc/stat").ok()?)
    }

    fn parse(stat: &str) -> Option<CpuTimes> {
        let line = stat.lines().find(|line| line.starts_with("cpu "))?;
        // user nice system idle iowait irq softirq steal guest guest_nice; guest time
        // is already counted in user and nice.
        let ticks: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|field| field.parse().ok())
            .collect::<Option<_>>()?;
        Some(CpuTimes {
            total: ticks.iter().sum(),
            steal: *ticks.get(7)?,
        })
    }

    /// The percentage of the machine's CPU time stolen between `self` and `later`.
    pub(crate) fn steal_percent(self, later: CpuTimes) -> Option<f64> {
        let total = later.total.checked_sub(self.total).filter(|&t| t > 0)?;
        let steal = later.steal.checked_sub(self.steal)?;
        Some(steal as f64 / total as f64 * 100.0)
    }
}

/// The date of a run, in UTC.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct RunDate {
    pub(crate) utc: String,
    /// For file names.
    pub(crate) compact: String,
}

impl RunDate {
    pub(crate) fn now() -> RunDate {
        let now = Utc::now();
        RunDate {
            utc: now.rfc3339(),
            compact: now.compact(),
        }
    }
}

/// `git rev-parse --short HEAD`; `None` outside a git checkout or without git.
pub(crate) fn git_commit() -> Option<String> {
    run("git", &["rev-parse", "--short", "HEAD"]).filter(|head| !head.is_empty())
}

/// `--version` of a binary.
pub(crate) fn version_of(binary: &std::path::Path) -> Option<String> {
    run(binary.to_str()?, &["--version"])
}

fn run(program: &str, args: &[&str]) -> Option<String> {
    let output = Command::new(program).args(args).output().ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).trim().to_owned())
}

fn cpu_model() -> Option<String> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").ok()?;
    cpuinfo
        .lines()
        .find(|line| line.starts_with("model name"))
        .and_then(|line| line.split_once(':'))
        .map(|(_, model)| model.trim().to_owned())
}

fn memory_kib() -> Option<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
    meminfo
        .lines()
        .find_map(|line| line.strip_prefix("MemTotal:"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

fn read_trimmed(path: &str) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steal_is_a_share_of_all_cpu_time() {
        let before = "cpu  100 0 50 800 10 0 0 40 7 0\ncpu0 50 0 25 400 5 0 0 20 0 0\n";
        let after = "cpu  200 0 100 1500 10 0 0 190 9 0\n";
        let (before, after) = (
            CpuTimes::parse(before).unwrap(),
            CpuTimes::parse(after).unwrap(),
        );
        // 1,000 ticks passed (guest time is inside user), 150 of them stolen.
        assert_eq!(before.steal_percent(after), Some(15.0));
        assert_eq!(after.steal_percent(after), None);
        assert!(CpuTimes::parse("cpu  1 2 3 4 5 6 7\n").is_none());
    }
}
