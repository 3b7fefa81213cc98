//! Settling deliveries on the consuming channel: which delivery tags are outstanding, and
//! the fewest `basic.ack` / `basic.nack` / `basic.reject` frames that settle a set of them
//! without touching any other.
//!
//! A `multiple` ack of tag `t` settles every outstanding tag up to `t`, so it is only sent
//! when every outstanding tag up to `t` is being settled the same way; any other tag is
//! settled alone. A tag that is not outstanding (settled already, or from an older
//! channel) is never named: RabbitMQ closes the channel with `PRECONDITION_FAILED` for an
//! unknown tag, which would redeliver a stored batch. Frames are sent in the order they
//! were computed, under one lock, so a `multiple` frame can never overtake a single one it
//! covers.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use lapin::{
    Channel,
    options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions},
};
use tokio::sync::Mutex;

use crate::metrics::Metrics;

/// How to settle deliveries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// Done with: stored, or its dead-letter copy is confirmed.
    Ack,
    /// Back to the queue, for this or another consumer.
    Requeue,
    /// Dropped by the broker (dead-lettering disabled).
    Reject,
}

/// The delivery tags of one consuming channel that are received and not settled, with
/// the bytes each one holds (what the in-flight byte budget counts).
#[derive(Debug, Clone)]
pub(crate) struct Acker {
    channel: Channel,
    outstanding: Arc<Mutex<BTreeMap<u64, Held>>>,
    /// The sum of the outstanding deliveries' bytes, readable without the lock.
    held: Arc<AtomicU64>,
    /// The bytes of the outstanding deliveries set aside (dead letters waiting for their
    /// copy's confirm).
    aside: Arc<AtomicU64>,
    /// How many deliveries are outstanding, readable without the lock.
    count: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
}

impl Acker {
    pub(crate) fn new(channel: Channel, metrics: Arc<Metrics>) -> Self {
        Acker {
            channel,
            outstanding: Arc::default(),
            held: Arc::default(),
            aside: Arc::default(),
            count: Arc::default(),
            metrics,
        }
    }

    /// Records a delivery holding `bytes` until it is settled.
    pub(crate) async fn received(&self, tag: u64, bytes: u64) {
        let mut outstanding = self.outstanding.lock().await;
        if let Some(old) = outstanding.insert(
            tag,
            Held {
                bytes,
                aside: false,
            },
        ) {
            self.forget(old);
        }
        let held = self.held.fetch_add(bytes, Ordering::Relaxed) + bytes;
        self.count.store(outstanding.len(), Ordering::Relaxed);
        self.metrics.unacked.set(outstanding.len() as i64);
        self.metrics.inflight_bytes.set(held as i64);
    }

    /// The bytes of the deliveries received and not settled, less those set aside.
    pub(crate) fn held_bytes(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    /// The bytes of the deliveries set aside and not settled.
    pub(crate) fn aside_bytes(&self) -> u64 {
        self.aside.load(Ordering::Relaxed)
    }

    /// Removes a settled delivery's bytes from the sums.
    fn forget(&self, held: Held) {
        let sum = if held.aside { &self.aside } else { &self.held };
        sum.fetch_sub(held.bytes, Ordering::Relaxed);
    }

    /// Deliveries received and not settled (set aside ones included).
    pub(crate) fn outstanding(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Moves `tag`'s bytes from [`Acker::held_bytes`] to [`Acker::aside_bytes`]: a dead
    /// letter waiting for its copy's confirm. During a resource alarm nothing is confirmed
    /// until it clears; the budget has a separate, larger allowance for these, so that the
    /// valid clicks behind them keep flowing for a while.
    pub(crate) async fn set_aside(&self, tag: u64) {
        let mut outstanding = self.outstanding.lock().await;
        if let Some(held) = outstanding.get_mut(&tag)
            && !held.aside
        {
            held.aside = true;
            let bytes = held.bytes;
            let left = self.held.fetch_sub(bytes, Ordering::Relaxed) - bytes;
            self.aside.fetch_add(bytes, Ordering::Relaxed);
            self.metrics.inflight_bytes.set(left as i64);
        }
    }

    /// Settles `tags` (in any order; unknown ones are skipped). Returns how many were
    /// settled. On an error the channel is gone, and with it every outstanding tag.
    ///
    /// Runs to completion in a task of its own even if the caller is dropped (a commit
    /// aborted at shutdown): tags leave the ledger before their frames are sent, so a
    /// settle stopped halfway would leave tags unsettled on the broker that a later
    /// `multiple` frame could cover.
    pub(crate) async fn settle(&self, tags: &[u64], how: Settle) -> Result<usize, lapin::Error> {
        if tags.is_empty() {
            return Ok(0);
        }
        let acker = self.clone();
        let tags = tags.to_vec();
        tokio::spawn(async move { acker.settle_now(&tags, how).await })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(format!("settling failed: {e}")).into()))
    }

