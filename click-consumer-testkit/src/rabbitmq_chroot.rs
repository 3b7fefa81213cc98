//! Which RabbitMQ the tests run: the machine's own (Debian bookworm's 3.10) or
//! RabbitMQ 4 from a Debian trixie chroot, chosen by [`SELECT_ENV`].
//!
//! The chroot is built by `scripts/install-rabbitmq4.sh` (by default in
//! [`DEFAULT_ROOT`]). Its broker, epmd and rabbitmqctl run inside it as its `rabbitmq`
//! user: the child process enters the chroot, drops to that user and only then asks
//! for its parent-death signal (a change of user clears that signal, so the order
//! matters; see `process.rs`). The broker's directory is created inside the chroot's
//! `/tmp`, and every path handed to the broker is the path as seen from inside.
//!
//! RabbitMQ reads `/proc` (its memory monitor crashes without it, and its disk monitor
//! fails): each child gets a private mount namespace with a `/proc` mounted inside the
//! chroot, so nothing stays mounted on the host and nothing needs cleaning up.

use std::ffi::{CString, OsStr};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The environment variable that selects the broker: unset, empty, `3` or `system`
/// for the machine's own RabbitMQ; `4` for the chroot in [`ROOT_ENV`] or
/// [`DEFAULT_ROOT`]; an absolute path for a chroot elsewhere.
pub(crate) const SELECT_ENV: &str = "CLICK_CONSUMER_TEST_RABBITMQ";
/// Overrides where `4` looks for the chroot (`scripts/install-rabbitmq4.sh` reads it too).
pub(crate) const ROOT_ENV: &str = "CLICK_CONSUMER_RABBITMQ4_ROOT";
/// Where `scripts/install-rabbitmq4.sh` builds the chroot by default.
pub(crate) const DEFAULT_ROOT: &str = "/var/cache/click-consumer/rabbitmq4-trixie";
/// What to tell the user when the chroot is missing.
pub(crate) const INSTALL_HINT_4: &str =
    "run `scripts/install-rabbitmq4.sh` (as root) to build the RabbitMQ 4 chroot";

/// A Debian chroot holding rabbitmq-server, and the user the broker runs as there.
#[derive(Debug, Clone)]
pub(crate) struct Chroot {
    root: PathBuf,
    uid: u32,
    gid: u32,
}

/// The chroot that [`SELECT_ENV`] asks for, or None for the machine's own RabbitMQ.
///
/// # Panics
/// If the variable holds something else, or asks for a chroot that is missing,
/// incomplete, or cannot be used (not root): tests must not fall back to another
/// broker silently.
pub(crate) fn selected() -> Option<Chroot> {
    let value = std::env::var(SELECT_ENV).unwrap_or_default();
    chosen_root(&value, std::env::var_os(ROOT_ENV).as_deref()).map(Chroot::open)
}

/// The chroot that `value` (of [`SELECT_ENV`]) names, given [`ROOT_ENV`]'s value.
fn chosen_root(value: &str, root_override: Option<&OsStr>) -> Option<PathBuf> {
    match value.trim() {
        "" | "3" | "system" => None,
        "4" => Some(
            root_override
                .filter(|root| !root.is_empty())
                .map_or_else(|| PathBuf::from(DEFAULT_ROOT), PathBuf::from),
        ),
        path if path.starts_with('/') => Some(PathBuf::from(path)),
        other => panic!(
            "{SELECT_ENV}={other:?}: expected `3` (or unset) for the machine's RabbitMQ, \
             `4` for the RabbitMQ 4 chroot, or the absolute path of a chroot"
        ),
    }
}

impl Chroot {
    fn open(root: PathBuf) -> Chroot {
        let asked = format!(
            "{SELECT_ENV} asks for RabbitMQ from the chroot {}",
            root.display()
        );
        if !root.join("usr/lib/rabbitmq/lib").is_dir() {
            panic!("{asked}, which has no RabbitMQ installed: {INSTALL_HINT_4}");
        }
        let euid = effective_uid();
        if euid != 0 {
            panic!("{asked}; entering a chroot needs root, and this test runs as uid {euid}");
        }
        let (uid, gid) = passwd_entry(&root, "rabbitmq").unwrap_or_else(|| {
            panic!("{asked}, which has no `rabbitmq` user in etc/passwd: {INSTALL_HINT_4}")
        });
        Chroot { root, uid, gid }
    }

    /// The host's path of `inner`, a path inside the chroot.
    pub(crate) fn host_path(&self, inner: &Path) -> PathBuf {
        self.root.join(inner.strip_prefix("/").unwrap_or(inner))
    }

