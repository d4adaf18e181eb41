//! Counters, with Linux KSM's names and meanings where KSM has the same counter.

/// A snapshot of the engine's counters ([`crate::Engine::stats`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Stable pages in use: distinct contents that at least one sharer maps.
    pub pages_shared: u64,
    /// Sharers beyond the first of each stable page: the pages saved.
    pub pages_sharing: u64,
    /// Pages that were unchanged for a pass but matched nothing (in the unstable index).
    pub pages_unshared: u64,
    /// Pages whose checksum changed between their last two visits.
    pub pages_volatile: u64,
    /// Pages visited since the engine started.
    pub pages_scanned: u64,
    /// Completed passes over every registered region.
    pub full_scans: u64,
    /// Mappings the engine created and holds in the process (each merged run and each piece
    /// its merge split off a region's own mapping, plus the stable store's view).
    pub vmas: u64,
    /// Pages left unmerged because merging them would have overrun the map-count budget.
    pub pages_skipped_map_budget: u64,
    /// Times the scanner found an owner running and skipped its regions for a batch.
    pub regions_busy_skips: u64,
    /// Hole punches that failed: memory left allocated, no data affected.
    pub punch_failures: u64,
    /// Region visits skipped because the owner had not run since a visit found nothing left
    /// to do in the region (the owner's gate counts its entries).
    pub regions_idle_skips: u64,
    /// Bytes saved by merging and zero pages, minus the metadata kept for it (KSM
    /// `general_profit`).
    pub general_profit_bytes: i64,
    /// Bytes of metadata the engine keeps (per-page records, stable nodes, indexes).
    pub metadata_bytes: u64,
    /// Registered regions.
    pub regions: u64,
    /// Merges (runs remapped) in the last complete pass; zero means the pass found nothing new.
    pub merges_last_pass: u64,
    /// Contents whose stable page hit `max_page_sharing` and became a chain of dups.
    pub stable_node_chains: u64,
    /// Dups in those chains.
    pub stable_node_dups: u64,
    /// Page visits that smart scan skipped (KSM `pages_skipped`).
    pub pages_skipped: u64,
    /// Pages of zeros freed by punching them out of their region (KSM `ksm_zero_pages`).
    pub zero_pages: u64,
    /// Failures the background scanner met (see [`crate::Engine::last_error`]).
    pub errors: u64,
    /// CPU time of the scanner thread, in nanoseconds.
    pub scanner_cpu_ns: u64,
    /// The map-count budget in mappings (share of `vm.max_map_count`).
    pub map_budget: u64,
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
