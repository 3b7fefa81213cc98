//! Flow control in bytes: what the consumer holds is bounded by `MAX_INFLIGHT_BYTES`,
//! not only by the prefetch count.
//!
//! AMQP has no usable byte prefetch (RabbitMQ ignores `prefetch_size`), and the client
//! library buffers whatever the broker sends, so the bound is built from two parts:
//!
//! - [`InFlight`]: the bytes of the bodies received and not yet settled (acknowledged,
//!   rejected or released), counted through [`Held`] guards that give their bytes back
//!   when dropped: a batch's guard goes to its commit task and is dropped when the
//!   commit ends, however it ends. While the account is over its budget the session
//!   stops taking deliveries (the broker keeps the rest) and flushes what it holds.
//! - [`Window`]: a channel-wide (`global`) `basic.qos` limit, changed on the live
//!   channel as the observed message size changes: `budget / size` messages, so that
//!   what the broker sends ahead, and the client library buffers, also fits the budget.
//!   It starts at `budget / MAX_MESSAGE_BYTES` (safe whatever the backlog holds) and is
//!   lifted entirely (limit 0) once messages are small enough that `PREFETCH_COUNT`
//!   of them fit: the per-consumer prefetch then applies alone, as before, and the
//!   broker does none of the extra work a channel-wide limit costs it per message.
//!
//! What the bound does not cover: messages sent in a window opened while messages were
//! small, when the backlog turns large at once (at most the window's free slots of
//! them, until the first one is seen and the limit is lowered); quorum queues, which
//! do not support a channel-wide limit (only the pause applies there).

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

/// Bytes received and not yet settled, shared by the session and its commit tasks.
#[derive(Debug, Clone)]
pub(crate) struct InFlight {
    bytes: Arc<AtomicUsize>,
    budget: usize,
}

impl InFlight {
    pub(crate) fn new(budget: usize) -> Self {
        InFlight {
            bytes: Arc::new(AtomicUsize::new(0)),
            budget,
        }
    }