    /// The chroot's path of `host`, a host path under the chroot's root.
    pub(crate) fn inner_path(&self, host: &Path) -> PathBuf {
        let relative = host.strip_prefix(&self.root).unwrap_or_else(|_| {
            panic!(
                "{} is not inside the chroot {}",
                host.display(),
                self.root.display()
            )
        });
        Path::new("/").join(relative)
    }

    /// The chroot's `/tmp`, where the brokers' directories go.
    pub(crate) fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// Gives `dir` and everything in it to the broker's user.
    pub(crate) fn hand_over(&self, dir: &Path) -> io::Result<()> {
        std::os::unix::fs::lchown(dir, Some(self.uid), Some(self.gid))?;
        if dir.is_dir() && !dir.is_symlink() {
            for entry in fs::read_dir(dir)? {
                self.hand_over(&entry?.path())?;
            }
        }
        Ok(())
    }

    /// Makes `cmd` (whose program is a path inside the chroot) run inside the chroot,
    /// in `cwd` (inside), as the broker's user.
    #[allow(unsafe_code)]
    pub(crate) fn confine(&self, cmd: &mut Command, cwd: &Path) {
        let root = c_path(&self.root);
        let proc_dir = c_path(&self.root.join("proc"));
        let cwd = c_path(cwd);
        let (uid, gid) = (self.uid, self.gid);
        let hook = move || {
            // SAFETY: unshare, mount, chroot, chdir, setgroups, setgid and setuid are
            // async-signal-safe system calls; the strings were allocated before the fork
            // and the group list is empty, so nothing here allocates.
            unsafe {
                let private = libc::MS_REC | libc::MS_PRIVATE;
                let proc_flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
                if libc::unshare(libc::CLONE_NEWNS) != 0
                    || libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        private,
                        std::ptr::null(),
                    ) != 0
                    || libc::mount(
                        c"proc".as_ptr(),
                        proc_dir.as_ptr(),
                        c"proc".as_ptr(),
                        proc_flags,
                        std::ptr::null(),
                    ) != 0
                    || libc::chroot(root.as_ptr()) != 0
                    || libc::chdir(cwd.as_ptr()) != 0
                    || libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        };
        // SAFETY: see the hook. It must run before the parent-death hook that
        // spawn_tied adds later (hooks run in the order they were added), because
        // setuid clears the parent-death signal.
        unsafe {
            cmd.pre_exec(hook);
        }
    }
}

#[allow(unsafe_code)]
fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

fn c_path(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes())
        .unwrap_or_else(|_| panic!("{} holds a NUL byte", path.display()))
}

/// `(uid, gid)` of `user` in the chroot's `etc/passwd`.
fn passwd_entry(root: &Path, user: &str) -> Option<(u32, u32)> {
    let passwd = fs::read_to_string(root.join("etc/passwd")).ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 4 && fields[0] == user)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_map_between_host_and_chroot() {
        let chroot = Chroot {
            root: PathBuf::from("/var/cache/x"),
            uid: 1,
            gid: 2,
        };
        assert_eq!(
            chroot.host_path(Path::new("/usr/bin/epmd")),
            Path::new("/var/cache/x/usr/bin/epmd")
        );
        assert_eq!(
            chroot.inner_path(Path::new("/var/cache/x/tmp/b")),
            Path::new("/tmp/b")
        );
    }

    #[test]
    fn the_variable_chooses_the_broker() {
        assert_eq!(chosen_root("", None), None);
        assert_eq!(chosen_root("3", None), None);
        assert_eq!(chosen_root(" system ", None), None);
        assert_eq!(chosen_root("4", None), Some(PathBuf::from(DEFAULT_ROOT)));
        assert_eq!(
            chosen_root("4", Some(OsStr::new("/srv/trixie"))),
            Some(PathBuf::from("/srv/trixie"))
        );
        assert_eq!(
            chosen_root("4", Some(OsStr::new(""))),
            Some(PathBuf::from(DEFAULT_ROOT))
        );
        assert_eq!(
            chosen_root("/opt/rmq", None),
            Some(PathBuf::from("/opt/rmq"))
        );
    }

    #[test]
    #[should_panic(expected = "expected `3` (or unset)")]
    fn an_unknown_choice_fails_loudly() {
        chosen_root("4.0", None);
    }

    #[test]
    fn reads_the_user_from_passwd() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("etc")).unwrap();
        fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nrabbitmq:x:101:102:RabbitMQ:/var/lib/rabbitmq:/usr/sbin/nologin\n",
        )
        .unwrap();
        assert_eq!(passwd_entry(dir.path(), "rabbitmq"), Some((101, 102)));
        assert_eq!(passwd_entry(dir.path(), "nobody"), None);
    }
}
