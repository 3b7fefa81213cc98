//! The in-flight byte budget (`MAX_INFLIGHT_BYTES`): how many messages the broker may
//! send ahead, so that the bytes received and not yet acknowledged stay near the budget
//! whatever the messages' size.
//!
//! AMQP counts the prefetch in messages (RabbitMQ ignores `prefetch_size`), and a
//! consumer's prefetch is fixed when it starts (`basic.qos` applies to the consumers
//! started after it; the channel-wide `global` form is deprecated in RabbitMQ 4). So the
//! window follows the sizes seen, and the session restarts its consumer (cancel, qos,
//! consume) when the window must change:
//!
//! - it starts as if every message had `MAX_MESSAGE_BYTES` (the worst case), and moves to
//!   the sizes seen once a few messages are in;
//! - it shrinks as soon as the mean size of the recent messages no longer fits, and grows
//!   back when it would at least double (or reach `PREFETCH_COUNT`), so a stream whose
//!   mean size is steady keeps its consumer;
//! - whatever the estimate, the consumer is stopped while the bytes held exceed the budget
//!   by a quarter (a burst of messages much larger than the recent ones), and started again
//!   once the window fits beside what is still held.
//!
//! Normal clicks (a few hundred bytes) never get near the budget: the window is
//! `PREFETCH_COUNT` after the first few messages.

/// Bytes a message holds beyond its body: the delivery, its properties, the batch's
/// bookkeeping. Counted with every message, so tiny bodies still have a cost.
pub(crate) const OVERHEAD: u64 = 512;

/// Messages in one bucket of the size estimate.
const BUCKET: u32 = 64;

/// Messages needed before the current bucket's mean is trusted.
const FEW: u32 = 8;

/// The prefetch window in effect, and the message sizes it is based on.
#[derive(Debug)]
pub(crate) struct Window {
    budget: u64,
    cap: u16,
    current: u16,
    /// The mean bytes per message (overhead included) of the last full bucket; before
    /// one is full, the largest message allowed.
    previous: u64,
    /// Whether `previous` was measured (a full bucket was seen).
    measured: bool,
    sum: u64,
    count: u32,
    /// The last `FEW` messages' sizes (overhead included), a ring, and where the next goes.
    last: [u64; FEW as usize],
    next: usize,
    /// Messages seen since the window last shrank: it grows again only after a bucket's
    /// worth, so that the mean has caught up with the new sizes.
    since_shrink: u32,
}

impl Window {
    /// A window for messages of unknown size, at most `max_message` bytes each.
    pub(crate) fn new(budget: usize, cap: u16, max_message: usize) -> Window {
        let mut window = Window {
            budget: budget as u64,
            cap: cap.max(1),
            current: 0,
            previous: (max_message as u64).saturating_add(OVERHEAD),
            measured: false,
            sum: 0,
            count: 0,
            since_shrink: BUCKET,
            last: [0; FEW as usize],
            next: 0,
        };
        window.current = window.fit(window.previous);
        window
    }

    /// The prefetch count of the consumer now running (or to be started).
    pub(crate) fn current(&self) -> u16 {
        self.current
    }

    /// Counts a message of `bytes` (its body).
    pub(crate) fn observe(&mut self, bytes: usize) {
        let bytes = (bytes as u64).saturating_add(OVERHEAD);
        self.last[self.next] = bytes;
        self.next = (self.next + 1) % self.last.len();
        self.sum += bytes;
        self.count += 1;
        self.since_shrink = self.since_shrink.saturating_add(1);
        if self.count >= BUCKET {
            self.previous = self.sum / u64::from(self.count);
            self.measured = true;
            self.sum = 0;
            self.count = 0;
        }
    }

    /// The bytes per message to plan for: the larger of the last bucket's mean and the
    /// current one's (once it has a few messages); before any size is known, the largest
    /// message allowed.
    pub(crate) fn estimate(&self) -> u64 {
        let recent = (self.count >= FEW).then(|| self.sum / u64::from(self.count));
        match (self.measured, recent) {
            (true, Some(recent)) => self.previous.max(recent),
            (true, None) => self.previous,
            (false, Some(recent)) => recent,
            (false, None) => self.previous,
        }
    }

