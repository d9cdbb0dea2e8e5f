//! The retry budget: retries to a destination may add at most `ratio` of its
//! requests plus `min_per_sec` a second, over a sliding window, so that
//! retries never multiply an outage (Istio has only per-route attempts).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Budget settings (`--retry-budget-percent`, `--retry-budget-min-per-sec`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BudgetConfig {
    /// Retries as a share of requests, 0.0 to 1.0.
    pub ratio: f64,
    /// Retries always allowed per second, whatever the request rate.
    pub min_per_sec: u32,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            ratio: 0.2,
            min_per_sec: 10,
        }
    }
}

const BUCKETS: usize = 10;
const BUCKET: Duration = Duration::from_secs(1);

/// Requests and retries over the last `BUCKETS` seconds.
#[derive(Debug, Default)]
pub struct RetryBudget(Mutex<Window>);

#[derive(Debug, Default)]
struct Window {
    /// Per bucket: (second it counts, requests, retries).
    buckets: [(u64, u32, u32); BUCKETS],
}

fn now_secs(now: Instant) -> u64 {
    crate::wire::since_start(now).as_secs() / BUCKET.as_secs()
}

impl Window {
    fn bucket(&mut self, sec: u64) -> &mut (u64, u32, u32) {
        let b = &mut self.buckets[(sec as usize) % BUCKETS];
        if b.0 != sec {
            *b = (sec, 0, 0);
        }
        b
    }

    fn totals(&self, sec: u64) -> (u64, u64) {
        self.buckets
            .iter()
            .filter(|b| b.0 + (BUCKETS as u64) > sec && b.0 <= sec)
            .fold((0, 0), |(r, t), b| (r + b.1 as u64, t + b.2 as u64))
    }
}

impl RetryBudget {
    /// Counts a request (its first attempt).
    pub fn deposit(&self) {
        self.deposit_at(Instant::now());
    }

    /// Takes one retry from the budget, or says there is none left.
    pub fn withdraw(&self, cfg: &BudgetConfig) -> bool {
        self.withdraw_at(cfg, Instant::now())
    }

    fn deposit_at(&self, now: Instant) {
        let sec = now_secs(now);
        self.0.lock().unwrap().bucket(sec).1 += 1;
    }

    fn withdraw_at(&self, cfg: &BudgetConfig, now: Instant) -> bool {
        let sec = now_secs(now);
        let mut w = self.0.lock().unwrap();
        let (requests, retries) = w.totals(sec);
        let allowed =
            cfg.ratio * requests as f64 + (cfg.min_per_sec as u64 * BUCKETS as u64) as f64;
        if (retries as f64) < allowed {
            w.bucket(sec).2 += 1;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_are_capped_at_the_ratio_plus_the_floor_and_the_window_slides() {
        let b = RetryBudget::default();
        let cfg = BudgetConfig {
            ratio: 0.2,
            min_per_sec: 1,
        };
        let t0 = std::time::Instant::now() + Duration::from_secs(100);
        for _ in 0..1000 {
            b.deposit_at(t0);
        }
        let granted = (0..1000).filter(|_| b.withdraw_at(&cfg, t0)).count();
        // 20 % of 1000 plus 1/s over the 10 s window.
        assert_eq!(granted, 210);
        // Once the window has passed, only the floor is left.
        let later = t0 + Duration::from_secs(11);
        let granted = (0..1000).filter(|_| b.withdraw_at(&cfg, later)).count();
        assert_eq!(granted, 10);
    }
}
