//! Network partitions on loopback: TCP traffic silently dropped (no reset, no refusal)
//! until the [`Partition`] guard is dropped.
//!
//! Each partition is one nftables table of its own (`ip testkit_<pid>_<n>`) whose
//! input chain drops the packets of the cut connections in both directions. Dropping in
//! the input hook, not the output hook, keeps the sender unaware: its `connect` and
//! `send` succeed and then nothing comes back, as on a real network that lost a link.
//! The table is deleted when the guard is dropped and, should the test process die
//! first, by the cleanup process just after it ends (see `janitor`), so a failed test
//! never leaves the machine partitioned.
//!
//! Needs root (or `CAP_NET_ADMIN`) and the `nft` program (Debian's `nftables`).

use std::fmt;
use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::janitor;
use crate::process::{find_program, spawn_tied};

/// The TCP connections opened from one local address to one port (on any local
/// address): the unit a [`Partition`] cuts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Flow {
    /// The address the connecting side binds (its source address).
    pub from: Ipv4Addr,
    /// The port the listening side accepts on.
    pub to_port: u16,
}

/// Cut TCP connections, restored when this guard is dropped.
pub struct Partition {
    nft: std::path::PathBuf,
    table: String,
    flows: Vec<Flow>,
}

impl Partition {
    /// Drops every packet of `flows`, both directions: a connection already open
    /// hangs, a new one times out.
    ///
    /// # Panics
    /// If `nft` is missing or refuses the rules (not root): a test that asked for a
    /// partition must not run without one.
    pub fn cut(flows: &[Flow]) -> Partition {
        static COUNT: AtomicU64 = AtomicU64::new(0);
        let nft = find_program("nft").unwrap_or_else(|| {
            panic!(
                "a partition needs `nft` (Debian's nftables) and root: run `scripts/install-services.sh`"
            )
        });
        let table = format!(
            "testkit_{}_{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        );
        // Registered before the rules exist (deleting a table that was never made is
        // a harmless error): without the cleanup process, a test killed now would
        // leave the machine partitioned, so no partition then.
        assert!(
            janitor::delete_nft_table_after_exit(&table),
            "no partition without the cleanup process that heals it if this process dies"
        );
        let partition = Partition {
            nft,
            table,
            flows: flows.to_vec(),
        };
        if let Err(err) = partition.nft(&ruleset(&partition.table, flows)) {
            panic!("cannot cut {flows:?}: nft failed (a partition needs root): {err}");
        }
        partition
    }

    /// The flows this partition cuts.
    pub fn flows(&self) -> &[Flow] {
        &self.flows
    }

    /// Restores the traffic now (what dropping the guard does).
    pub fn heal(self) {}

    /// Runs `nft -f -` with `script` on stdin.
    fn nft(&self, script: &str) -> Result<(), String> {
        let mut cmd = Command::new(&self.nft);
        cmd.args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = spawn_tied(cmd).map_err(|err| err.to_string())?;
        child
            .stdin
            .take()
            .expect("piped stdin")
            .write_all(script.as_bytes())
            .map_err(|err| err.to_string())?;
        let output = child.wait_with_output().map_err(|err| err.to_string())?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }
}

/// The nftables script that creates `table` with a rule pair per flow.
fn ruleset(table: &str, flows: &[Flow]) -> String {
    let rules: String = flows
        .iter()
        .map(|Flow { from, to_port }| {
            format!(
                "    ip saddr {from} tcp dport {to_port} drop\n    ip daddr {from} tcp sport {to_port} drop\n"
            )
        })
        .collect();
    format!(
        "table ip {table} {{\n  chain input {{\n    type filter hook input priority filter; policy accept;\n{rules}  }}\n}}\n"
    )
}

impl fmt::Debug for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Partition")
            .field("table", &self.table)
            .field("flows", &self.flows)
            .finish()
    }
}

impl Drop for Partition {
    fn drop(&mut self) {
        if let Err(err) = self.nft(&format!("delete table ip {}\n", self.table)) {
            eprintln!(
                "testkit: cannot heal partition {} (it is removed when the test process ends): {err}",
                self.table
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_drop_both_directions_of_each_flow() {
        let flows = [Flow {
            from: Ipv4Addr::new(127, 0, 0, 11),
            to_port: 4000,
        }];
        let ruleset = ruleset("testkit_1_0", &flows);
        assert!(ruleset.starts_with("table ip testkit_1_0 {"), "{ruleset}");
        assert!(ruleset.contains("hook input"), "{ruleset}");
        for rule in [
            "ip saddr 127.0.0.11 tcp dport 4000 drop",
            "ip daddr 127.0.0.11 tcp sport 4000 drop",
        ] {
            assert!(ruleset.contains(rule), "{rule} missing from {ruleset}");
        }
    }
}
