//! Run-time settings of the engine, named after `/sys/kernel/mm/ksm/` so that operators who
//! know KSM find their way.
//!
//! [`Knobs`] holds the values; [`KNOBS`] declares each knob once (its name, whether KSM has it,
//! the values it takes, its unit and its help), and every surface that sets knobs is derived
//! from that declaration: the command-line flags of `samepage run` and `samepage serve`, the
//! `[engine]` table of the serve config and the help text. Adding a knob is a field here, its
//! default, and one entry in [`KNOBS`].

mod declared;

use std::time::Duration;

use crate::{Advisor, Error};

pub use declared::{KNOBS, Knob, KnobValue, Origin, Values};

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

/// KSM's `advisor_mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdvisorMode {
    /// `pages_to_scan` stays as set.
    None,
    /// `pages_to_scan` is tuned after every pass to meet `advisor_target_scan_time`.
    ScanTime,
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
    /// Whether `pages_to_scan` is tuned to meet a target pass time (KSM `advisor_mode`).
    pub advisor_mode: AdvisorMode,
    /// The advisor's settings (KSM's `advisor_*` files), kept whatever the mode, as KSM keeps
    /// them.
    pub advisor: Advisor,
    /// Visit an owner's regions as soon as it parks ([`crate::Engine::parked`]), and again
    /// `park_recheck` later, instead of waiting for the cursor to come round.
    pub scan_on_park: bool,
    /// How long after a park the engine looks again: pages unchanged since the first look
    /// are settled and merge.
    pub park_recheck: Duration,
    /// Merge the pages of owners whose guest code is running, in write-protect windows
    /// (rule 7 of [`crate::quiesce`]), where the kernel allows it; else only parked owners.
    pub merge_running: bool,
    /// How long an owner's call must have run before its pages are merged while it runs:
    /// calls that end sooner are merged once parked, as before, rather than paying for
    /// windows (a serverless request mostly ends well within it).
    pub merge_running_after: Duration,
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
            advisor_mode: AdvisorMode::None,
            advisor: Advisor::default(),
            scan_on_park: true,
            park_recheck: Duration::from_millis(200),
            merge_running: true,
            merge_running_after: Duration::from_millis(100),
        }
    }
}

/// The values a knob accepts. The engine validates with it, its errors quote it, and command
/// lines build their parsers from it, so a range is written down once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnobRange {
    /// The knob's name, as in `/sys/kernel/mm/ksm/` where KSM has it.
    pub name: &'static str,
    pub min: u64,
    pub max: u64,
    /// The unit of the values (`"ms"`, `"%"`), or `""` for counts.
    pub unit: &'static str,
}

impl KnobRange {
    const fn new(name: &'static str, min: u64, max: u64, unit: &'static str) -> Self {
        Self {
            name,
            min,
            max,
            unit,
        }
    }

    pub fn contains(&self, value: u64) -> bool {
        (self.min..=self.max).contains(&value)
    }

    /// Refuses `value` when it is outside the range, naming the knob and the range.
    pub fn check(&self, value: u64) -> Result<(), Error> {
        if self.contains(value) {
            Ok(())
        } else {
            Err(Error::InvalidKnob { knob: *self, value })
        }
    }
}

