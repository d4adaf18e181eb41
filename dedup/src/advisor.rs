//! The scan-time advisor (KSM's `advisor_mode=scan-time`): instead of a fixed
//! `pages_to_scan`, the operator names how long a full pass should take, and the engine tunes
//! `pages_to_scan` after every pass to meet it, within bounds and under a CPU cap.

use std::time::Duration;

/// The advisor's settings, as KSM's `advisor_*` files.
#[derive(Clone, Debug, PartialEq)]
pub struct Advisor {
    /// How long a full pass should take (KSM `advisor_target_scan_time`).
    pub target_scan_time: Duration,
    /// Bounds of the tuned `pages_to_scan` (KSM `advisor_min_pages_to_scan`,
    /// `advisor_max_pages_to_scan`).
    pub min_pages_to_scan: usize,
    pub max_pages_to_scan: usize,
    /// Most of one core the scanner may use, in percent (KSM `advisor_max_cpu`).
    pub max_cpu_percent: u8,
}

impl Default for Advisor {
    fn default() -> Self {
        Self {
            target_scan_time: Duration::from_secs(1),
            min_pages_to_scan: 500,
            max_pages_to_scan: 1 << 16,
            max_cpu_percent: 70,
        }
    }
}

impl Advisor {
    /// `pages_to_scan` for the next pass, given the last pass's wall and CPU time at
    /// `current`. The pass time scales about inversely with `pages_to_scan` (the sleeps
    /// between batches dominate), and so does the CPU share; half of each correction is
    /// applied at a time so that one odd pass does not swing the rate.
    pub fn next_pages_to_scan(&self, current: usize, pass: Duration, cpu: Duration) -> usize {
        let pass_secs = pass.as_secs_f64().max(1e-6);
        let wanted = current as f64 * pass_secs / self.target_scan_time.as_secs_f64().max(1e-6);
        let cpu_share = cpu.as_secs_f64() / pass_secs;
        let cpu_cap = f64::from(self.max_cpu_percent) / 100.0;
        let capped = if cpu_share > cpu_cap {
            wanted.min(current as f64 * cpu_cap / cpu_share)
        } else {
            wanted
        };
        let smoothed = (current as f64 + capped) / 2.0;
        (smoothed.round() as usize).clamp(self.min_pages_to_scan, self.max_pages_to_scan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_pass_scans_more_and_a_fast_one_less() {
        let advisor = Advisor::default();
        let faster = advisor.next_pages_to_scan(1000, Duration::from_secs(4), Duration::ZERO);
        assert!(faster > 1000);
        let slower = advisor.next_pages_to_scan(1000, Duration::from_millis(250), Duration::ZERO);
        assert!(slower < 1000);
        let steady = advisor.next_pages_to_scan(1000, Duration::from_secs(1), Duration::ZERO);
        assert_eq!(steady, 1000);
    }

    #[test]
    fn the_cpu_cap_and_the_bounds_hold() {
        let advisor = Advisor {
            max_cpu_percent: 10,
            ..Advisor::default()
        };
        // A pass four times too slow but at 50% CPU: the cap wins over the target.
        let next = advisor.next_pages_to_scan(1000, Duration::from_secs(4), Duration::from_secs(2));
        assert!(next <= 1000, "{next}");
        assert_eq!(
            advisor.next_pages_to_scan(600, Duration::from_millis(1), Duration::ZERO),
            advisor.min_pages_to_scan
        );
        assert_eq!(
            advisor.next_pages_to_scan(1 << 16, Duration::from_secs(100), Duration::ZERO),
            advisor.max_pages_to_scan
        );
    }
}