    async fn settle_now(&self, tags: &[u64], how: Settle) -> Result<usize, lapin::Error> {
        let mut outstanding = self.outstanding.lock().await;
        let (frames, settled) = plan(&outstanding, tags);
        for tag in &settled {
            if let Some(held) = outstanding.remove(tag) {
                self.forget(held);
            }
        }
        let held = self.held.load(Ordering::Relaxed);
        self.count.store(outstanding.len(), Ordering::Relaxed);
        self.metrics.unacked.set(outstanding.len() as i64);
        self.metrics.inflight_bytes.set(held as i64);
        if settled.len() < tags.len() {
            log::debug!(
                "{} of {} delivery tags to settle were not outstanding (settled already)",
                tags.len() - settled.len(),
                tags.len()
            );
        }
        for frame in frames {
            self.send(frame, how).await?;
        }
        Ok(settled.len())
    }

    async fn send(&self, frame: Frame, how: Settle) -> Result<(), lapin::Error> {
        let Frame { tag, multiple } = frame;
        match how {
            Settle::Ack => {
                self.channel
                    .basic_ack(tag, BasicAckOptions { multiple })
                    .await
            }
            Settle::Requeue => {
                let options = BasicNackOptions {
                    multiple,
                    requeue: true,
                };
                self.channel.basic_nack(tag, options).await
            }
            Settle::Reject if multiple => {
                let options = BasicNackOptions {
                    multiple,
                    requeue: false,
                };
                self.channel.basic_nack(tag, options).await
            }
            Settle::Reject => {
                self.channel
                    .basic_reject(tag, BasicRejectOptions { requeue: false })
                    .await
            }
        }
    }
}

/// What an outstanding delivery holds.
#[derive(Debug, Clone, Copy)]
struct Held {
    bytes: u64,
    /// A dead letter waiting for its copy's confirm.
    aside: bool,
}

/// One settle frame: `tag` alone, or every outstanding tag up to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Frame {
    tag: u64,
    multiple: bool,
}

