//! The per-container query rate limit: a token bucket, so a burst (a
//! program starting and resolving everything it needs) passes while a
//! flood is held to the steady rate.

use std::time::Instant;

/// A token bucket of `burst` tokens refilled at `rate` per second.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket; a `rate` of 0 means no limit.
    pub fn new(rate: u32, now: Instant) -> TokenBucket {
        let rate = f64::from(rate);
        TokenBucket {
            rate,
            burst: rate * 2.0,
            tokens: rate * 2.0,
            last: now,
        }
    }

    /// Takes a token if there is one at `now`.
    pub fn take(&mut self, now: Instant) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_passes_then_the_steady_rate_holds() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, t0);
        let passed = (0..1000).filter(|_| b.take(t0)).count();
        assert_eq!(passed, 200, "the burst is twice the rate");
        // One second later, one second's worth passes.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!((0..1000).filter(|_| b.take(t1)).count(), 100);
        // A long pause refills no more than the burst.
        let t2 = t1 + Duration::from_secs(60);
        assert_eq!((0..1000).filter(|_| b.take(t2)).count(), 200);
    }

    #[test]
    fn zero_means_unlimited() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0, t0);
        assert!((0..100_000).all(|_| b.take(t0)));
    }
}
