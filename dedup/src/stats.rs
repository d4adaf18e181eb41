//! Counters, with Linux KSM's names and meanings where KSM has the same counter.
//!
//! [`Stats`] is the one place where a counter's name and meaning are written down. Everything
//! that shows counters (the run report, its human form, another merger's figures read under
//! the same names, metrics) walks [`Stats::counters`] or [`Stats::COUNTERS`] instead of
//! naming fields by hand, so a new counter shows up everywhere at once.

/// Declares [`Stats`] and its table of counters from one list: each field's doc comment is
/// also its help text, and `ksm` names the file of `/sys/kernel/mm/ksm/` with the same meaning,
/// if there is one.
macro_rules! declare_stats {
    ($( $(#[doc = $doc:literal])+ $name:ident: $ty:ident, ksm: $ksm:expr; )+) => {
        /// A snapshot of the engine's counters ([`crate::Engine::stats`]).
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        pub struct Stats {
            $( $(#[doc = $doc])+ pub $name: $ty, )+
        }

        impl Stats {
            /// Every counter, in declaration order.
            pub const COUNTERS: &'static [Counter] = &[
                $( Counter {
                    name: stringify!($name),
                    doc: concat!($($doc),+),
                    ksm: $ksm,
                }, )+
            ];

            /// Every counter with its value, in declaration order.
            pub fn counters(&self) -> impl Iterator<Item = (&'static Counter, Value)> + '_ {
                let values = [$( Value::from(self.$name) ),+];
                Self::COUNTERS.iter().zip(values)
            }

            /// Sets the counter called `name`; `false` when there is none by that name (or the
            /// value does not fit it). For figures of another merger under the same names.
            pub fn set(&mut self, name: &str, value: Value) -> bool {
                match name {
                    $( stringify!($name) => match value.try_into() {
                        Ok(value) => {
                            self.$name = value;
                            true
                        }
                        Err(_) => false,
                    }, )+
                    _ => false,
                }
            }
        }
    };
}

/// The name and meaning of one counter of [`Stats`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counter {
    /// The field's name, as the report and metrics print it.
    pub name: &'static str,
    /// The field's documentation, lines joined.
    doc: &'static str,
    /// The file of `/sys/kernel/mm/ksm/` that counts the same thing, if KSM has one.
    pub ksm: Option<&'static str>,
}

impl Counter {
    /// What it counts, in a sentence or two (the field's documentation).
    pub fn help(&self) -> &'static str {
        self.doc.trim_start()
    }
}

/// A counter's value: most count up from zero; profit can go below it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Value {
    Count(u64),
    Signed(i64),
}

impl From<u64> for Value {
    fn from(value: u64) -> Self {
        Value::Count(value)
    }
}

impl From<i64> for Value {
    fn from(value: i64) -> Self {
        Value::Signed(value)
    }
}

impl TryFrom<Value> for u64 {
    type Error = std::num::TryFromIntError;
    fn try_from(value: Value) -> Result<Self, Self::Error> {
        match value {
            Value::Count(count) => Ok(count),
            Value::Signed(signed) => u64::try_from(signed),
        }
    }
}

impl TryFrom<Value> for i64 {
    type Error = std::num::TryFromIntError;
    fn try_from(value: Value) -> Result<Self, Self::Error> {
        match value {
            Value::Count(count) => i64::try_from(count),
            Value::Signed(signed) => Ok(signed),
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Count(count) => count.fmt(f),
            Value::Signed(signed) => signed.fmt(f),
        }
    }
}

declare_stats! {
    /// Stable pages in use: distinct contents that at least one sharer maps.
    pages_shared: u64, ksm: Some("pages_shared");
    /// Sharers beyond the first of each stable page: the pages saved.
    pages_sharing: u64, ksm: Some("pages_sharing");
    /// Pages that were unchanged for a pass but matched nothing (in the unstable index).
    pages_unshared: u64, ksm: Some("pages_unshared");
    /// Pages whose checksum changed between their last two visits.
    pages_volatile: u64, ksm: Some("pages_volatile");
    /// Pages visited since the engine started.
    pages_scanned: u64, ksm: Some("pages_scanned");
    /// Completed passes over every registered region.
    full_scans: u64, ksm: Some("full_scans");
    /// Mappings the engine created and holds in the process (each merged run and each piece
    /// its merge split off a region's own mapping, plus the stable store's view).
    vmas: u64, ksm: None;
    /// Pages left unmerged because merging them would have overrun the map-count budget.
    pages_skipped_map_budget: u64, ksm: None;
    /// Times the scanner found an owner running and skipped its regions for a batch.
    regions_busy_skips: u64, ksm: None;
    /// Hole punches that failed: memory left allocated, no data affected.
    punch_failures: u64, ksm: None;
    /// Region visits skipped because the owner had not run since a visit found nothing left
    /// to do in the region (the owner's gate counts its entries).
    regions_idle_skips: u64, ksm: None;
    /// Resets of a region whose mappings had not changed since its image was mapped: only
    /// what the owner wrote was dropped, nothing remapped.
    regions_reset_in_place: u64, ksm: None;
    /// Stretches of a region that merges had cut into many mappings, mapped onto one copy
    /// of their layout shared by the regions that map the same pages there.
    stretches_compacted: u64, ksm: None;
    /// Bytes saved by merging and zero pages, minus the metadata kept for it (KSM
    /// `general_profit`).
    general_profit_bytes: i64, ksm: Some("general_profit");
    /// Bytes of metadata the engine keeps (per-page records, stable nodes, indexes).
    metadata_bytes: u64, ksm: None;
    /// Pages the engine keeps a record for: those that exist (hold data in their region's
    /// memfd, or map a stable page), as KSM keeps `rmap_item`s for present pages.
    pages_tracked: u64, ksm: None;
    /// Stable pages that module images hold for instances to come, shared or not.
    image_pages: u64, ksm: None;
    /// Stable pages that layout copies hold (see `stretches_compacted`), shared or not.
    layout_copy_pages: u64, ksm: None;
    /// Registered regions.
    regions: u64, ksm: None;
    /// Merges (runs remapped) in the last complete pass; zero means the pass found nothing new.
    merges_last_pass: u64, ksm: None;
    /// Contents whose stable page hit `max_page_sharing` and became a chain of dups.
    stable_node_chains: u64, ksm: Some("stable_node_chains");
    /// Dups in those chains.
    stable_node_dups: u64, ksm: Some("stable_node_dups");
    /// Page visits that smart scan skipped (KSM `pages_skipped`).
    pages_skipped: u64, ksm: Some("pages_skipped");
    /// The value of `full_scans` by which every page has been looked at again since the last
    /// news (a merge, or a page seen new or changed): the end of the next pass numbered a
    /// multiple of the longest smart-scan period any page had then, or of the next pass that
    /// visits idle regions smart scan holds back. Once merging stopped changing, nothing more
    /// can merge when `full_scans` has passed both the last change and this: a host waiting
    /// for merging to settle waits no longer than what can still merge.
    smart_scan_horizon: u64, ksm: None;
    /// Pages of zeros freed by punching them out of their region (KSM `ksm_zero_pages`).
    zero_pages: u64, ksm: Some("ksm_zero_pages");
    /// Failures the background scanner met (see [`crate::Engine::last_error`]).
    errors: u64, ksm: None;
    /// CPU time of the scanner thread, in nanoseconds.
    scanner_cpu_ns: u64, ksm: None;
    /// The map-count budget in mappings (share of `vm.max_map_count`).
    map_budget: u64, ksm: None;
    /// 1 when owners are merged while their guest code runs (write-protect windows), 0 when
    /// only parked owners are ([`crate::Engine::running_merges`] says why).
    merges_running: u64, ksm: None;
    /// Visits of a running owner's region, in write-protect windows.
    regions_running_visits: u64, ksm: None;
    /// Write-protect windows opened on running owners' pages.
    wp_windows: u64, ksm: None;
    /// Writes that met a window and waited for it to close.
    wp_waiters: u64, ksm: None;
    /// Median, over windows some write waited on, of how long the window was open (a bound
    /// on the wait), in nanoseconds, to within a fifth.
    wp_wait_p50_ns: u64, ksm: None;
    /// The 99th percentile of the same.
    wp_wait_p99_ns: u64, ksm: None;
    /// The longest of the same.
    wp_wait_max_ns: u64, ksm: None;
}

/// What merging saves one owner, as Linux's `/proc/PID/ksm_stat`
/// ([`crate::Engine::owner_stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OwnerStats {
    /// The owner's pages that map a stable page (KSM `ksm_merging_pages`).
    pub pages_merged: u64,
    /// The owner's pages of zeros freed (KSM `ksm_zero_pages`).
    pub zero_pages: u64,
    /// Bytes those pages save, minus the metadata kept for the owner's regions (KSM
    /// `ksm_process_profit`).
    pub profit_bytes: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_is_a_counter_once_and_can_be_set_by_name() {
        let mut stats = Stats::default();
        let mut names: Vec<&str> = Stats::COUNTERS.iter().map(|c| c.name).collect();
        for (n, name) in names.iter().enumerate() {
            assert!(stats.set(name, Value::Count(n as u64 + 1)), "{name}");
        }
        for (n, (counter, value)) in stats.counters().enumerate() {
            assert_eq!(counter.name, names[n]);
            assert_eq!(u64::try_from(value), Ok(n as u64 + 1), "{}", counter.name);
            assert!(!counter.help().is_empty() && !counter.help().starts_with(' '));
        }
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Stats::COUNTERS.len());
        assert!(!stats.set("no_such_counter", Value::Count(1)));
        assert!(!stats.set("pages_shared", Value::Signed(-1)));
        assert!(stats.set("general_profit_bytes", Value::Signed(-4096)));
        assert_eq!(stats.general_profit_bytes, -4096);
    }
}
