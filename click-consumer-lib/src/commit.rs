//! Committing a flushed batch: INSERT (retried with backoff while ClickHouse is failing,
//! split to find the rows it refuses), dead-letter refused rows, wait for every dead
//! letter's confirm, then acknowledge the whole batch with one multiple-ack.
//!
//! A message is acknowledged only after its row is committed in ClickHouse or its copy
//! is confirmed in the dead-letter queue.

use std::{
    ops::Range,
    sync::Arc,
    time::{Duration, Instant},
};

use lapin::{
    Channel,
    options::{BasicAckOptions, BasicNackOptions},
};

use crate::backoff::Backoff;
use crate::batch::{BatchParts, PendingDeadLetter, RefusedRow};
use crate::dead_letter::{self, DeadLetters, Sent};
use crate::error::Error;
use crate::event::{InvalidKind, InvalidMessage};
use crate::metrics::Metrics;
use crate::store::{InsertFailure, Store};

/// What a consumer reports to an [`on_commit`](crate::Consumer::on_commit) hook after
/// each acknowledged batch.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CommitReport {
    /// Rows committed to ClickHouse by this batch.
    pub rows: usize,
    /// Messages of this batch that were dead-lettered.
    pub dead_lettered: usize,
    /// Time spent in INSERTs, retries included.
    pub insert_duration: Duration,
}

/// A callback run after each acknowledged batch.
pub(crate) type CommitHook = Arc<dyn Fn(&CommitReport) + Send + Sync>;

/// How a commit ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Stored (or dead-lettered) and acknowledged.
    Committed,
    /// ClickHouse kept failing for `INSERT_RELEASE_AFTER_MS`: the messages were handed
    /// back to the queue.
    Released,
    /// A dead letter was not confirmed (the dead-letter queue is gone?): the originals
    /// went back to the queue, the rest was acknowledged; the topology needs declaring.
    DeadLetterRefused,
    /// The channel failed while publishing or acknowledging.
    BrokerLost(lapin::Error),
    /// Going on would loop or lose data.
    Fatal(Error),
}

/// Everything a commit needs; cloned into each commit task.
#[derive(Clone)]
pub(crate) struct Committer {
    pub(crate) store: Store,
    pub(crate) dead_letters: DeadLetters,
    pub(crate) consume: Channel,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) initial_backoff: Duration,
    pub(crate) max_backoff: Duration,
    pub(crate) release_after: Duration,
    pub(crate) on_commit: Option<CommitHook>,
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

impl Committer {
    pub(crate) async fn commit(self, mut batch: BatchParts) -> Outcome {
        let started = Instant::now();
        let refused = match self.insert_all(&mut batch).await {
            Ok(refused) => refused,
            Err(Outcome::Released) => return self.release(batch).await,
            Err(outcome) => return outcome,
        };
        let insert_duration = started.elapsed();
        let stored = batch.row_ends.len() - refused.len();
        let mut dead_letters = batch.dead_letters;
        let mut tags: Vec<u64> = batch.deliveries.iter().map(|d| d.delivery_tag).collect();
        tags.extend(dead_letters.iter().map(|p| p.delivery_tag));
        for row in refused {
            let delivery = &batch.deliveries[row.index];
            log::debug!(
                "delivery {}: dead-lettered ({}): {}",
                delivery.delivery_tag,
                row.reason.kind().as_str(),
                row.reason
            );
            self.metrics.dead_lettered(row.reason.kind());
            match self.dead_letters.send(delivery, &row.reason).await {
                Ok(Sent::Pending(pending)) => dead_letters.push(pending),
                Ok(Sent::Rejected) => tags.retain(|t| *t != delivery.delivery_tag),
                Err(e) => return Outcome::BrokerLost(e),
            }
        }
        let dead_lettered = dead_letters.len();
        let unconfirmed = match confirm_all(dead_letters).await {
            Ok(unconfirmed) => unconfirmed,
            Err(e) => return Outcome::BrokerLost(e),
        };
        let outcome = if unconfirmed.is_empty() {
            self.ack_all(batch.last_tag, stored).await
        } else {
            self.ack_except(&tags, &unconfirmed).await
        };
        if matches!(outcome, Outcome::Committed) {
            self.metrics.unacked.dec_by(batch.messages as i64);
            log::debug!(
                "batch committed: {stored} rows stored, {dead_lettered} dead-lettered, acked up to delivery tag {} in {:?}",
                batch.last_tag,
                started.elapsed()
            );
            if let Some(hook) = &self.on_commit {
                hook(&CommitReport {
                    rows: stored,
                    dead_lettered,
                    insert_duration,
                });
            }
        }
        outcome
    }

