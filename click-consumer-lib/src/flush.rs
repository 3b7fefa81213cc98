//! The end of a backlog: when deliveries that came as fast as the broker could send them
//! stop, the partial batch they leave is written at once instead of at the batch timeout.
//!
//! A batch is otherwise written when it is full (`BATCH_SIZE` rows or its share of the
//! byte budget), when the broker's window is used up, or `BATCH_TIMEOUT_MS` after its first
//! row. Draining a backlog fills batch after batch; its last rows (a backlog is rarely a
//! multiple of `BATCH_SIZE`) would wait for the timeout, a second of latency and of drain
//! time for nothing. A pause in the deliveries right after a full batch is taken as the
//! backlog's end.
//!
//! Bursty traffic looks the same, so the rule allows at most one early write per full
//! batch: it never more than doubles the INSERTs, and traffic that never fills a batch
//! is written at the timeout as before. The pause counts only while the broker may send:
//! not while the prefetch window is used up, nor during a consumer restart. And a pause
//! while the queue still holds messages ready (a broker or a client thread slow for a
//! moment: seen mid-drain on a busy 2-core machine) is not the end: the session asks
//! the broker for the queue's depth before it writes.

use std::time::Duration;

use tokio::time::Instant;

/// How long deliveries must pause, after a full batch, to count as the backlog's end.
/// A backlog arrives in tens of microseconds per message (milliseconds for messages of
/// hundreds of kilobytes).
pub(crate) const BACKLOG_PAUSE: Duration = Duration::from_millis(50);

/// Whether the batch being filled follows a full one, and when its last delivery came.
#[derive(Debug, Default)]
pub(crate) struct Backlog {
    /// The last batch written was full: deliveries were coming faster than batches.
    draining: bool,
    /// When the last delivery was taken into the current batch.
    last_delivery: Option<Instant>,
    /// The broker said, after the last delivery, that messages are still ready: this
    /// pause is not the end, and the batch waits for the next delivery or the timeout.
    probed: bool,
}

impl Backlog {
    /// A delivery was taken into the batch at `now`.
    pub(crate) fn delivered(&mut self, now: Instant) {
        self.last_delivery = Some(now);
        self.probed = false;
    }

    /// The queue still had messages ready at the end of the pause: the backlog goes on,
    /// only slower. The broker is asked again only after another delivery and pause.
    pub(crate) fn probed(&mut self) {
        self.probed = true;
    }

    /// The broker could not send until now (its window was used up, or the consumer was
    /// stopped or restarted): the pause counts from here, not from the last delivery.
    pub(crate) fn resume(&mut self, now: Instant) {
        if self.last_delivery.is_some() {
            self.last_delivery = Some(now);
        }
    }

    /// A batch was written: `full` when it was written for its size in rows or bytes, or
    /// because nothing more could arrive until it was (the broker's window used up, the
    /// consumer stopped for the byte budget); not for a timeout or a pause.
    pub(crate) fn written(&mut self, full: bool) {
        self.draining = full;
        self.last_delivery = None;
        self.probed = false;
    }

    /// When the current batch may be due because the backlog ended: [`BACKLOG_PAUSE`]
    /// after its last delivery, if it follows a full batch and the broker was not asked
    /// since. `None` otherwise (or while it is empty). The session then asks the broker
    /// whether the queue is empty before it writes.
    pub(crate) fn ends_at(&self) -> Option<Instant> {
        self.last_delivery
            .filter(|_| self.draining && !self.probed)
            .map(|at| at + BACKLOG_PAUSE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_pause_after_a_full_batch_makes_the_next_one_due() {
        let mut backlog = Backlog::default();
        backlog.written(true);
        assert_eq!(backlog.ends_at(), None, "an empty batch is never due");
        backlog.delivered(Instant::now());
        tokio::time::advance(Duration::from_millis(10)).await;
        let last = Instant::now();
        backlog.delivered(last);
        assert_eq!(
            backlog.ends_at(),
            Some(last + BACKLOG_PAUSE),
            "the pause counts from the last delivery"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn only_one_early_write_per_full_batch() {
        let mut backlog = Backlog::default();
        backlog.delivered(Instant::now());
        assert_eq!(
            backlog.ends_at(),
            None,
            "the first batch waits for its size or the timeout"
        );
        backlog.written(true);
        backlog.delivered(Instant::now());
        assert!(backlog.ends_at().is_some());
        // A window used up is not a pause: the clock starts again when it has room.
        tokio::time::advance(Duration::from_millis(80)).await;
        backlog.resume(Instant::now());
        assert_eq!(backlog.ends_at(), Some(Instant::now() + BACKLOG_PAUSE));
        // Messages still ready at the end of a pause: no second question until the next
        // delivery.
        backlog.probed();
        assert_eq!(backlog.ends_at(), None);
        backlog.delivered(Instant::now());
        assert!(backlog.ends_at().is_some());
        // Written for the pause: the next batch is back to size or timeout.
        backlog.written(false);
        backlog.delivered(Instant::now());
        assert_eq!(backlog.ends_at(), None);
    }
}
