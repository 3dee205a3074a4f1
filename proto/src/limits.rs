//! Token buckets per key (a UPN, a peer address) in a concurrent map: abuse limits that slow
//! down one key without slowing anyone else. The map is a cache of recent keys, not a record:
//! full buckets are forgotten when the map grows, and a restart forgets them all.

use std::time::{Duration, Instant};

use dashmap::DashMap;

/// How many keys a map holds before it forgets the ones whose buckets have refilled.
const SWEEP_AT: usize = 10_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    updated: Instant,
}

/// A rate limit: `burst` tokens, refilled at `per_second`. A rate of 0 means no limit.
#[derive(Debug)]
pub struct Limiter {
    buckets: DashMap<String, Bucket>,
    per_second: f64,
    burst: f64,
}

impl Limiter {
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self {
            buckets: DashMap::new(),
            per_second,
            burst: f64::from(burst.max(1)),
        }
    }

    /// `per_minute` events a minute per key, with a burst of the same size.
    pub fn per_minute(per_minute: u32) -> Self {
        Self::new(f64::from(per_minute) / 60.0, per_minute)
    }

    fn enabled(&self) -> bool {
        self.per_second > 0.0
    }

    fn refilled(&self, bucket: Bucket, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(bucket.updated).as_secs_f64();
        (bucket.tokens + elapsed * self.per_second).min(self.burst)
    }

    /// Whether `key` has a token left, without taking it; if not, how long until it has.
    pub fn check(&self, key: &str) -> Result<(), Duration> {
        if !self.enabled() {
            return Ok(());
        }
        let now = Instant::now();
        match self.buckets.get(key) {
            Some(bucket) => self.wait_for(self.refilled(*bucket, now)),
            None => Ok(()),
        }
    }

    /// Takes a token from `key`'s bucket, or says how long until one is there.
    pub fn take(&self, key: &str) -> Result<(), Duration> {
        if !self.enabled() {
            return Ok(());
        }
        if self.buckets.len() >= SWEEP_AT {
            self.sweep();
        }
        let now = Instant::now();
        let mut entry = self.buckets.entry(key.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            updated: now,
        });
        let tokens = self.refilled(*entry, now);
        let result = self.wait_for(tokens);
        entry.tokens = if result.is_ok() { tokens - 1.0 } else { tokens };
        entry.updated = now;
        result
    }

    fn wait_for(&self, tokens: f64) -> Result<(), Duration> {
        if tokens >= 1.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - tokens) / self.per_second))
        }
    }

    /// Forgets keys whose buckets are full again (they would start full anyway).
    fn sweep(&self) {
        let now = Instant::now();
        self.buckets
            .retain(|_, b| self.refilled(*b, now) < self.burst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_runs_dry_and_others_do_not() {
        let limiter = Limiter::new(1.0, 3);
        for _ in 0..3 {
            assert!(limiter.take("a").is_ok());
        }
        let wait = limiter.take("a").expect_err("dry");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(limiter.check("a").is_err());
        assert!(limiter.take("b").is_ok(), "another key is not slowed");
        assert!(Limiter::new(0.0, 1).take("a").is_ok());
    }
}
