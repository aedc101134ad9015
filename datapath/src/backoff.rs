//! Pacing for loops that keep failing: exponential backoff between retries, and a log
//! limiter that lets one line per period through and counts the rest.
//!
//! Pure: callers pass the time in, so the accept loop (and a reactor later) can use
//! them without a clock of their own here.

use std::time::{Duration, Instant};

/// Exponential backoff from `min` to `max`, reset by a success.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Starts at `min`; never waits longer than `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max,
            next: min,
        }
    }

    /// The pause before the next attempt after a failure; doubles the one after it.
    pub fn failed(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// A success: the next failure waits `min` again.
    pub fn succeeded(&mut self) {
        self.next = self.min;
    }
}

/// Lets one event per `period` be logged and counts the ones it holds back.
#[derive(Debug, Clone)]
pub struct LogLimiter {
    period: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimiter {
    /// At most one line per `period`.
    pub fn new(period: Duration) -> LogLimiter {
        LogLimiter {
            period,
            last: None,
            suppressed: 0,
        }
    }

    /// An event at `now`: Some(events suppressed since the last line) if this one should
    /// be logged, None if it is suppressed.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.last {
            Some(t) if now.saturating_duration_since(t) < self.period => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let ms = Duration::from_millis;
        let mut b = Backoff::new(ms(10), ms(100));
        let got: Vec<_> = (0..6).map(|_| b.failed()).collect();
        assert_eq!(got, [ms(10), ms(20), ms(40), ms(80), ms(100), ms(100)]);
        b.succeeded();
        assert_eq!(b.failed(), ms(10));
    }

    #[test]
    fn one_line_per_period_with_the_count_of_the_rest() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut l = LogLimiter::new(Duration::from_secs(1));
        assert_eq!(l.allow(at(0)), Some(0));
        for ms in (10..1000).step_by(10) {
            assert_eq!(l.allow(at(ms)), None);
        }
        assert_eq!(l.allow(at(1000)), Some(99));
        assert_eq!(l.allow(at(1500)), None);
        assert_eq!(l.allow(at(2100)), Some(1));
    }
}