impl std::fmt::Display for KnobRange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} to {}", self.min, self.max)?;
        if !self.unit.is_empty() {
            write!(f, " {}", self.unit)?;
        }
        Ok(())
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Knobs {
    /// The most passes smart scan lets go by between two looks at a page that keeps failing
    /// to merge.
    pub const SMART_SCAN_LONGEST_SKIP: u64 = 32;

    /// How many passes in a row must merge nothing before every page was looked at since
    /// the last merge: with smart scan, a page skipped since long may match a stable page
    /// made meanwhile, and merges only when its turn comes.
    pub fn passes_to_see_every_page(&self) -> u64 {
        if self.smart_scan {
            Self::SMART_SCAN_LONGEST_SKIP
        } else {
            1
        }
    }

    pub const PAGES_TO_SCAN: KnobRange = KnobRange::new("pages_to_scan", 1, 1 << 24, "");
    pub const SLEEP_MILLISECS: KnobRange = KnobRange::new("sleep_millisecs", 0, 60_000, "ms");
    pub const MAP_BUDGET_PERCENT: KnobRange = KnobRange::new("map_budget_percent", 1, 90, "%");
    /// At least 2, since a new stable page starts with two sharers.
    pub const MAX_PAGE_SHARING: KnobRange =
        KnobRange::new("max_page_sharing", 2, u32::MAX as u64, "");
    pub const PARK_RECHECK_MILLISECS: KnobRange =
        KnobRange::new("park_recheck_millisecs", 0, 60_000, "ms");
    pub const MERGE_RUNNING_AFTER_MILLISECS: KnobRange =
        KnobRange::new("merge_running_after_millisecs", 0, 3_600_000, "ms");
    pub const ADVISOR_TARGET_SCAN_TIME: KnobRange =
        KnobRange::new("advisor_target_scan_time", 10, 3_600_000, "ms");
    pub const ADVISOR_MAX_CPU: KnobRange = KnobRange::new("advisor_max_cpu", 1, 100, "%");
    /// Each of the advisor's bounds of `pages_to_scan`; the minimum is also at most the maximum.
    pub const ADVISOR_PAGES_TO_SCAN: KnobRange = KnobRange {
        name: "advisor_min_pages_to_scan, advisor_max_pages_to_scan",
        ..Self::PAGES_TO_SCAN
    };

    /// The advisor's settings when it is on.
    pub fn active_advisor(&self) -> Option<&Advisor> {
        (self.advisor_mode == AdvisorMode::ScanTime).then_some(&self.advisor)
    }

    /// The knob called `name`, its sysfs spelling (a config file's key).
    pub fn declared(name: &str) -> Option<&'static Knob> {
        KNOBS.iter().find(|knob| knob.name == name)
    }

    /// Refuses values outside the accepted ranges, naming the range.
    pub fn validate(&self) -> Result<(), Error> {
        Self::PAGES_TO_SCAN.check(self.pages_to_scan as u64)?;
        Self::SLEEP_MILLISECS.check(millis(self.sleep))?;
        Self::MAP_BUDGET_PERCENT.check(u64::from(self.map_budget_percent))?;
        Self::MAX_PAGE_SHARING.check(u64::from(self.max_page_sharing))?;
        Self::PARK_RECHECK_MILLISECS.check(millis(self.park_recheck))?;
        Self::MERGE_RUNNING_AFTER_MILLISECS.check(millis(self.merge_running_after))?;
        if let Some(advisor) = self.active_advisor() {
            Self::ADVISOR_TARGET_SCAN_TIME.check(millis(advisor.target_scan_time))?;
            Self::ADVISOR_MAX_CPU.check(u64::from(advisor.max_cpu_percent))?;
            Self::ADVISOR_PAGES_TO_SCAN.check(advisor.min_pages_to_scan as u64)?;
            Self::ADVISOR_PAGES_TO_SCAN.check(advisor.max_pages_to_scan as u64)?;
            if advisor.min_pages_to_scan > advisor.max_pages_to_scan {
                return Err(Error::AdvisorBounds {
                    min: advisor.min_pages_to_scan,
                    max: advisor.max_pages_to_scan,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_range_values_are_refused_with_the_range() {
        assert!(Knobs::default().validate().is_ok());
        let error = Knobs {
            pages_to_scan: 0,
            ..Knobs::default()
        }
        .validate()
        .expect_err("zero pages to scan");
        assert_eq!(
            error.to_string(),
            "pages_to_scan = 0 is out of range: accepted 1 to 16777216"
        );
        let error = Knobs {
            sleep: Duration::from_secs(61),
            ..Knobs::default()
        }
        .validate()
        .expect_err("a minute's sleep");
        assert!(error.to_string().contains("0 to 60000 ms"), "{error}");
        let advisor = Advisor {
            min_pages_to_scan: 10,
            max_pages_to_scan: 5,
            ..Advisor::default()
        };
        let error = Knobs {
            advisor_mode: AdvisorMode::ScanTime,
            advisor,
            ..Knobs::default()
        }
        .validate()
        .expect_err("crossed bounds");
        assert!(matches!(error, Error::AdvisorBounds { min: 10, max: 5 }));
    }
}