    /// The window that keeps `estimate() x window` within the budget.
    fn fit(&self, per_message: u64) -> u16 {
        let fits = self.budget / per_message.max(1);
        u16::try_from(fits).unwrap_or(u16::MAX).clamp(1, self.cap)
    }

    /// The new window if the sizes seen call for one: smaller as soon as the current one
    /// overshoots the budget by an eighth, larger once it would at least double or reach
    /// the cap, and not before a bucket's worth of messages (or a window's, if smaller)
    /// since the last shrink, so that the mean has caught up with the new sizes.
    ///
    /// Whether to shrink follows the mean size, so a lone large message among small ones
    /// moves the window little. How far follows the last few messages too: the mean of a
    /// bucket that mixes the old sizes with new, larger ones lags behind, and would shrink
    /// the window step by step, restarting the consumer each time.
    pub(crate) fn wanted(&self) -> Option<u16> {
        let target = self.fit(self.estimate());
        let current = u32::from(self.current);
        if u32::from(target) * 8 < current * 7 {
            let recent = self.last.iter().sum::<u64>() / u64::from(FEW);
            return Some(self.fit(self.estimate().max(recent)));
        }
        let settled = self.since_shrink >= BUCKET.min(current);
        let grow = target > self.current
            && (u32::from(target) >= 2 * current || target == self.cap)
            && settled;
        grow.then_some(target)
    }

    /// Adopts `window` (the consumer is being restarted with it).
    pub(crate) fn set(&mut self, window: u16) {
        let window = window.clamp(1, self.cap);
        if window < self.current {
            self.since_shrink = 0;
        }
        self.current = window;
    }

    /// The budget and a quarter: what the bytes held may reach before the consumer stops.
    fn slack(&self) -> u64 {
        self.budget.saturating_add(self.budget / 4)
    }

    /// Twice the budget: what the bytes held and set aside together may reach.
    fn ceiling(&self) -> u64 {
        self.budget.saturating_mul(2)
    }

    /// Whether the consumer must stop until bytes are acknowledged: `held` exceeds the
    /// budget by more than a quarter, or with the dead letters set aside (`aside`: they
    /// wait for their copy's confirm, which a resource alarm holds up) reaches twice the
    /// budget. So during an alarm the valid clicks keep flowing until the waiting dead
    /// letters fill the budget; then memory wins, and the consumer waits for the alarm.
    pub(crate) fn over_budget(&self, held: u64, aside: u64) -> bool {
        held > self.slack() || held.saturating_add(aside) > self.ceiling()
    }

