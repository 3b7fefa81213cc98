//! A batch: the encoded rows of the messages received since the last flush, the
//! deliveries they came from, and the dead letters waiting for the broker's confirm.
//! It is flushed when full or when its oldest message has waited `BATCH_TIMEOUT_MS`.

use std::ops::Range;

use bytes::Bytes;
use lapin::{PublisherConfirm, message::Delivery};
use tokio::time::Instant;

use crate::columns::Shape;
use crate::event::InvalidMessage;

/// A dead letter published to the dead-letter queue, not yet confirmed by the broker.
#[derive(Debug)]
pub(crate) struct PendingDeadLetter {
    pub(crate) delivery_tag: u64,
    pub(crate) confirm: PublisherConfirm,
}

#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// RowBinary of every row, back to back.
    rows: Vec<u8>,
    /// Where each row ends in `rows`.
    row_ends: Vec<usize>,
    /// The delivery of each row, kept to dead-letter a row ClickHouse refuses.
    deliveries: Vec<Delivery>,
    dead_letters: Vec<PendingDeadLetter>,
    /// Every unsettled message of the batch has a tag at most this (0: none); the batch
    /// is acknowledged with one `basic.ack(last_tag, multiple)`.
    last_tag: u64,
    messages: usize,
    /// Bytes held: encoded rows plus the bodies kept for dead-lettering.
    bytes: usize,
    opened_at: Option<Instant>,
    /// The columns the rows are encoded with (see `columns`).
    pub(crate) shape: Shape,
}

impl Batch {
    pub(crate) fn with_capacity(rows: usize) -> Self {
        Batch {
            rows: Vec::with_capacity(rows * 256),
            row_ends: Vec::with_capacity(rows),
            deliveries: Vec::with_capacity(rows),
            ..Batch::default()
        }
    }

    fn note(&mut self, delivery_tag: u64) {
        self.opened_at.get_or_insert_with(Instant::now);
        self.last_tag = self.last_tag.max(delivery_tag);
        self.messages += 1;
    }

    /// Adds a message that was settled already (rejected without requeue). Its tag is
    /// not the batch's to acknowledge: acking a settled tag is a channel error.
    pub(crate) fn push_settled(&mut self) {
        self.opened_at.get_or_insert_with(Instant::now);
        self.messages += 1;
    }

    /// Where the next row is encoded; [`Batch::push_row`] then records it.
    pub(crate) fn row_buffer(&mut self) -> &mut Vec<u8> {
        &mut self.rows
    }

    /// Records the row just encoded into [`Batch::row_buffer`] and its delivery.
    pub(crate) fn push_row(&mut self, delivery: Delivery) {
        self.note(delivery.delivery_tag);
        let row_start = self.row_ends.last().copied().unwrap_or(0);
        self.bytes += self.rows.len() - row_start + delivery.data.len();
        self.row_ends.push(self.rows.len());
        self.deliveries.push(delivery);
    }

    /// Adds a message that was dead-lettered (its confirm is awaited before the ack).
    pub(crate) fn push_dead_letter(&mut self, pending: PendingDeadLetter) {
        self.note(pending.delivery_tag);
        self.dead_letters.push(pending);
    }

    /// Rows to insert.
    pub(crate) fn row_count(&self) -> usize {
        self.row_ends.len()
    }

    /// Messages in the batch (rows and dead letters).
    pub(crate) fn len(&self) -> usize {
        self.messages
    }

    /// Whether the batch must be written now: `max_rows` messages or `max_bytes` held.
    pub(crate) fn is_full(&self, max_rows: usize, max_bytes: usize) -> bool {
        self.messages >= max_rows || self.bytes >= max_bytes
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.messages == 0
    }

    pub(crate) fn last_tag(&self) -> u64 {
        self.last_tag
    }

    /// When the batch must be flushed at the latest.
    pub(crate) fn deadline(&self, timeout: std::time::Duration) -> Option<Instant> {
        self.opened_at.map(|at| at + timeout)
    }

    /// Takes the dead letters out of a batch that will not be committed.
    pub(crate) fn take_dead_letters(&mut self) -> Vec<PendingDeadLetter> {
        std::mem::take(&mut self.dead_letters)
    }