/// The frames that settle exactly the outstanding members of `tags`, and those members.
///
/// The outstanding tags below the first one that is not being settled form a prefix
/// settled by one `multiple` frame; every wanted tag above that hole is settled alone.
fn plan<V>(outstanding: &BTreeMap<u64, V>, tags: &[u64]) -> (Vec<Frame>, Vec<u64>) {
    let mut wanted: Vec<u64> = tags
        .iter()
        .copied()
        .filter(|t| outstanding.contains_key(t))
        .collect();
    wanted.sort_unstable();
    wanted.dedup();
    let Some(&highest) = wanted.last() else {
        return (Vec::new(), wanted);
    };
    let mut frames = Vec::new();
    let mut next = wanted.iter().peekable();
    // The end of the prefix of outstanding tags that are all wanted, and its length.
    let mut prefix: Option<(u64, usize)> = None;
    let mut in_prefix = true;
    for &tag in outstanding.range(..=highest).map(|(tag, _)| tag) {
        if next.peek() == Some(&&tag) {
            next.next();
            if in_prefix {
                let len = prefix.map_or(0, |(_, n)| n);
                prefix = Some((tag, len + 1));
            } else {
                frames.push(Frame {
                    tag,
                    multiple: false,
                });
            }
        } else {
            in_prefix = false;
        }
    }
    if let Some((tag, len)) = prefix {
        frames.insert(
            0,
            Frame {
                tag,
                multiple: len > 1,
            },
        );
    }
    (frames, wanted)
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::collections::BTreeSet;

    fn set(tags: &[u64]) -> BTreeMap<u64, u64> {
        tags.iter().map(|&t| (t, 0)).collect()
    }

    fn multiple(tag: u64) -> Frame {
        Frame {
            tag,
            multiple: true,
        }
    }

    fn single(tag: u64) -> Frame {
        Frame {
            tag,
            multiple: false,
        }
    }

    #[test]
    fn a_whole_prefix_is_one_multiple_frame() {
        let (frames, settled) = plan(&set(&[1, 2, 3, 4, 5]), &[3, 1, 2]);
        assert_eq!(frames, vec![multiple(3)]);
        assert_eq!(settled, vec![1, 2, 3]);
    }

    #[test]
    fn a_held_tag_is_never_covered_by_a_multiple_frame() {
        // 3 is a dead letter waiting for its confirm: 4 and 5 must be acked alone.
        let (frames, _) = plan(&set(&[1, 2, 3, 4, 5]), &[1, 2, 4, 5]);
        assert_eq!(frames, vec![multiple(2), single(4), single(5)]);
        // Held at the bottom: nothing can be multiple.
        let (frames, _) = plan(&set(&[1, 2, 3]), &[2, 3]);
        assert_eq!(frames, vec![single(2), single(3)]);
    }

    #[test]
    fn tags_settled_already_are_never_named() {
        // 5 was rejected alone (dead-lettering disabled): the batch's highest tag is not
        // outstanding any more, so the multiple frame ends at 4.
        let (frames, settled) = plan(&set(&[1, 2, 3, 4]), &[1, 2, 3, 4, 5]);
        assert_eq!(frames, vec![multiple(4)]);
        assert_eq!(settled, vec![1, 2, 3, 4]);
        let (frames, settled) = plan(&set(&[7]), &[3, 3]);
        assert!(frames.is_empty() && settled.is_empty());
    }

    #[test]
    fn one_tag_is_a_single_frame() {
        assert_eq!(plan(&set(&[4, 9]), &[4]).0, vec![single(4)]);
        assert_eq!(plan(&set(&[4, 9]), &[9]).0, vec![single(9)]);
    }

    #[test]
    fn frames_settle_exactly_the_wanted_tags() {
        // Simulate the broker: apply the frames to the outstanding set and compare.
        let outstanding = set(&(1..=40).collect::<Vec<_>>());
        for hole in [1u64, 7, 20, 40] {
            let wanted: Vec<u64> = (1..=40).filter(|t| t % 7 != 0 && *t != hole).collect();
            let (frames, _) = plan(&outstanding, &wanted);
            let mut left: BTreeSet<u64> = outstanding.keys().copied().collect();
            for frame in frames {
                assert!(left.contains(&frame.tag), "frame names a settled tag");
                if frame.multiple {
                    left.retain(|t| *t > frame.tag);
                } else {
                    left.remove(&frame.tag);
                }
            }
            let wanted: BTreeSet<u64> = wanted.into_iter().collect();
            let expected: BTreeSet<u64> = outstanding
                .keys()
                .filter(|t| !wanted.contains(t))
                .copied()
                .collect();
            assert_eq!(left, expected, "hole {hole}");
        }
    }
}
