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

    /// Takes a token from `key`'s bucket for an attempt whose outcome is not known yet: it
    /// goes back when the reservation is dropped, unless [`Reservation::keep`] was called.
    /// Concurrent attempts each hold a token of their own, so a burst of them cannot all pass
    /// a bucket that has one left.
    pub fn reserve<'a>(&'a self, key: &str) -> Result<Reservation<'a>, Duration> {
        self.take(key)?;
        Ok(Reservation {
            limiter: self,
            key: Some(key.to_owned()),
        })
    }

    /// Puts a token back into `key`'s bucket (never above its burst). A key the map forgot
    /// was full, so there is nothing to give back.
    fn give_back(&self, key: &str) {
        if !self.enabled() {
            return;
        }
        if let Some(mut bucket) = self.buckets.get_mut(key) {
            let now = Instant::now();
            bucket.tokens = (self.refilled(*bucket, now) + 1.0).min(self.burst);
            bucket.updated = now;
        }
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

/// A token taken by [`Limiter::reserve`]: given back when dropped, unless kept.
#[derive(Debug)]
pub struct Reservation<'a> {
    limiter: &'a Limiter,
    key: Option<String>,
}

impl Reservation<'_> {
    /// The attempt counted (a failure): the token stays taken.
    pub fn keep(mut self) {
        self.key = None;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.limiter.give_back(&key);
        }
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
        assert!(limiter.take("a").is_err(), "a refused take takes nothing");
        assert!(limiter.take("b").is_ok(), "another key is not slowed");
        assert!(Limiter::new(0.0, 1).take("a").is_ok());
    }

    #[test]
    fn reservations_hold_a_token_until_given_back_or_kept() {
        let limiter = Limiter::new(0.001, 2);
        let first = limiter.reserve("a").expect("a token");
        let second = limiter.reserve("a").expect("another");
        assert!(limiter.reserve("a").is_err(), "both tokens are held");
        drop(first);
        let third = limiter.reserve("a").expect("the first one came back");
        second.keep();
        third.keep();
        assert!(limiter.reserve("a").is_err(), "kept tokens stay taken");
        assert!(limiter.take("a").is_err(), "a refused take takes nothing");
        let unlimited = Limiter::new(0.0, 1);
        let held = unlimited.reserve("a").expect("no limit");
        assert!(unlimited.reserve("a").is_ok());
        held.keep();
    }
}
