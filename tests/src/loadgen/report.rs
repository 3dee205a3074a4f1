//! The result of a run: a table for people, or one JSON object for scripts.

use std::fmt::Write as _;

use serde_json::json;
use tonic::Code;

use super::runner::{Plan, Stats, Stop};

pub use platform::metrics::code_name;

/// Everything a report shows.
pub struct Report<'a> {
    pub scenario: &'a str,
    pub target: &'a str,
    pub connections: usize,
    pub plan: Plan,
    pub stats: &'a Stats,
    pub setup: &'a serde_json::Value,
}

/// The percentiles reported, as (label, JSON key, quantile).
const PERCENTILES: [(&str, &str, f64); 4] = [
    ("p50", "p50", 0.50),
    ("p90", "p90", 0.90),
    ("p99", "p99", 0.99),
    ("p99.9", "p99_9", 0.999),
];

impl Report<'_> {
    fn requests_per_sec(&self) -> f64 {
        let secs = self.stats.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.stats.requests() as f64 / secs
        } else {
            0.0
        }
    }

    fn errors(&self) -> impl Iterator<Item = (&'static str, u64, &str)> {
        self.stats
            .errors
            .iter()
            .map(|(code, (count, sample))| (code_name(Code::from(*code)), *count, sample.as_str()))
    }

    /// One JSON object; latencies in microseconds.
    pub fn json(&self) -> serde_json::Value {
        let latency = &self.stats.latency;
        let mut latency_us = serde_json::Map::new();
        for (_, key, quantile) in PERCENTILES {
            latency_us.insert(key.to_owned(), latency.value_at_quantile(quantile).into());
        }
        latency_us.insert("max".to_owned(), latency.max().into());
        latency_us.insert("min".to_owned(), latency.min().into());
        latency_us.insert("mean".to_owned(), json!(latency.mean()));
        let errors: serde_json::Map<_, _> = self
            .errors()
            .map(|(name, count, _)| (name.to_owned(), count.into()))
            .collect();
        let samples: serde_json::Map<_, _> = self
            .errors()
            .map(|(name, _, sample)| (name.to_owned(), sample.into()))
            .collect();
        let (duration_secs, requests_limit) = match self.plan.stop {
            Stop::After(d) => (Some(d.as_secs_f64()), None),
            Stop::Requests(n) => (None, Some(n)),
        };
        json!({
            "scenario": self.scenario,
            "target": self.target,
            "loop": if self.plan.rate.is_some() { "open" } else { "closed" },
            "rate": self.plan.rate,
            "concurrency": self.plan.concurrency,
            "connections": self.connections,
            "duration_secs": duration_secs,
            "requests_limit": requests_limit,
            "warmup_secs": self.plan.warmup.as_secs_f64(),
            "warmup_requests": self.stats.warmup_requests,
            "elapsed_secs": self.stats.elapsed.as_secs_f64(),
            "requests": self.stats.requests(),
            "ok": self.stats.ok,
            "errors": errors,
            "error_samples": samples,
            "requests_per_sec": self.requests_per_sec(),
            "latency_us": latency_us,
            "behind_schedule": self.stats.behind_schedule,
            "unsent": self.stats.unsent,
            "setup": self.setup,
        })
    }

    /// A table; latencies in milliseconds.
    pub fn human(&self) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        let stats = self.stats;
        let latency = &stats.latency;
        let mut out = String::new();
        let mode = match self.plan.rate {
            Some(rate) => format!(
                "open loop at {rate} requests/s, at most {} in flight",
                self.plan.concurrency
            ),
            None => format!("closed loop, concurrency {}", self.plan.concurrency),
        };
        let _ = writeln!(out, "scenario     {}", self.scenario);
        let _ = writeln!(
            out,
            "target       {} ({} connection(s))",
            self.target, self.connections
        );
        let _ = writeln!(out, "mode         {mode}");
        let _ = writeln!(
            out,
            "measured     {:.2} s after {:.2} s warmup ({} warmup requests not counted)",
            stats.elapsed.as_secs_f64(),
            self.plan.warmup.as_secs_f64(),
            stats.warmup_requests
        );
        let _ = writeln!(
            out,
            "requests     {} (ok {}, errors {})",
            stats.requests(),
            stats.ok,
            stats.requests() - stats.ok
        );
        let _ = writeln!(
            out,
            "throughput   {:.1} requests/s",
            self.requests_per_sec()
        );
        if self.plan.rate.is_some() {
            let _ = writeln!(
                out,
                "behind       {} requests started >1 ms after their slot (all workers busy)",
                stats.behind_schedule
            );
            if stats.unsent > 0 {
                let _ = writeln!(
                    out,
                    "unsent       {} scheduled requests never sent: every worker was busy until the end (not in the latency below)",
                    stats.unsent
                );
            }
        }
        let _ = writeln!(out, "latency (ms, all measured requests)");
        for (label, _, quantile) in PERCENTILES {
            let _ = writeln!(
                out,
                "  {label:<6} {:>10.3}",
                ms(latency.value_at_quantile(quantile))
            );
        }
        let _ = writeln!(out, "  {:<6} {:>10.3}", "max", ms(latency.max()));
        let _ = writeln!(out, "  {:<6} {:>10.3}", "mean", latency.mean() / 1000.0);
        if !stats.errors.is_empty() {
            let _ = writeln!(out, "errors by status code");
            for (name, count, sample) in self.errors() {
                let _ = writeln!(out, "  {name:<20} {count:>10}  e.g. {sample}");
            }
        }
        out
    }
}
