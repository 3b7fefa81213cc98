//! Committing a flushed batch: INSERT (retried with backoff while ClickHouse is failing,
//! split to find the rows it refuses), hand refused rows to the dead-letter outbox, then
//! acknowledge the stored rows (see `ack` for how few frames that takes).
//!
//! A message is acknowledged only after its row is committed in ClickHouse or its copy
//! is confirmed in the dead-letter queue; the outbox acknowledges the latter itself, so
//! stored rows never wait for dead letters (which a blocked broker may hold back).

use std::{
    ops::Range,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::ack::{Acker, Settle};
use crate::backoff::Backoff;
use crate::batch::{BatchParts, Recycler, RefusedRow};
use crate::dead_letter::DeadLetters;
use crate::error::Error;
use crate::event::{InvalidKind, InvalidMessage};
use crate::metrics::Metrics;
use crate::store::{InsertFailure, Store};

/// The most INSERTs spent looking for the rows ClickHouse refuses in one batch.
const SEARCH_MAX_INSERTS: usize = 200;
/// The longest the search for refused rows may take. With the release limit, this keeps
/// a batch's messages well below RabbitMQ's `consumer_timeout` (30 min by default).
const SEARCH_MAX_TIME: Duration = Duration::from_secs(120);

/// What a consumer reports to an [`on_commit`](crate::Consumer::on_commit) hook after
/// each acknowledged batch.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CommitReport {
    /// Rows committed to ClickHouse by this batch.
    pub rows: usize,
    /// Rows of this batch that ClickHouse refused and that went to the dead-letter queue.
    pub dead_lettered: usize,
    /// Time spent in INSERTs, retries included.
    pub insert_duration: Duration,
}

/// A callback run after each acknowledged batch.
pub(crate) type CommitHook = Arc<dyn Fn(&CommitReport) + Send + Sync>;

/// How a commit ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Stored (or handed to the dead-letter outbox) and acknowledged.
    Committed,
    /// ClickHouse kept failing for `INSERT_RELEASE_AFTER_MS`: the messages were handed
    /// back to the queue.
    Released,
    /// The channel failed while acknowledging.
    BrokerLost(lapin::Error),
    /// Going on would loop or lose data.
    Fatal(Error),
}

/// Everything a commit needs; cloned into each commit task.
#[derive(Clone)]
pub(crate) struct Committer {
    pub(crate) store: Store,
    pub(crate) dead_letters: DeadLetters,
    pub(crate) acker: Acker,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) release_after: Duration,
    pub(crate) on_commit: Option<CommitHook>,
    pub(crate) recycler: Recycler,
    /// The queue's `x-delivery-limit` (quorum queues).
    pub(crate) delivery_limit: Option<u32>,
    /// The table's layout, read again when an INSERT fails on the table's shape.
    pub(crate) columns: Arc<crate::columns::Columns>,
}

impl std::fmt::Debug for Committer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Committer")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

/// An INSERT that did not go through.
enum Stop {
    Refused(clickhouse::error::Error),
    /// Refused for the table's shape (a column dropped): fatal unless the layout changed.
    Shape(clickhouse::error::Error),
    Give(Outcome),
}

/// Counts a batch that is stored but whose acknowledgement never happened (the commit
/// failed or was abandoned after the INSERT): its rows come back and are stored again.
struct StoredNotAcked<'a> {
    metrics: &'a Metrics,
    rows: usize,
}

impl Drop for StoredNotAcked<'_> {
    fn drop(&mut self) {
        if self.rows > 0 {
            self.metrics.duplicate_risk.inc();
            log::warn!(
                "{} rows were stored but not acknowledged: RabbitMQ will redeliver them and they may be stored again (this batch only)",
                self.rows
            );
        }
    }
}

