//! What the stores of a [`crate::Host`] hold: the data of each instance's `Store`.
//!
//! A host's instance lives in a `Store<HostState>` of its own ([`crate::Instance`]), and
//! everything the instance needs from its store's data is here:
//!
//! - the WASI context: preview 1 for core modules, whose preview 2 context serves components
//!   ([`WasiView`]), so one store type runs both;
//! - the [`StoreOwner`] ([`HasStoreOwner`]), for the instance's guard and regions and for the
//!   guest API's host functions, which ask a store's data for its owner;
//! - the host's [`Limits`], for telling why a call stopped, and the store's limiter built
//!   from them. [`HostState::new`] builds the limiter from the same limits it keeps, so the
//!   two always agree; the host installs it with `Store::limiter(HostState::limiter)`.

use wasmtime::{ResourceLimiter, StoreLimits};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::{WasiCtxView, WasiView};

use crate::limits::Limits;
use crate::store::{HasStoreOwner, StoreOwner};

/// What a host's stores hold: the instance's WASI context, its owner and its limits.
pub struct HostState {
    /// WASI preview 1 for core modules; its preview 2 context serves components.
    pub(crate) wasi: WasiP1Ctx,
    /// The owner of the store's memories, with their regions and the guard while it runs.
    pub(crate) owner: StoreOwner,
    /// The host's limits, for telling an instance why it stopped.
    pub(crate) limits: Limits,
    /// The store's limiter, enforcing `limits.max_memory_size`.
    store_limits: StoreLimits,
}

impl HostState {
    /// The data of a new store: `wasi` and `owner` for its instance, under `limits`.
    pub(crate) fn new(wasi: WasiP1Ctx, owner: StoreOwner, limits: Limits) -> Self {
        Self {
            wasi,
            owner,
            limits,
            store_limits: limits.store_limits(),
        }
    }

    /// The store's limiter, for `Store::limiter`.
    pub(crate) fn limiter(&mut self) -> &mut dyn ResourceLimiter {
        &mut self.store_limits
    }
}

impl HasStoreOwner for HostState {
    fn store_owner(&self) -> &StoreOwner {
        &self.owner
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        self.wasi.ctx()
    }
}