    /// Inserts every row; on a refusal, halves the range until the refused rows are
    /// found. Returns the refused rows.
    async fn insert_all(&self, batch: &mut BatchParts) -> Result<Vec<RefusedRow>, Outcome> {
        let mut refused = Vec::new();
        let whole: Range<usize> = 0..batch.row_ends.len();
        let mut todo = vec![whole];
        let mut table_checked = false;
        while let Some(range) = todo.pop() {
            if range.is_empty() {
                continue;
            }
            match self.insert_retrying(batch, range.clone()).await {
                Ok(()) => {}
                Err(Stop::Give(outcome)) => return Err(outcome),
                Err(Stop::Refused(error) | Stop::Shape(error)) => {
                    // A refusal caused by the table itself (altered under us) must stop
                    // the consumer, not dead-letter every row.
                    if !table_checked {
                        // Columns added, dropped or retyped: encode the batch again.
                        match crate::encode::reshape_if_changed(&self.columns, &self.store, batch)
                            .await
                        {
                            Ok(Some(misfits)) => {
                                table_checked = true;
                                todo =
                                    crate::encode::ranges_without(batch.row_ends.len(), &misfits);
                                todo.reverse();
                                refused = misfits;
                                continue;
                            }
                            Ok(None) => {}
                            Err(e) => return Err(Outcome::Fatal(e)),
                        }
                        if let Err(e) = self.store.check_table().await {
                            return Err(Outcome::Fatal(e));
                        }
                        table_checked = true;
                        log::warn!(
                            "ClickHouse refused {} rows ({error}); looking for the refused rows",
                            range.len()
                        );
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

    /// One range's INSERT, retried with backoff while ClickHouse fails transiently.
    async fn insert_retrying(&self, batch: &BatchParts, range: Range<usize>) -> Result<(), Stop> {
        let rows = batch.rows_bytes(range.clone());
        let sql = batch.shape.insert_sql(&self.store.qualified_table());
        let mut backoff = Backoff::new(self.initial_backoff, self.max_backoff);
        let failing_since = Instant::now();
        loop {
            let attempt = Instant::now();
            match self.store.insert(sql.clone(), rows.clone()).await {
                Ok(()) => {
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

    async fn ack_all(&self, last_tag: u64, stored: usize) -> Outcome {
        if last_tag == 0 {
            return Outcome::Committed; // every message was settled already
        }
        match self
            .consume
            .basic_ack(last_tag, BasicAckOptions { multiple: true })
            .await
        {
            Ok(()) => Outcome::Committed,
            Err(e) => {
                if stored > 0 {
                    self.metrics.duplicate_risk.inc();
                    log::warn!(
                        "{stored} rows were stored but their acknowledgement failed ({e}): RabbitMQ will redeliver them and they will be stored again (this batch only)"
                    );
                }
                Outcome::BrokerLost(e)
            }
        }
    }

    /// Acks each tag alone, except the unconfirmed dead letters, which are requeued.
    async fn ack_except(&self, tags: &[u64], unconfirmed: &[u64]) -> Outcome {
        log::warn!(
            "{} dead letters were not confirmed by the broker (is the dead-letter queue gone?): requeueing their originals",
            unconfirmed.len()
        );
        for &tag in tags {
            let result = if unconfirmed.contains(&tag) {
                let requeue = BasicNackOptions {
                    multiple: false,
                    requeue: true,
                };
                self.consume.basic_nack(tag, requeue).await
            } else {
                self.consume
                    .basic_ack(tag, BasicAckOptions::default())
                    .await
            };
            if let Err(e) = result {
                return Outcome::BrokerLost(e);
            }
        }
        self.metrics.unacked.dec_by(tags.len() as i64);
        Outcome::DeadLetterRefused
    }

    /// Acknowledges, one by one, the originals of the dead letters the broker confirmed,
    /// for messages whose batch will not be committed: their copies are safe, so they
    /// must not come back and be dead-lettered twice. Returns how many were acked.
    pub(crate) async fn settle_dead_letters(
        &self,
        pending: Vec<PendingDeadLetter>,
    ) -> Result<usize, lapin::Error> {
        let mut acked = 0;
        for dead_letter in pending {
            let tag = dead_letter.delivery_tag;
            if let Ok(true) = dead_letter::confirmed(dead_letter).await {
                self.consume
                    .basic_ack(tag, BasicAckOptions::default())
                    .await?;
                acked += 1;
            }
        }
        self.metrics.unacked.dec_by(acked as i64);
        Ok(acked)
    }

    /// Hands a batch back to the queue after a long ClickHouse outage. Dead letters that
    /// are confirmed are acknowledged first so they are not dead-lettered twice.
    async fn release(self, mut batch: BatchParts) -> Outcome {
        let dead_letters = batch.dead_letters.len();
        let pending = std::mem::take(&mut batch.dead_letters);
        let settled = match self.settle_dead_letters(pending).await {
            Ok(settled) => settled,
            Err(e) => return Outcome::BrokerLost(e),
        };
        let requeue = BasicNackOptions {
            multiple: true,
            requeue: true,
        };
        if batch.last_tag > 0
            && let Err(e) = self.consume.basic_nack(batch.last_tag, requeue).await
        {
            return Outcome::BrokerLost(e);
        }
        let released = batch.deliveries.len() + dead_letters - settled;
        self.metrics.released.inc_by(released as u64);
        self.metrics
            .unacked
            .dec_by((batch.messages - settled) as i64);
        Outcome::Released
    }
}

/// Waits for every dead letter's confirm; returns the tags of those not confirmed.
async fn confirm_all(pending: Vec<PendingDeadLetter>) -> Result<Vec<u64>, lapin::Error> {
    let mut unconfirmed = Vec::new();
    for dead_letter in pending {
        let tag = dead_letter.delivery_tag;
        if !dead_letter::confirmed(dead_letter).await? {
            unconfirmed.push(tag);
        }
    }
    Ok(unconfirmed)
}
