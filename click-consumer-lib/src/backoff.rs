//! Exponential backoff with jitter, for INSERT retries and reconnects.

use std::{
    hash::{BuildHasher, RandomState},
    time::Duration,
};

/// Doubles from `initial` to `max`; each wait is drawn uniformly from the upper half of
/// the current step ("equal jitter"), so replicas that failed together retry apart.
#[derive(Debug)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    step: Duration,
    attempts: u32,
    seed: RandomState,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max,
            step: initial,
            attempts: 0,
            seed: RandomState::new(),
        }
    }

    /// The wait before the next attempt.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.attempts += 1;
        let step = self.step;
        self.step = (self.step * 2).min(self.max);
        let half = step / 2;
        let random = self.seed.hash_one(self.attempts) as u128;
        let jitter_nanos = random % (half.as_nanos().max(1));
        half + Duration::from_nanos(jitter_nanos as u64)
    }

    /// How many delays have been handed out since the last reset.
    pub(crate) fn attempts(&self) -> u32 {
        self.attempts
    }

    /// Back to the initial step after a success.
    pub(crate) fn reset(&mut self) {
        self.step = self.initial;
        self.attempts = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_inside_the_step() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        let mut backoff = Backoff::new(initial, max);
        let mut step = initial;
        for _ in 0..10 {
            let delay = backoff.next_delay();
            assert!(
                delay >= step / 2 && delay <= step,
                "delay {delay:?} outside [{:?}, {step:?}]",
                step / 2
            );
            step = (step * 2).min(max);
        }
        assert_eq!(backoff.attempts(), 10);
        backoff.reset();
        assert!(backoff.next_delay() <= initial);
    }
}
