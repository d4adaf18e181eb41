//! Run-time settings of the engine, named after `/sys/kernel/mm/ksm/` so that operators who
//! know KSM find their way.

use std::time::Duration;

use crate::{Advisor, Error};

/// What the scanner does, as KSM's `run` file: 0 stop, 1 merge, 2 unmerge everything.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// Keep merged pages, scan nothing.
    Stop,
    /// Scan and merge.
    Merge,
    /// Give every merged page back to its region, then stop.
    UnmergeAll,
}

/// The scanner's settings. All can change while it runs ([`crate::Engine::set_knobs`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Knobs {
    pub run: RunMode,
    /// Pages looked at per batch (KSM `pages_to_scan`).
    pub pages_to_scan: usize,
    /// Pause between batches (KSM `sleep_millisecs`).
    pub sleep: Duration,
    /// Share of `vm.max_map_count`, in percent, that the engine's own mappings may use.
    pub map_budget_percent: u8,
    /// Free pages of zeros by punching them out of their region's memfd instead of merging
    /// them (KSM `use_zero_pages`).
    pub use_zero_pages: bool,
    /// Most sharers a stable page may have (KSM `max_page_sharing`); at least 2, since a new
    /// stable page starts with two. Changes only while nothing is merged.
    pub max_page_sharing: u32,
    /// Skip pages that keep failing to merge for exponentially more passes (KSM
    /// `smart_scan`).
    pub smart_scan: bool,
    /// Tune `pages_to_scan` to meet a target pass time (KSM `advisor_mode=scan-time`);
    /// `None` keeps `pages_to_scan` as set (KSM `advisor_mode=none`).
    pub advisor: Option<Advisor>,
    /// Visit an owner's regions as soon as it parks ([`crate::Engine::parked`]), and again
    /// `park_recheck` later, instead of waiting for the cursor to come round.
    pub scan_on_park: bool,
    /// How long after a park the engine looks again: pages unchanged since the first look
    /// are settled and merge.
    pub park_recheck: Duration,
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            run: RunMode::Merge,
            pages_to_scan: 4096,
            sleep: Duration::from_millis(20),
            map_budget_percent: 50,
            use_zero_pages: true,
            max_page_sharing: 256,
            smart_scan: true,
            advisor: None,
            scan_on_park: true,
            park_recheck: Duration::from_millis(200),
        }
    }
}

impl Knobs {
    pub const PAGES_TO_SCAN: std::ops::RangeInclusive<usize> = 1..=1 << 24;
    pub const MAP_BUDGET_PERCENT: std::ops::RangeInclusive<u8> = 1..=90;

    /// Refuses values outside the accepted ranges, naming the range.
    pub fn validate(&self) -> Result<(), Error> {
        if !Self::PAGES_TO_SCAN.contains(&self.pages_to_scan) {
            return Err(Error::InvalidKnob {
                knob: "pages_to_scan",
                value: self.pages_to_scan as u64,
                accepted: "1 to 16777216",
            });
        }
        if !Self::MAP_BUDGET_PERCENT.contains(&self.map_budget_percent) {
            return Err(Error::InvalidKnob {
                knob: "map_budget_percent",
                value: u64::from(self.map_budget_percent),
                accepted: "1 to 90",
            });
        }
        if self.max_page_sharing < 2 {
            return Err(Error::InvalidKnob {
                knob: "max_page_sharing",
                value: u64::from(self.max_page_sharing),
                accepted: "2 to 4294967295",
            });
        }
        if let Some(advisor) = &self.advisor {
            let bounds = advisor.min_pages_to_scan..=advisor.max_pages_to_scan;
            if advisor.min_pages_to_scan == 0
                || advisor.min_pages_to_scan > advisor.max_pages_to_scan
                || !Self::PAGES_TO_SCAN.contains(bounds.end())
            {
                return Err(Error::InvalidKnob {
                    knob: "advisor_min_pages_to_scan",
                    value: advisor.min_pages_to_scan as u64,
                    accepted: "1 to advisor_max_pages_to_scan, at most 16777216",
                });
            }
            if !(1..=100).contains(&advisor.max_cpu_percent) {
                return Err(Error::InvalidKnob {
                    knob: "advisor_max_cpu",
                    value: u64::from(advisor.max_cpu_percent),
                    accepted: "1 to 100",
                });
            }
            let target = advisor.target_scan_time;
            if target < Duration::from_millis(10) || target > Duration::from_secs(3600) {
                return Err(Error::InvalidKnob {
                    knob: "advisor_target_scan_time (ms)",
                    value: target.as_millis() as u64,
                    accepted: "10 to 3600000",
                });
            }
        }
        if self.park_recheck > Duration::from_secs(60) {
            return Err(Error::InvalidKnob {
                knob: "park_recheck (ms)",
                value: self.park_recheck.as_millis() as u64,
                accepted: "0 to 60000",
            });
        }
        if self.sleep > Duration::from_secs(60) {
            return Err(Error::InvalidKnob {
                knob: "sleep_millisecs",
                value: self.sleep.as_millis() as u64,
                accepted: "0 to 60000",
            });
        }
        Ok(())
    }
}
