//! A batch: the encoded rows of the messages received since the last flush, and per row
//! only what a refused row needs to be dead-lettered (its delivery tag, body and origin).
//! It is flushed when full or when its oldest row has waited `BATCH_TIMEOUT_MS`.
//!
//! Invalid messages are not part of a batch: they go to the dead-letter outbox as soon
//! as they are decoded.

use std::{
    ops::Range,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use tokio::time::Instant;

use crate::columns::Shape;
use crate::dead_letter::Origin;
use crate::event::InvalidMessage;

/// Where a row came from.
#[derive(Debug)]
pub(crate) struct Source {
    pub(crate) tag: u64,
    /// Where the row's message body ends in the batch's bodies.
    body_end: usize,
    /// Shared by consecutive messages with the same exchange, routing key and properties.
    pub(crate) origin: Arc<Origin>,
    /// When the click was published (the AMQP `timestamp` property) or, without one,
    /// happened (the event's `timestamp`), in Unix seconds: for the latency histogram.
    pub(crate) sent_at: u32,
    /// Earlier deliveries of the message (quorum queues' `x-delivery-count`).
    pub(crate) delivery_count: u32,
}

#[derive(Debug, Default)]
pub(crate) struct Batch {
    /// RowBinary of every row, back to back.
    rows: Vec<u8>,
    /// Where each row ends in `rows`.
    row_ends: Vec<usize>,
    /// The message bodies, back to back, kept to dead-letter a row ClickHouse refuses.
    bodies: Vec<u8>,
    sources: Vec<Source>,
    opened_at: Option<Instant>,
    /// The columns the rows are encoded with (see `columns`).
    pub(crate) shape: Shape,
}

/// The buffers of a committed batch, kept for the next one: a batch's buffers are
/// megabytes, and allocating them anew for every batch costs page faults.
#[derive(Debug, Clone, Default)]
pub(crate) struct Recycler(Arc<Mutex<Option<Batch>>>);

impl Recycler {
    /// An empty batch, on recycled buffers when there are some.
    pub(crate) fn batch(&self, rows: usize) -> Batch {
        let recycled = self.0.lock().unwrap_or_else(|e| e.into_inner()).take();
        recycled.unwrap_or_else(|| Batch::with_capacity(rows))
    }

    /// Keeps the buffers of a committed batch (dropped if something still shares them).
    pub(crate) fn put(&self, parts: BatchParts) {
        let Ok(rows) = parts.rows.try_into_mut() else {
            return;
        };
        let mut batch = Batch {
            rows: Vec::from(rows),
            row_ends: parts.row_ends,
            bodies: parts.bodies,
            sources: parts.sources,
            opened_at: None,
            shape: parts.shape,
        };
        batch.rows.clear();
        batch.row_ends.clear();
        batch.bodies.clear();
        batch.sources.clear();
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(batch);
    }
}

impl Batch {
    pub(crate) fn with_capacity(rows: usize) -> Self {
        Batch {
            rows: Vec::with_capacity(rows * 192),
            row_ends: Vec::with_capacity(rows),
            bodies: Vec::with_capacity(rows * 256),
            sources: Vec::with_capacity(rows),
            opened_at: None,
            shape: Shape::default(),
        }
    }

    /// Where the next row is encoded; [`Batch::push_row`] then records it.
    pub(crate) fn row_buffer(&mut self) -> &mut Vec<u8> {
        &mut self.rows
    }

    /// Records the row just encoded into [`Batch::row_buffer`], with its message's body
    /// and origin. `origin` is shared with the previous row when they are equal.
    pub(crate) fn push_row(&mut self, tag: u64, body: &[u8], origin: Origin, sent_at: u32) {
        self.opened_at.get_or_insert_with(Instant::now);
        self.bodies.extend_from_slice(body);
        let delivery_count = crate::broker::delivery_count(&origin.properties);
        let origin = match self.sources.last() {
            Some(last) if *last.origin == origin => last.origin.clone(),
            _ => Arc::new(origin),
        };
        self.row_ends.push(self.rows.len());
        self.sources.push(Source {
            tag,
            body_end: self.bodies.len(),
            origin,
            sent_at,
            delivery_count,
        });
    }

    /// Rows in the batch.
    pub(crate) fn len(&self) -> usize {
        self.sources.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    /// Bytes held: encoded rows plus the bodies kept for dead-lettering.
    pub(crate) fn bytes(&self) -> usize {
        self.rows.len() + self.bodies.len()
    }

    /// Whether the batch must be written now: `max_rows` rows or `max_bytes` held.
    pub(crate) fn is_full(&self, max_rows: usize, max_bytes: usize) -> bool {
        self.len() >= max_rows || self.bytes() >= max_bytes
    }

    /// The highest delivery tag in the batch (0 when empty).
    pub(crate) fn last_tag(&self) -> u64 {
        self.sources.last().map_or(0, |s| s.tag)
    }

    /// When the batch must be flushed at the latest.
    pub(crate) fn deadline(&self, timeout: std::time::Duration) -> Option<Instant> {
        self.opened_at.map(|at| at + timeout)
    }

    /// Splits the batch into what the committer needs.
    pub(crate) fn into_parts(self) -> BatchParts {
        BatchParts {
            rows: Bytes::from(self.rows),
            row_ends: self.row_ends,
            bodies: self.bodies,
            sources: self.sources,
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
        bodies(&self.bodies, &self.sources)
    }

    /// Replaces the encoded rows with the same rows encoded with another shape.
    pub(crate) fn replace_rows(&mut self, rows: Vec<u8>, row_ends: Vec<usize>) {
        debug_assert_eq!(row_ends.len(), self.row_ends.len());
        self.rows = rows;
        self.row_ends = row_ends;
    }
}

/// The bodies of `sources`, in order, out of the buffer they are kept in.
fn bodies<'a>(buffer: &'a [u8], sources: &'a [Source]) -> impl Iterator<Item = &'a [u8]> {
    let mut start = 0;
    sources.iter().map(move |source| {
        let body = &buffer[start..source.body_end];
        start = source.body_end;
        body
    })
}

/// A flushed batch.
#[derive(Debug)]
pub(crate) struct BatchParts {
    pub(crate) rows: Bytes,
    pub(crate) row_ends: Vec<usize>,
    bodies: Vec<u8>,
    pub(crate) sources: Vec<Source>,
    /// The columns the rows are encoded with.
    pub(crate) shape: Shape,
}

impl BatchParts {
    /// The bodies of the rows, in row order.
    pub(crate) fn bodies(&self) -> impl Iterator<Item = &[u8]> {
        bodies(&self.bodies, &self.sources)
    }

    /// The RowBinary bytes of rows `range`.
    pub(crate) fn rows_bytes(&self, range: Range<usize>) -> Bytes {
        self.rows.slice(span(&self.row_ends, range))
    }

    /// The message body of row `index`.
    pub(crate) fn body(&self, index: usize) -> &[u8] {
        let start = if index == 0 {
            0
        } else {
            self.sources[index - 1].body_end
        };
        &self.bodies[start..self.sources[index].body_end]
    }

    /// Rows in the batch.
    pub(crate) fn len(&self) -> usize {
        self.sources.len()
    }

    /// The highest delivery tag (0 when empty).
    pub(crate) fn last_tag(&self) -> u64 {
        self.sources.last().map_or(0, |s| s.tag)
    }
}

/// The byte range of items `range` of a buffer whose item ends are `ends`.
fn span(ends: &[usize], range: Range<usize>) -> Range<usize> {
    let at = |i: usize| if i == 0 { 0 } else { ends[i - 1] };
    at(range.start)..at(range.end)
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
    use lapin::{BasicProperties, types::ShortString};

    fn body(short_code: &str) -> Vec<u8> {
        format!(r#"{{"short_code":"{short_code}","timestamp":"2024-01-15T10:30:00Z"}}"#)
            .into_bytes()
    }

    fn origin(key: &str) -> Origin {
        Origin {
            exchange: ShortString::from("url_shortener"),
            routing_key: ShortString::from(key),
            properties: BasicProperties::default(),
        }
    }

    #[test]
    fn rows_and_bodies_are_sliced_back_out() {
        let bodies = [body("a"), body("bb"), body("ccc")];
        let mut batch = Batch::default();
        let mut expected = Vec::new();
        for (i, body) in bodies.iter().enumerate() {
            let decoded = Row::decode(body, 1 << 20).unwrap();
            let mut one = Vec::new();
            decoded.encode(&mut one);
            expected.push(one);
            decoded.encode(batch.row_buffer());
            let key = if i == 2 { "other" } else { "click_events" };
            batch.push_row(i as u64 + 1, body, origin(key), 0);
        }
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
        for (i, body) in bodies.iter().enumerate() {
            assert_eq!(parts.body(i), body.as_slice(), "body of row {i}");
        }
        assert!(
            Arc::ptr_eq(&parts.sources[0].origin, &parts.sources[1].origin),
            "equal origins are shared"
        );
        assert_eq!(parts.sources[2].origin.routing_key.as_str(), "other");
    }

    #[test]
    fn a_committed_batch_lends_its_buffers_to_the_next() {
        let recycler = Recycler::default();
        let mut batch = recycler.batch(10);
        batch.row_buffer().extend_from_slice(&[1; 64]);
        batch.push_row(1, &[2; 100], origin("k"), 0);
        let parts = batch.into_parts();
        let shared = parts.rows.clone();
        recycler.put(parts);
        assert!(
            recycler.0.lock().unwrap().is_none(),
            "buffers still shared elsewhere are not recycled"
        );
        drop(shared);
        let mut batch = recycler.batch(10);
        batch.row_buffer().extend_from_slice(&[1; 64]);
        batch.push_row(1, &[2; 100], origin("k"), 0);
        recycler.put(batch.into_parts());
        let next = recycler.batch(10);
        assert!(next.is_empty() && next.rows.is_empty() && next.bodies.is_empty());
        assert!(next.rows.capacity() >= 64 && next.bodies.capacity() >= 100);
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_runs_from_the_first_row() {
        let timeout = std::time::Duration::from_millis(500);
        let mut batch = Batch::default();
        assert_eq!(
            batch.deadline(timeout),
            None,
            "an empty batch has no deadline"
        );
        let start = Instant::now();
        batch.push_row(1, b"{}", origin("k"), 0);
        tokio::time::advance(std::time::Duration::from_millis(300)).await;
        batch.push_row(2, b"{}", origin("k"), 0);
        assert_eq!(batch.deadline(timeout), Some(start + timeout));
        assert!(batch.is_full(2, usize::MAX), "full by count");
        assert!(!batch.is_full(3, usize::MAX));
        assert!(batch.is_full(3, 4), "full by bytes: two bodies of 2 bytes");
    }
}