    /// Whether a consumer with the current window may start beside `held` bytes and the
    /// dead letters set aside.
    pub(crate) fn has_room(&self, held: u64, aside: u64) -> bool {
        let window = u64::from(self.current).saturating_mul(self.estimate());
        if held == 0 && aside == 0 {
            return true;
        }
        held.saturating_add(window) <= self.slack()
            && held.saturating_add(aside).saturating_add(window) <= self.ceiling()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1024 * 1024;

    fn observe(window: &mut Window, bytes: usize, n: usize) {
        for _ in 0..n {
            window.observe(bytes);
        }
    }

    #[test]
    fn starts_for_the_largest_message_allowed() {
        let window = Window::new(64 * MIB, 20_000, MIB);
        assert_eq!(window.current(), 63);
        // A budget that holds a whole window of the largest messages changes nothing.
        assert_eq!(Window::new(64 * MIB, 60, MIB).current(), 60);
    }

    #[test]
    fn normal_clicks_get_the_whole_prefetch_after_a_few_messages() {
        let mut window = Window::new(64 * MIB, 20_000, MIB);
        observe(&mut window, 300, 7);
        assert_eq!(window.wanted(), None, "too few sizes seen");
        window.observe(300);
        assert_eq!(window.wanted(), Some(20_000));
        window.set(20_000);
        observe(&mut window, 300, 10_000);
        assert_eq!(window.wanted(), None, "a steady stream keeps its window");
    }

    #[test]
    fn large_messages_shrink_the_window_to_the_budget() {
        let mut window = Window::new(64 * MIB, 20_000, MIB);
        observe(&mut window, 300, 64);
        window.set(window.wanted().unwrap());
        observe(&mut window, 700_000, 8);
        let shrunk = window.wanted().expect("must shrink");
        assert_eq!(shrunk, 95);
        window.set(shrunk);
        assert!(u64::from(shrunk) * window.estimate() <= 64 * MIB as u64);
        observe(&mut window, 700_000, 500);
        assert_eq!(
            window.wanted(),
            None,
            "steady large messages keep their window"
        );
    }

    #[test]
    fn small_size_changes_do_not_restart_the_consumer() {
        let mut window = Window::new(64 * MIB, 20_000, MIB);
        observe(&mut window, 700_000, 64);
        assert_eq!(window.wanted(), None, "63 x 700 KB fits: no restart for 95");
        let before = window.current();
        observe(&mut window, 760_000, 64);
        assert_eq!(window.wanted(), None, "8% larger stays within the slack");
        observe(&mut window, 600_000, 64);
        assert_eq!(window.wanted(), None, "smaller, but not half: no restart");
        assert_eq!(window.current(), before);
        observe(&mut window, 200_000, 128);
        assert!(window.wanted().unwrap() >= 2 * before);
    }

    #[test]
    fn a_burst_of_large_messages_shrinks_the_window_and_it_grows_back_after() {
        let mut window = Window::new(64 * MIB, 20_000, MIB);
        observe(&mut window, 300, 64 + 16);
        window.set(window.wanted().unwrap());
        // The mean follows the burst: the window shrinks, in a few steps at most.
        let mut steps = 0;
        for _ in 0..200 {
            window.observe(700_000);
            if let Some(smaller) = window.wanted() {
                assert!(smaller < window.current(), "no growth during the burst");
                window.set(smaller);
                steps += 1;
            }
        }
        assert!((1..=4).contains(&steps), "{steps} steps");
        assert_eq!(window.current(), 95);
        // Small messages again: within two buckets the mean is theirs.
        observe(&mut window, 300, 128);
        assert_eq!(window.wanted(), Some(20_000));
    }

    #[test]
    fn a_lone_large_message_costs_a_few_restarts_at_most() {
        let mut window = Window::new(64 * MIB, 20_000, MIB);
        observe(&mut window, 300, 64);
        window.set(window.wanted().unwrap());
        let mut restarts = 0;
        for i in 0..2_000 {
            window.observe(if i == 500 { MIB } else { 300 });
            if let Some(next) = window.wanted() {
                window.set(next);
                restarts += 1;
            }
        }
        assert!(restarts <= 4, "{restarts} restarts");
        assert_eq!(window.current(), 20_000);
    }

    #[test]
    fn held_bytes_stop_and_restart_the_consumer() {
        let mut window = Window::new(64 * MIB, 20_000, MIB);
        observe(&mut window, 1000, 64);
        window.set(window.wanted().unwrap());
        let mib = MIB as u64;
        assert!(!window.over_budget(64 * mib, 0));
        assert!(window.over_budget(81 * mib, 0));
        assert!(window.has_room(0, 0));
        // 20,000 x 1.5 KB = 30 MB fits beside 40 MiB held (within the quarter's slack).
        assert!(window.has_room(40 * mib, 0));
        assert!(!window.has_room(60 * mib, 0));
        // Dead letters waiting for confirms have an allowance of their own, up to twice
        // the budget with what is held.
        assert!(!window.over_budget(10 * mib, 100 * mib));
        assert!(window.has_room(10 * mib, 60 * mib));
        assert!(window.over_budget(10 * mib, 120 * mib));
        assert!(!window.has_room(0, 120 * mib));
    }

    #[test]
    fn the_window_is_never_zero() {
        let mut window = Window::new(MIB, 20_000, MIB);
        assert_eq!(window.current(), 1);
        observe(&mut window, 10 * MIB, 64);
        assert_eq!(window.wanted(), None);
        window.set(0);
        assert_eq!(window.current(), 1);
    }
}
