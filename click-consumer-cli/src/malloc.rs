//! glibc's allocator, held to one arena.
//!
//! By default glibc gives each thread that allocates an arena of its own (up to eight per
//! core). In this consumer lapin's I/O thread allocates every delivery and a runtime
//! worker frees it; memory freed into one arena is not reused by another, and shows as
//! resident memory that holds nothing. With one arena, draining 200,000 clicks on the
//! benchmark (`scripts/bench.sh`, 2026-11-30, 2 repeats each) peaked at 25.3-25.5 MiB
//! against 27.2-28.0 with glibc's default, and used no more CPU (9.5-9.9 CPU-s per 1M
//! clicks, against 11.4-12.3); the threads share the arena's lock, and glibc's
//! per-thread cache keeps most small allocations off it.
//!
//! Tried and not kept: a fixed 128 KiB mmap threshold (another 0.9 MiB less) mapped and
//! unmapped every large message's body and the INSERT's compressed block each time; it
//! cost 2.4× the CPU on 700 KB messages and about a fifth more on normal clicks.
//!
//! The environment wins: with `MALLOC_ARENA_MAX` (not empty) or the tunable
//! `glibc.malloc.arena_max` in `GLIBC_TUNABLES` set, glibc has read it before `main` and
//! this leaves it alone. Other C libraries and other targets are not touched. The
//! library does none of this: an application that embeds it chooses its own allocator.

/// Limits glibc to one arena unless the environment sets the number of arenas. Call first thing
/// in `main`, before any other thread starts.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
pub(crate) fn tune() {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    let tunable =
        std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.arena_max"));
    if set("MALLOC_ARENA_MAX") || tunable {
        return;
    }
    // SAFETY: `mallopt` takes two integers and only changes the allocator's parameters;
    // glibc serialises it against allocation. Were the value refused (it returns 0),
    // glibc's default stays, which is correct, only less lean.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Not glibc: nothing to tune.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn tune() {}
