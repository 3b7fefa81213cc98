//! Removes the servers' temporary directories, and heals partitions (deletes their
//! nftables tables), after the test process is gone.
//!
//! Statics are never dropped, and a killed process runs no code at all, so the
//! directories of the shared servers cannot be removed from inside. Instead one small
//! `sh` per test process reads what to clean from a pipe whose write end only this
//! process holds (close-on-exec, so no other child inherits it). When this process
//! ends, however it ends, the pipe reaches end-of-file and the shell deletes the
//! nftables tables at once, then removes the directories, a few times over while the
//! killed servers finish dying. Each line is `dir <path>` or `nft <table>`.

use std::io::Write;
use std::path::Path;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};

use std::os::unix::process::CommandExt;

const SCRIPT: &str = r#"
trap '' INT HUP
PATH="$PATH:/usr/sbin:/sbin"
dirs=''
tables=''
while IFS= read -r line; do
    case "$line" in
        'dir '*) dirs="$dirs${line#dir }
" ;;
        'nft '*) tables="$tables${line#nft }
" ;;
    esac
done
printf '%s' "$tables" | while IFS= read -r table; do
    [ -n "$table" ] && nft delete table ip "$table" 2>/dev/null
done
for attempt in 1 2 3; do
    sleep 1
    printf '%s' "$dirs" | while IFS= read -r dir; do
        [ -n "$dir" ] && rm -rf -- "$dir"
    done
done
"#;

/// Arranges for `dir` to be removed once this process has exited.
pub(crate) fn remove_after_exit(dir: &Path) {
    hand_over(&format!("dir {}", dir.display()));
}

/// Arranges for nftables table `ip <table>` to be deleted once this process has exited
/// (nothing happens if it is gone by then). Returns false if the cleanup process
/// could not take it.
pub(crate) fn delete_nft_table_after_exit(table: &str) -> bool {
    hand_over(&format!("nft {table}"))
}

fn hand_over(line: &str) -> bool {
    let Some(pipe) = janitor() else { return false };
    let mut pipe = pipe.lock().unwrap_or_else(|e| e.into_inner());
    match writeln!(pipe, "{line}") {
        Ok(()) => true,
        Err(err) => {
            eprintln!("testkit: cannot hand `{line}` to the cleanup process: {err}");
            false
        }
    }
}

fn janitor() -> Option<&'static Mutex<ChildStdin>> {
    static JANITOR: OnceLock<Option<Mutex<ChildStdin>>> = OnceLock::new();
    JANITOR.get_or_init(spawn_janitor).as_ref()
}

fn spawn_janitor() -> Option<Mutex<ChildStdin>> {
    let spawned = Command::new("sh")
        .args(["-c", SCRIPT])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        // Out of the terminal's foreground group: Ctrl-C must not stop the cleanup.
        .process_group(0)
        .spawn();
    match spawned {
        // The Child handle is dropped on purpose: the shell lives until this process ends.
        Ok(mut child) => child.stdin.take().map(Mutex::new),
        Err(err) => {
            eprintln!("testkit: cannot start the cleanup process (temp dirs may be left): {err}");
            None
        }
    }
}
