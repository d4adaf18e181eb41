//! What the records add up to: the engine's counters ([`crate::Stats`]), what merging saves
//! each owner ([`crate::OwnerStats`]), and the audit that checks records and stable nodes
//! against each other. Nothing here changes the state but [`Counters`], which the steps bump
//! as they go: what cannot be read back from the records afterwards (pages visited, passes,
//! merges refused) is counted when it happens.

use std::collections::HashMap;
use std::ops::Range;

use crate::quiesce::OwnerId;
use crate::region::RegionId;
use crate::stable::{ContentKey, Slot};
use crate::{Knobs, MergeNowReport, OwnerStats, PAGE_SIZE, Stats};

use super::MergeState;
use super::records::{COPY, ZERO};
use super::scan::PageRef;

/// Counters kept by the state as things happen (the rest of [`crate::Stats`] is derived
/// from the records, the stable store and the map budget), and the pass-wide facts the
/// scanner's idle-region and nap rules read back.
#[derive(Default)]
pub(super) struct Counters {
    /// Page visits (KSM `pages_scanned`).
    pub(super) pages_scanned: u64,
    /// Passes ended (KSM `full_scans`); smart scan's aligned passes count on it.
    pub(super) full_scans: u64,
    /// Pages whose merge the map-count budget refused.
    pub(super) pages_skipped_map_budget: u64,
    /// Times a region was passed over because its owner was running.
    pub(super) regions_busy_skips: u64,
    /// Times a running owner's region was visited in write-protect windows.
    pub(super) regions_running_visits: u64,
    /// Page visits smart scan skipped (KSM `pages_skipped`).
    pub(super) pages_skipped: u64,
    /// The `full_scans` by which every page has been looked at again since the last news
    /// ([`crate::Stats::smart_scan_horizon`]).
    pub(super) smart_scan_horizon: u64,
    /// The longest smart-scan period a page looked at or skipped in the pass in progress
    /// may have after it (twice its period before a look, which may double it), and the
    /// same for the last whole pass: between them, every page's period right now.
    pub(super) longest_period_this_pass: u64,
    pub(super) longest_period_last_pass: u64,
    /// Times a region was passed over as idle (`RegionPages::quiet_at`).
    pub(super) regions_idle_skips: u64,
    /// Resets that only dropped what the owner wrote (`super::image`).
    pub(super) regions_reset_in_place: u64,
    /// Stretches mapped onto a layout copy (`super::compact`).
    pub(super) stretches_compacted: u64,
    /// Hole punches that failed (memory left allocated, no data affected).
    pub(super) punch_failures: u64,
    /// Pages visited in the pass in progress.
    pub(super) pages_visited_this_pass: u64,
    /// Whether the last whole pass visited no page (every region idle): then the scanner
    /// may sleep longer.
    pub(super) last_pass_idle: bool,
    /// Merges in the pass in progress.
    pub(super) merges_this_pass: u64,
    /// Merges in the last whole pass (how the host sees whether merging has converged).
    pub(super) merges_last_pass: u64,
    /// Whether anything that could make an idle region's pages mergeable happened since the
    /// last pass on which idle regions may be visited began: a visit of a region that was
    /// not idle, a merge, pages given back (room in their stable pages), an image made or
    /// dropped, a knob change, a region gone.
    pub(super) host_awake: bool,
    /// Whether the pass in progress visits idle regions too: one of the passes on which
    /// smart scan looks at every page, and the host was awake since the last of them.
    pub(super) visit_idle_regions: bool,
}

impl Counters {
    /// Moves the smart-scan horizon out to the end of the next pass numbered a multiple of
    /// `period` (smart scan's passes are aligned: a page of that period is looked at then).
    pub(super) fn looked_at_again_within(&mut self, period: u64) {
        let next_look = (self.full_scans / period + 1) * period;
        self.smart_scan_horizon = self.smart_scan_horizon.max(next_look + 1);
    }

    /// A page of smart-scan period `period` looked at or skipped in this pass.
    pub(super) fn period_seen(&mut self, period: u64) {
        let after_a_look = (2 * period).min(Knobs::SMART_SCAN_LONGEST_SKIP);
        self.longest_period_this_pass = self.longest_period_this_pass.max(after_a_look);
    }

    /// A merge, or a page seen new or changed, in this pass: any page may now merge with it,
    /// and each page is looked at again on the next pass numbered a multiple of its period,
    /// so by the next multiple of the longest period every page has been.
    pub(super) fn news(&mut self) {
        let longest = self
            .longest_period_this_pass
            .max(self.longest_period_last_pass)
            .max(1);
        self.looked_at_again_within(longest);
    }

    /// The pass in progress ended.
    pub(super) fn end_pass_periods(&mut self) {
        self.longest_period_last_pass = std::mem::take(&mut self.longest_period_this_pass);
    }
}

/// The result of walking the engine's records ([`crate::Engine::audit`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Audit {
    /// Stable pages in use.
    pub stable_pages: u64,
    /// The most sharers any stable page has.
    pub max_sharers: u32,
    /// Stable slots whose sharer count disagrees with the region pages that map them.
    pub mismatched_slots: Vec<u32>,
    /// Chains found by walking the stable index.
    pub stable_node_chains: u64,
    /// Dups found by walking the stable index.
    pub stable_node_dups: u64,
    /// Whether every page the index names is in use, within the sharing limit, and holds the
    /// same bytes as the rest of its chain.
    pub index_sound: bool,
}

