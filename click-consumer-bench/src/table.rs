//! The ClickHouse side of a measurement: the table's merges, its row count, its parts, and the latency phase's sequence numbers.

use std::{
    fs,
    path::Path,
    time::{Duration, SystemTime},
};

use click_consumer_testkit::ClickHouse;
use serde::Serialize;

use crate::events::SEQUENCE_PREFIX;

/// INSERTs smaller than this count as small in [`Parts::small`].
pub(crate) const SMALL_INSERT_ROWS: u64 = 1_000;

/// A measurement's table, `database.table`.
#[derive(Debug)]
pub(crate) struct Table<'a> {
    clickhouse: &'a ClickHouse,
    database: String,
    table: String,
}

/// The active parts of a table whose merges were stopped: one per INSERT.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Parts {
    pub(crate) count: u64,
    pub(crate) min_rows: u64,
    pub(crate) median_rows: f64,
    pub(crate) max_rows: u64,
    /// Parts of fewer than [`SMALL_INSERT_ROWS`] rows.
    pub(crate) small: u64,
    /// Rows of the last part (highest block number): the last INSERT.
    pub(crate) last_rows: u64,
}

impl Parts {
    /// Small parts other than the last one.
    pub(crate) fn small_not_last(&self) -> u64 {
        self.small - u64::from(self.small > 0 && self.last_rows < SMALL_INSERT_ROWS)
    }
}

impl<'a> Table<'a> {
    pub(crate) fn new(clickhouse: &'a ClickHouse, database: &str, table: &str) -> Table<'a> {
        Table {
            clickhouse,
            database: database.to_owned(),
            table: table.to_owned(),
        }
    }

    pub(crate) fn qualified(&self) -> String {
        format!("{}.{}", self.database, self.table)
    }

    /// Stops merges on the table, so that every INSERT from now on stays one part
    /// (`SYSTEM STOP MERGES db.table` works on ClickHouse 18.16).
    pub(crate) fn stop_merges(&self) {
        self.clickhouse
            .query(&format!("SYSTEM STOP MERGES {}", self.qualified()));
    }

    /// When ClickHouse wrote its newest active part: the latest modification time of
    /// any file in any part's directory (`system.parts.path`, on this machine), plus
    /// the resolution of the kernel's coarse clock that file times are taken from (so
    /// the result is not before the write). With merges stopped, that is when the last
    /// INSERT's rows were written, just before the part was renamed into place and its
    /// rows counted.
    pub(crate) fn last_part_written(&self) -> anyhow::Result<SystemTime> {
        let out = self.clickhouse.query(&format!(
            "SELECT path FROM system.parts WHERE database = '{}' AND table = '{}' AND active",
            self.database, self.table
        ));
        let mut last = None;
        for part in out.lines().filter(|line| !line.is_empty()) {
            for file in fs::read_dir(Path::new(part))
                .map_err(|err| anyhow::anyhow!("cannot list part `{part}`: {err}"))?
            {
                let modified = file?.metadata()?.modified()?;
                last = last.max(Some(modified));
            }
        }
        let last = last.ok_or_else(|| anyhow::anyhow!("{} has no parts", self.qualified()))?;
        let nanos = last
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |since| since.subsec_nanos());
        anyhow::ensure!(
            nanos != 0,
            "the file times of ClickHouse's parts have no sub-second part: this filesystem \
             cannot time the drain"
        );
        Ok(last + coarse_clock_resolution())
    }

    pub(crate) fn count(&self) -> u64 {
        let out = self
            .clickhouse
            .query(&format!("SELECT count() FROM {}", self.qualified()));
        parse(out.trim())
    }

    pub(crate) fn parts(&self) -> Parts {
        let out = self.clickhouse.query(&format!(
            "SELECT count(), min(rows), median(rows), max(rows), countIf(rows < {SMALL_INSERT_ROWS}), \
             argMax(rows, max_block_number) FROM system.parts WHERE active AND database = '{}' AND table = '{}'",
            self.database, self.table
        ));
        let fields: Vec<&str> = out.split_whitespace().collect();
        assert_eq!(fields.len(), 6, "unexpected system.parts answer: {out:?}");
        Parts {
            count: parse(fields[0]),
            min_rows: parse(fields[1]),
            median_rows: parse(fields[2]),
            max_rows: parse(fields[3]),
            small: parse(fields[4]),
            last_rows: parse(fields[5]),
        }
    }

    /// The sequence numbers of the latency phase's rows from `lowest` on. The bound on
    /// the short code (zero-padded, so it sorts like the number) lets ClickHouse skip by
    /// primary key what was seen before.
    pub(crate) fn sequence_numbers_from(&self, lowest: u64) -> Vec<u64> {
        let out = self.clickhouse.query(&format!(
            "SELECT toUInt64(substring(short_code, {})) FROM {} WHERE short_code >= '{}' \
             FORMAT TabSeparated",
            SEQUENCE_PREFIX.len() + 1,
            self.qualified(),
            crate::events::sequence_code(lowest)
        ));
        out.lines().map(parse).collect()
    }

    pub(crate) fn drop_database(&self) {
        self.clickhouse
            .query(&format!("DROP DATABASE IF EXISTS {}", self.database));
    }
}

/// The resolution of `CLOCK_REALTIME_COARSE` (one kernel tick, 1-10 ms), which stamps
/// files' modification times; 10 ms if it cannot be read.
#[allow(unsafe_code)]
fn coarse_clock_resolution() -> Duration {
    let mut res = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `res` is a valid, writable timespec that outlives the call.
    if unsafe { libc::clock_getres(libc::CLOCK_REALTIME_COARSE, &mut res) } == 0 {
        Duration::new(res.tv_sec as u64, res.tv_nsec as u32)
    } else {
        Duration::from_millis(10)
    }
}

fn parse<T: std::str::FromStr>(text: &str) -> T {
    text.parse()
        .unwrap_or_else(|_| panic!("unexpected ClickHouse answer: {text:?}"))
}