    /// Bytes held now.
    pub(crate) fn held(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether the consumer holds its budget or more: stop taking deliveries.
    pub(crate) fn over_budget(&self) -> bool {
        self.held() >= self.budget
    }

    /// An empty guard on this account.
    pub(crate) fn guard(&self) -> Held {
        Held {
            account: self.clone(),
            bytes: 0,
        }
    }
}

/// Bytes counted in an [`InFlight`] account until this guard is dropped.
#[derive(Debug)]
pub(crate) struct Held {
    account: InFlight,
    bytes: usize,
}

impl Held {
    /// Counts `bytes` more.
    pub(crate) fn add(&mut self, bytes: usize) {
        self.bytes += bytes;
        self.account.bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Moves everything this guard holds into a new guard, leaving this one empty.
    pub(crate) fn take(&mut self) -> Held {
        Held {
            account: self.account.clone(),
            bytes: std::mem::take(&mut self.bytes),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.account.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

/// The channel-wide prefetch limit, from the observed message size.
#[derive(Debug)]
pub(crate) struct Window {
    budget: usize,
    /// The per-consumer prefetch (`PREFETCH_COUNT`): no limit is needed at or above it.
    max: u16,
    /// Estimated message size: follows growth fast and shrinking slowly.
    size: f64,
    /// The limit in effect; `None`: no channel-wide limit.
    limit: Option<u16>,
}

/// Weight of a larger message in the size estimate: a run of large messages is
/// followed within a few messages, one odd message moves it by a quarter.
const GROW_WEIGHT: f64 = 0.25;
/// Weight of a smaller message: the estimate comes down over a few hundred messages.
const SHRINK_WEIGHT: f64 = 1.0 / 64.0;

impl Window {
    /// The window of a new session: sized for messages of `max_message_bytes` until
    /// sizes are seen.
    pub(crate) fn new(budget: usize, max: u16, max_message_bytes: usize) -> Self {
        let mut window = Window {
            budget: budget.max(1),
            max: max.max(1),
            size: max_message_bytes.max(1) as f64,
            limit: None,
        };
        window.limit = window.target();
        window
    }

    /// The channel-wide limit to set when the session opens; `None`: none.
    pub(crate) fn limit(&self) -> Option<u16> {
        self.limit
    }

    /// The limit for the current size estimate.
    fn target(&self) -> Option<u16> {
        let fits = (self.budget as f64 / self.size).floor();
        if fits >= f64::from(self.max) {
            None
        } else {
            Some((fits as u16).max(1))
        }
    }

    /// Accounts one message of `bytes`; returns the new limit when it should change
    /// (`Some(0)`: remove the limit). Lowered at once when the budget needs it, raised
    /// only when it can at least double, so a steady stream sets it a few times.
    pub(crate) fn observe(&mut self, bytes: usize) -> Option<u16> {
        let bytes = bytes as f64;
        let weight = if bytes > self.size {
            GROW_WEIGHT
        } else {
            SHRINK_WEIGHT
        };
        self.size += (bytes - self.size) * weight;
        self.size = self.size.max(1.0);
        let target = self.target();
        let current = self.limit.unwrap_or(self.max);
        let wanted = target.unwrap_or(self.max);
        let change = match (self.limit, target) {
            (None, None) => false,
            (Some(_), None) => true,
            (None, Some(_)) => true,
            (Some(_), Some(_)) => wanted < current || wanted >= current.saturating_mul(2),
        };
        if !change {
            return None;
        }
        self.limit = target;
        Some(target.unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn held_bytes_come_back_when_the_guard_drops() {
        let account = InFlight::new(100);
        let mut batch = account.guard();
        batch.add(60);
        assert_eq!(account.held(), 60);
        assert!(!account.over_budget());
        batch.add(40);
        assert!(account.over_budget());
        let committing = batch.take();
        assert_eq!(
            account.held(),
            100,
            "moving a guard keeps its bytes counted"
        );
        batch.add(10);
        drop(committing);
        assert_eq!(account.held(), 10);
        drop(batch);
        assert_eq!(account.held(), 0);
    }

    #[test]
    fn starts_safe_for_the_largest_message() {
        let window = Window::new(64 * MIB, 20_000, MIB);
        assert_eq!(window.limit(), Some(64));
        let roomy = Window::new(64 * MIB, 20, MIB);
        assert_eq!(
            roomy.limit(),
            None,
            "PREFETCH_COUNT messages fit the budget"
        );
        let tiny = Window::new(MIB, 20_000, 8 * MIB);
        assert_eq!(tiny.limit(), Some(1), "never below one message");
    }

    /// Feeds `count` messages of `bytes`; returns every change asked for.
    fn feed(window: &mut Window, count: usize, bytes: usize) -> Vec<u16> {
        (0..count).filter_map(|_| window.observe(bytes)).collect()
    }

    #[test]
    fn small_messages_lift_the_limit_in_a_few_steps() {
        let mut window = Window::new(64 * MIB, 20_000, MIB);
        let changes = feed(&mut window, 2_000, 300);
        assert_eq!(changes.last(), Some(&0), "{changes:?}");
        assert!(
            changes.len() <= 12,
            "{} qos changes: {changes:?}",
            changes.len()
        );
        assert!(changes.windows(2).all(|w| w[1] == 0 || w[1] >= 2 * w[0]));
        assert_eq!(window.limit(), None);
        assert!(
            feed(&mut window, 10_000, 300).is_empty(),
            "steady: no change"
        );
    }

    #[test]
    fn large_messages_fit_the_budget() {
        let mut window = Window::new(64 * MIB, 20_000, MIB);
        feed(&mut window, 2_000, 300);
        assert_eq!(window.limit(), None);
        let changes = feed(&mut window, 50, 700_000);
        let limit = window.limit().expect("large messages need a limit");
        assert!(!changes.is_empty());
        assert!(
            (80..=96).contains(&limit),
            "64 MiB / 700 KB = 95 messages, got {limit}"
        );
        assert!(usize::from(limit) * 700_000 <= 64 * MIB);
        assert!(
            feed(&mut window, 1_000, 700_000).is_empty(),
            "steady: no change"
        );
    }

    #[test]
    fn an_odd_larger_message_does_not_set_a_limit() {
        let mut window = Window::new(64 * MIB, 20_000, MIB);
        feed(&mut window, 2_000, 400);
        assert!(feed(&mut window, 1, 4_000).is_empty());
        assert!(feed(&mut window, 1_000, 400).is_empty());
        assert_eq!(window.limit(), None);
    }

    #[test]
    fn follows_sizes_both_ways() {
        let mut window = Window::new(64 * MIB, 20_000, MIB);
        feed(&mut window, 20, 900_000);
        let large = window.limit().unwrap();
        assert!(large <= 75, "{large}");
        feed(&mut window, 3_000, 300);
        assert_eq!(window.limit(), None, "back to the per-consumer prefetch");
        feed(&mut window, 20, 900_000);
        let again = window.limit().unwrap();
        assert!((60..=75).contains(&again), "{again}");
    }
}