impl Committer {
    pub(crate) async fn commit(self, mut batch: BatchParts) -> Outcome {
        let started = Instant::now();
        let refused = match self.insert_all(&mut batch).await {
            Ok(refused) => refused,
            Err(Outcome::Released) => return self.release(batch).await,
            Err(outcome) => return outcome,
        };
        let insert_duration = started.elapsed();
        let stored = batch.len() - refused.len();
        let mut guard = StoredNotAcked {
            metrics: &self.metrics,
            rows: stored,
        };
        let mut is_refused = vec![false; batch.len()];
        for row in &refused {
            is_refused[row.index] = true;
            let source = &batch.sources[row.index];
            log::debug!(
                "delivery {}: dead-lettered ({}): {}",
                source.tag,
                row.reason.kind().as_str(),
                row.reason
            );
            let body = batch.body(row.index).to_vec();
            if let Err(e) = self
                .dead_letters
                .send(source.tag, body, &source.origin, &row.reason)
                .await
            {
                return Outcome::BrokerLost(e);
            }
        }
        let tags: Vec<u64> = batch
            .sources
            .iter()
            .zip(&is_refused)
            .filter(|(_, refused)| !**refused)
            .map(|(source, _)| source.tag)
            .collect();
        if let Err(e) = self.acker.settle(&tags, Settle::Ack).await {
            return Outcome::BrokerLost(e);
        }
        guard.rows = 0;
        self.observe_latency(&batch, &is_refused);
        log::debug!(
            "batch committed: {stored} rows stored, {} refused and dead-lettered, acked up to delivery tag {} in {:?}",
            refused.len(),
            batch.last_tag(),
            started.elapsed()
        );
        if let Some(hook) = &self.on_commit {
            hook(&CommitReport {
                rows: stored,
                dead_lettered: refused.len(),
                insert_duration,
            });
        }
        self.recycler.put(batch);
        Outcome::Committed
    }