    /// Splits the batch into what the committer needs.
    pub(crate) fn into_parts(self) -> BatchParts {
        BatchParts {
            rows: Bytes::from(self.rows),
            row_ends: self.row_ends,
            deliveries: self.deliveries,
            dead_letters: self.dead_letters,
            last_tag: self.last_tag,
            messages: self.messages,
            shape: self.shape,
        }
    }

    // --- Extra columns (`encode`): a row encoded with the batch's shape, and the rows
    // encoded again when the shape widens.

    /// The batch's shape and where the next row is encoded.
    pub(crate) fn shape_and_rows(&mut self) -> (&Shape, &mut Vec<u8>) {
        (&self.shape, &mut self.rows)
    }

    /// The bodies of the rows, in row order.
    pub(crate) fn bodies(&self) -> impl Iterator<Item = &[u8]> {
        self.deliveries.iter().map(|d| &*d.data)
    }

    /// Replaces the encoded rows with the same rows encoded with another shape.
    pub(crate) fn replace_rows(&mut self, rows: Vec<u8>, row_ends: Vec<usize>) {
        debug_assert_eq!(row_ends.len(), self.row_ends.len());
        self.bytes = self.bytes + rows.len() - self.rows.len();
        self.rows = rows;
        self.row_ends = row_ends;
    }
}

/// A flushed batch.
#[derive(Debug)]
pub(crate) struct BatchParts {
    pub(crate) rows: Bytes,
    pub(crate) row_ends: Vec<usize>,
    pub(crate) deliveries: Vec<Delivery>,
    pub(crate) dead_letters: Vec<PendingDeadLetter>,
    pub(crate) last_tag: u64,
    pub(crate) messages: usize,
    /// The columns the rows are encoded with.
    pub(crate) shape: Shape,
}

impl BatchParts {
    /// The RowBinary bytes of rows `range`.
    pub(crate) fn rows_bytes(&self, range: Range<usize>) -> Bytes {
        let start = if range.start == 0 {
            0
        } else {
            self.row_ends[range.start - 1]
        };
        let end = if range.end == 0 {
            0
        } else {
            self.row_ends[range.end - 1]
        };
        self.rows.slice(start..end)
    }
}

/// A row of the batch that ClickHouse refused.
#[derive(Debug)]
pub(crate) struct RefusedRow {
    pub(crate) index: usize,
    pub(crate) reason: InvalidMessage,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Row;

    fn row(short_code: &str) -> Vec<u8> {
        format!(r#"{{"short_code":"{short_code}","timestamp":"2024-01-15T10:30:00Z"}}"#)
            .into_bytes()
    }

    #[test]
    fn row_ranges_slice_the_encoded_buffer() {
        let bodies = [row("a"), row("bb"), row("ccc")];
        let mut batch = Batch::default();
        let mut expected = Vec::new();
        for body in &bodies {
            let decoded = Row::decode(body, 1 << 20).unwrap();
            let mut one = Vec::new();
            decoded.encode(&mut one);
            expected.push(one);
            let mut buf = Vec::new();
            decoded.encode(&mut buf);
            batch.rows.extend_from_slice(&buf);
            batch.row_ends.push(batch.rows.len());
            batch.note(expected.len() as u64);
        }
        assert_eq!(batch.row_count(), 3);
        assert_eq!(batch.len(), 3);
        assert_eq!(batch.last_tag(), 3);
        let parts = batch.into_parts();
        assert_eq!(parts.rows_bytes(0..1), expected[0]);
        assert_eq!(
            parts.rows_bytes(1..3),
            [expected[1].clone(), expected[2].clone()].concat()
        );
        assert_eq!(parts.rows_bytes(0..3).len(), parts.rows.len());
        assert!(parts.rows_bytes(0..0).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_runs_from_the_first_message() {
        let timeout = std::time::Duration::from_millis(500);
        let mut batch = Batch::default();
        assert_eq!(
            batch.deadline(timeout),
            None,
            "an empty batch has no deadline"
        );
        let start = Instant::now();
        batch.push_settled();
        tokio::time::advance(std::time::Duration::from_millis(300)).await;
        batch.push_settled();
        assert_eq!(batch.deadline(timeout), Some(start + timeout));
        assert_eq!(
            batch.last_tag(),
            0,
            "settled messages are not acknowledged again"
        );
        assert_eq!(batch.len(), 2);
        assert_eq!(batch.row_count(), 0);
        assert!(batch.is_full(2, usize::MAX), "full by count");
        assert!(!batch.is_full(3, usize::MAX));
    }
}
