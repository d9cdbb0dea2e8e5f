//! Exponential backoff with jitter, for every loop that reconnects to the
//! control plane. Each wait is drawn from the upper half of the current
//! step, so a fleet that lost pilot or citadel at the same moment (a
//! restart) comes back spread over that half rather than all at once at
//! every step.

use std::time::Duration;

use rand::Rng;

#[derive(Clone, Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            step: min,
        }
    }

    /// How long to wait before the next attempt: somewhere in the upper
    /// half of the current step, which then doubles up to the cap.
    pub fn next_wait(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(self.max);
        step.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    /// After a success: the next failure starts from the shortest step.
    pub fn reset(&mut self) {
        self.step = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_to_the_cap_and_spread_over_the_upper_half_of_each_step() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let steps = [100u64, 200, 400, 800, 1600, 3200, 5000, 5000];
        let mut seen = vec![Vec::new(); steps.len()];
        for _ in 0..200 {
            let mut b = Backoff::new(min, max);
            for waits in seen.iter_mut() {
                waits.push(b.next_wait().as_secs_f64() * 1000.0);
            }
        }
        for (waits, step) in seen.iter().zip(steps) {
            let step = step as f64;
            let lo = waits.iter().cloned().fold(f64::MAX, f64::min);
            let hi = waits.iter().cloned().fold(0.0, f64::max);
            assert!(
                lo >= step / 2.0 && hi <= step,
                "step {step} ms: waits {lo:.1}..{hi:.1} ms leave [{}, {step}]",
                step / 2.0
            );
            // 200 proxies restarting together do not come back together.
            assert!(
                hi - lo > step / 4.0,
                "step {step} ms: 200 waits all within {lo:.1}..{hi:.1} ms"
            );
        }
    }

    #[test]
    fn a_reset_starts_again_from_the_shortest_step() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        for _ in 0..5 {
            b.next_wait();
        }
        b.reset();
        assert!(b.next_wait() <= Duration::from_millis(100));
    }
}