    /// Publish (or event) time to commit, for every stored row.
    fn observe_latency(&self, batch: &BatchParts, is_refused: &[bool]) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        for (source, refused) in batch.sources.iter().zip(is_refused) {
            if !refused && source.sent_at > 0 {
                self.metrics
                    .end_to_end_seconds
                    .observe((now - f64::from(source.sent_at)).max(0.0));
            }
        }
    }

    /// Inserts every row; on a refusal, halves the range until the refused rows are
    /// found, within a budget of INSERTs and time. Returns the refused rows.
    async fn insert_all(&self, batch: &mut BatchParts) -> Result<Vec<RefusedRow>, Outcome> {
        let mut refused = Vec::new();
        let whole: Range<usize> = 0..batch.len();
        let mut todo = vec![whole];
        // Rows of this batch stored by the INSERTs so far.
        let mut inserted = 0;
        let mut search: Option<(Instant, usize)> = None;
        while let Some(range) = todo.pop() {
            if range.is_empty() {
                continue;
            }
            if let Some((since, inserts)) = &mut search {
                if *inserts >= SEARCH_MAX_INSERTS || since.elapsed() >= SEARCH_MAX_TIME {
                    give_up_search(&mut refused, range, &todo, *inserts, since.elapsed());
                    return Ok(refused);
                }
                *inserts += 1;
            }
            match self.insert_retrying(batch, range.clone()).await {
                Ok(()) => inserted += range.len(),
                Err(Stop::Give(Outcome::Released)) if inserted > 0 => {
                    // Part of the batch is stored: released, it comes back and is
                    // stored again.
                    self.metrics.duplicate_risk.inc();
                    log::warn!(
                        "{inserted} rows of the released batch were stored already: they will be stored again when redelivered (this batch only)"
                    );
                    return Err(Outcome::Released);
                }
                Err(Stop::Give(outcome)) => return Err(outcome),
                Err(Stop::Refused(error) | Stop::Shape(error)) => {
                    if search.is_none() {
                        // Columns added, dropped or retyped: encode the batch again.
                        match crate::encode::reshape_if_changed(&self.columns, &self.store, batch)
                            .await
                        {
                            Ok(Some(misfits)) => {
                                search = Some((Instant::now(), 0));
                                todo = crate::encode::ranges_without(batch.len(), &misfits);
                                todo.reverse();
                                refused = misfits;
                                continue;
                            }
                            Ok(None) => {}
                            Err(e) if e.is_transient() => {}
                            Err(e) => return Err(Outcome::Fatal(e)),
                        }
                        // A refusal caused by the table itself (altered under us) must
                        // stop the consumer, not dead-letter every row.
                        self.check_table().await?;
                        log::warn!(
                            "ClickHouse refused {} rows ({error}); looking for the refused rows",
                            range.len()
                        );
                        search = Some((Instant::now(), 0));
                    }
                    if crate::columns::is_shape_error(&error) {
                        let context =
                            format!("INSERT into {} failed", self.store.qualified_table());
                        return Err(Outcome::Fatal(Error::clickhouse(context, error)));
                    }
                    if range.len() == 1 {
                        refused.push(RefusedRow {
                            index: range.start,
                            reason: InvalidMessage::new(
                                InvalidKind::RejectedByClickHouse,
                                format!("ClickHouse refused the row: {error}"),
                            ),
                        });
                    } else {
                        let mid = range.start + range.len() / 2;
                        todo.push(mid..range.end);
                        todo.push(range.start..mid);
                    }
                }
            }
        }
        Ok(refused)
    }

    /// The table check after a refusal, retried while ClickHouse fails transiently.
    async fn check_table(&self) -> Result<(), Outcome> {
        let mut backoff = Backoff::new(self.initial_backoff, self.max_backoff);
        let since = Instant::now();
        loop {
            match self.store.check_table().await {
                Ok(()) => return Ok(()),
                Err(e) if e.is_transient() && since.elapsed() < self.release_after => {
                    let delay = backoff.next_delay();
                    log::warn!(
                        "cannot check the table after a refused INSERT: {e}; retrying in {delay:?}"
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(e) if e.is_transient() => return Err(Outcome::Released),
                Err(e) => return Err(Outcome::Fatal(e)),
            }
        }
    }

    /// One range's INSERT, retried with backoff while ClickHouse fails transiently. Every
    /// retry sends the identical block, so ClickHouse can drop it if an earlier attempt
    /// was committed after all (see [`Store::insert`]).
    async fn insert_retrying(&self, batch: &BatchParts, range: Range<usize>) -> Result<(), Stop> {
        let rows = batch.rows_bytes(range.clone());
        let sql = batch.shape.insert_sql(&self.store.qualified_table());
        let mut backoff = Backoff::new(self.initial_backoff, self.max_backoff);
        let failing_since = Instant::now();
        let mut ambiguous = false;
        loop {
            let attempt = Instant::now();
            match self.store.insert(sql.clone(), rows.clone()).await {
                Ok(()) => {
                    if ambiguous && !self.store.deduplicates() {
                        self.metrics.insert_retries_not_deduplicated.inc();
                        log::warn!(
                            "an earlier attempt of this INSERT of {} rows may have been committed too, and {} does not deduplicate retries: its rows may be stored twice",
                            range.len(),
                            self.store.qualified_table()
                        );
                    }
                    self.metrics.inserted(range.len(), attempt.elapsed());
                    self.metrics.set_clickhouse_up(true);
                    return Ok(());
                }
                Err(InsertFailure::Rejected(e)) => return Err(Stop::Refused(e)),
                Err(InsertFailure::Fatal(e)) if crate::columns::is_shape_error(&e) => {
                    return Err(Stop::Shape(e));
                }
                Err(InsertFailure::Fatal(e)) => {
                    let context = format!("INSERT into {} failed", self.store.qualified_table());
                    return Err(Stop::Give(Outcome::Fatal(Error::clickhouse(context, e))));
                }
                Err(InsertFailure::Transient(e)) => {
                    ambiguous |= crate::store::is_ambiguous(&e);
                    self.metrics.set_clickhouse_up(false);
                    if failing_since.elapsed() >= self.release_after {
                        log::error!(
                            "ClickHouse has failed for {:?} (INSERT_RELEASE_AFTER_MS): releasing the batch back to the queue: {e}",
                            failing_since.elapsed()
                        );
                        return Err(Stop::Give(Outcome::Released));
                    }
                    let delay = backoff.next_delay();
                    self.metrics.insert_retries.inc();
                    log::warn!(
                        "INSERT of {} rows failed (attempt {}), retrying in {delay:?}: {e}",
                        range.len(),
                        backoff.attempts()
                    );
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    /// Hands a batch's rows back to the queue after a long ClickHouse outage. Messages in
    /// the dead-letter outbox are not the batch's: they are settled when their copies are.
    ///
    /// On a quorum queue, a message that one more release would push past the queue's
    /// delivery limit is dead-lettered here instead, with its reason: the broker would
    /// dead-letter it without one.
    async fn release(self, batch: BatchParts) -> Outcome {
        let mut tags = Vec::with_capacity(batch.len());
        for (index, source) in batch.sources.iter().enumerate() {
            if !last_delivery(source.delivery_count, self.delivery_limit) {
                tags.push(source.tag);
                continue;
            }
            let reason = InvalidMessage::new(
                InvalidKind::DeliveryLimit,
                format!(
                    "released {} times while ClickHouse failed; one more would reach the queue's x-delivery-limit: replay it from the dead-letter queue",
                    source.delivery_count + 1
                ),
            );
            let body = batch.body(index).to_vec();
            if let Err(e) = self
                .dead_letters
                .send(source.tag, body, &source.origin, &reason)
                .await
            {
                return Outcome::BrokerLost(e);
            }
        }
        match self.acker.settle(&tags, Settle::Requeue).await {
            Ok(released) => {
                self.metrics.released.inc_by(released as u64);
                Outcome::Released
            }
            Err(e) => Outcome::BrokerLost(e),
        }
    }
}

/// Whether releasing a message delivered `delivery_count` times before would make the
/// queue dead-letter it (its `x-delivery-limit` counts returns to the queue).
fn last_delivery(delivery_count: u32, limit: Option<u32>) -> bool {
    limit.is_some_and(|limit| delivery_count + 1 >= limit)
}

/// The search for refused rows ran out of budget: every row not yet inserted is refused.
fn give_up_search(
    refused: &mut Vec<RefusedRow>,
    current: Range<usize>,
    todo: &[Range<usize>],
    inserts: usize,
    took: Duration,
) {
    let ranges = std::iter::once(current).chain(todo.iter().cloned());
    let mut rows = 0;
    for range in ranges {
        for index in range {
            rows += 1;
            refused.push(RefusedRow {
                index,
                reason: InvalidMessage::new(
                    InvalidKind::RejectedByClickHouse,
                    format!(
                        "ClickHouse refused rows of this batch and the search for them stopped after {inserts} INSERTs in {took:?}; this row was not inserted"
                    ),
                ),
            });
        }
    }
    log::warn!(
        "the search for refused rows ran out of budget ({inserts} INSERTs, {took:?}): {rows} rows not yet inserted are dead-lettered"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_release_never_pushes_a_message_past_the_delivery_limit() {
        assert!(!last_delivery(0, None), "classic queues have no limit");
        assert!(!last_delivery(100, None));
        assert!(!last_delivery(0, Some(20)));
        assert!(!last_delivery(18, Some(20)));
        assert!(
            last_delivery(19, Some(20)),
            "the 20th return would dead-letter it"
        );
        assert!(last_delivery(25, Some(20)));
    }

    #[test]
    fn an_exhausted_search_refuses_every_row_left() {
        let mut refused = Vec::new();
        give_up_search(
            &mut refused,
            4..6,
            &[8..10, 6..8],
            200,
            Duration::from_secs(1),
        );
        let mut rows: Vec<usize> = refused.iter().map(|r| r.index).collect();
        rows.sort_unstable();
        assert_eq!(rows, vec![4, 5, 6, 7, 8, 9]);
        assert!(
            refused
                .iter()
                .all(|r| r.reason.kind() == InvalidKind::RejectedByClickHouse)
        );
    }
}
