//! Removes the servers' temporary directories after the test process is gone.
//!
//! Statics are never dropped, and a killed process runs no code at all, so the
//! directories of the shared servers cannot be removed from inside. Instead one small
//! `sh` per test process reads directory names from a pipe whose write end only this
//! process holds (close-on-exec, so no other child inherits it). When this process
//! ends, however it ends, the pipe reaches end-of-file and the shell removes the
//! directories, a few times over while the killed servers finish dying.

use std::io::Write;
use std::path::Path;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{Mutex, OnceLock};

use std::os::unix::process::CommandExt;

const SCRIPT: &str = r#"
trap '' INT HUP
dirs=''
while IFS= read -r dir; do
    dirs="$dirs$dir
"
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
    let Some(pipe) = janitor() else { return };
    let mut pipe = pipe.lock().unwrap_or_else(|e| e.into_inner());
    if let Err(err) = writeln!(pipe, "{}", dir.display()) {
        eprintln!(
            "testkit: cannot hand {} to the cleanup process: {err}",
            dir.display()
        );
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