impl MergeState {
    /// What merging saves one owner (as Linux's `/proc/PID/ksm_stat`).
    pub(crate) fn owner_stats(&self, owner: OwnerId) -> OwnerStats {
        let mut stats = OwnerStats::default();
        let mut metadata = 0;
        for record in self
            .records
            .regions
            .values()
            .filter(|r| r.region.owner.id() == owner)
        {
            stats.pages_merged += record.pages.all().filter(|(_, p)| p.shares()).count() as u64;
            stats.zero_pages += record.pages.all().filter(|(_, p)| p.has(ZERO)).count() as u64;
            metadata += (record.pages.metadata_bytes() + record.advice.metadata_bytes()) as i64;
        }
        stats.profit_bytes =
            ((stats.pages_merged + stats.zero_pages) * PAGE_SIZE as u64) as i64 - metadata;
        stats
    }

    /// Pages of `range` in region `id` that map a stable page, and that are freed zeros.
    pub(crate) fn merged_pages(&self, id: RegionId, range: Range<usize>) -> MergeNowReport {
        self.records
            .regions
            .get(&id)
            .map_or_else(MergeNowReport::default, |record| {
                let pages = || record.pages.existing(range.clone());
                MergeNowReport {
                    pages_merged: pages().filter(|(_, p)| p.shares()).count() as u64,
                    zero_pages: pages().filter(|(_, p)| p.has(ZERO)).count() as u64,
                }
            })
    }

    /// The counters; the scanner thread's own (`scanner_cpu_ns`, `errors`) are the
    /// engine's to fill in.
    pub(crate) fn stats(&self) -> Stats {
        let region_bytes: usize = self
            .records
            .regions
            .values()
            .map(|r| r.pages.metadata_bytes() + r.advice.metadata_bytes())
            .sum();
        let metadata_bytes = (region_bytes
            + self.stable.metadata_bytes()
            + self.unstable.capacity() * size_of::<(ContentKey, PageRef)>())
            as u64;
        let saved = self.stable.pages_sharing() + self.records.zero_pages();
        let (stable_node_chains, stable_node_dups) = self.stable.chain_counts();
        let waits = self.wait_figures();
        Stats {
            general_profit_bytes: (saved * PAGE_SIZE as u64) as i64 - metadata_bytes as i64,
            pages_shared: self.stable.pages_shared(),
            pages_sharing: self.stable.pages_sharing(),
            pages_unshared: self.unstable.len() as u64,
            pages_volatile: self.records.volatile_pages(),
            pages_scanned: self.counters.pages_scanned,
            full_scans: self.counters.full_scans,
            vmas: self.budget.vmas(),
            pages_skipped_map_budget: self.counters.pages_skipped_map_budget,
            regions_busy_skips: self.counters.regions_busy_skips,
            metadata_bytes,
            image_pages: self
                .stable
                .pinned_pages()
                .saturating_sub(self.layout_copies.pinned),
            layout_copy_pages: self.layout_copies.pinned,
            pages_tracked: self
                .records
                .regions
                .values()
                .map(|r| r.pages.all().count() as u64)
                .sum(),
            regions: self.records.regions.len() as u64,
            merges_last_pass: self.counters.merges_last_pass,
            zero_pages: self.records.zero_pages(),
            pages_skipped: self.counters.pages_skipped,
            smart_scan_horizon: self.counters.smart_scan_horizon,
            regions_idle_skips: self.counters.regions_idle_skips,
            regions_reset_in_place: self.counters.regions_reset_in_place,
            stretches_compacted: self.counters.stretches_compacted,
            punch_failures: self.counters.punch_failures,
            stable_node_chains,
            stable_node_dups,
            map_budget: self.budget.share(&self.knobs),
            scanner_cpu_ns: 0,
            errors: 0,
            merges_running: u64::from(self.merges_running()),
            regions_running_visits: self.counters.regions_running_visits,
            wp_windows: waits.windows,
            wp_waiters: waits.waiters,
            wp_wait_p50_ns: waits.percentile(0.5).as_nanos() as u64,
            wp_wait_p99_ns: waits.percentile(0.99).as_nanos() as u64,
            wp_wait_max_ns: waits.longest.as_nanos() as u64,
        }
    }

    /// Walks every record and stable node and checks that they agree: each stable page's
    /// sharer count is the number of region pages that map it, and none is above `limit`.
    pub(crate) fn audit(&self) -> Audit {
        // Per slot: (sharers, private copies) found in the page records.
        let mut mapped: HashMap<Slot, (u32, u32)> = HashMap::new();
        for record in self.records.regions.values() {
            for (_, page) in record.pages.all() {
                if let Some(slot) = page.slot() {
                    let counts = mapped.entry(slot).or_default();
                    if page.has(COPY) {
                        counts.1 += 1;
                    } else {
                        counts.0 += 1;
                    }
                }
            }
        }
        // Layout copies count a private copy over each slot they hold no page in.
        for slot in self.layout_copy_holds() {
            mapped.entry(slot).or_default().1 += 1;
        }
        let (chains, dups, index_sound) = self.stable.walk_index();
        let mut audit = Audit {
            stable_node_chains: chains,
            stable_node_dups: dups,
            index_sound,
            ..Audit::default()
        };
        for (slot, node) in self.stable.nodes() {
            audit.stable_pages += u64::from(node.content);
            audit.max_sharers = audit.max_sharers.max(node.sharers);
            // A pinned image page may have no sharer and no copy at all.
            if mapped.remove(&slot).unwrap_or_default() != (node.sharers, node.copies)
                || node.content != (node.sharers > 0 || node.pins > 0)
            {
                audit.mismatched_slots.push(slot);
            }
        }
        audit.mismatched_slots.extend(mapped.keys());
        audit
    }
}
