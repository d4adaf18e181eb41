//! A store's owner: the piece of samepage that lives in an embedder's `Store<T>`.
//!
//! Every store whose memories samepage merges has one [`StoreOwner`], made by
//! [`crate::Samepage::owner`]. It is the store's [`Owner`] for the merge engine, and it keeps
//! the quiescence contract ([`samepage_dedup::quiesce`]) for the embedder, who never holds a
//! guard by hand:
//!
//! - **While wasm runs, the guard is held.** [`StoreOwner::instantiate`] (and its component
//!   twin) installs a `Store::call_hook` that takes the owner's guard when the host calls
//!   into wasm and lets go when the outermost call returns. Host functions that wasm calls run
//!   inside that call, guard held, so they may read and write guest memory freely; a host
//!   function that calls back into wasm nests (the hook counts depth and never takes the gate
//!   twice). When the outermost call returns, the engine hears that the owner parked (scan on
//!   park), unless the store's instances serve one call each ([`crate::Lifetime`]).
//! - **Instantiation is an owner writing.** wasmtime creates the memories and writes data
//!   segments inside `instantiate`; the owner's scope names the owner to the memory creator
//!   and holds the guard throughout, and the memories it created become this owner's
//!   [`MemoryRegion`]s (in creation order: the first is a core module's memory 0, or the main
//!   module's memory of a component made by `wasm-tools component new`).
//! - **Host access outside calls goes through [`StoreOwner::access`]**, which holds the guard
//!   for the closure (nesting too).
//! - **Host calls that need the guard** (the guest API's `merge-now` and `advise`) get it with
//!   [`StoreOwner::with_guard`], which lends the guard the hook holds.
//!
//! An embedder that has a call hook of its own calls [`StoreOwner::on_call`] from it instead
//! of letting samepage install one (a store has one call hook).
//!
//! Code that instantiates into a store by itself (a library handed the `Store`, a test
//! harness such as `wasmtime-wast`) runs inside [`StoreOwner::instantiating`], which names
//! the owner to the memory creator and holds the guard as [`StoreOwner::instantiate`] does.
//!
//! One case the hook cannot see: calling a *component* export whose parameters or results
//! pass through linear memory (strings, lists) makes wasmtime write them into guest memory
//! around the core call, outside it. Make such calls inside [`StoreOwner::access`], which
//! holds the guard across the whole call. (`wasi:cli/run`, which takes and returns nothing
//! in memory, needs no such care.)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;
use samepage_dedup::{Engine, LentGate, Owner, OwnerGuard, OwnerStats, RegionId};
use wasmtime::{CallHook, Store};

use crate::RuntimeError;
use crate::embed::Lifetime;
use crate::image::{ImagePlan, ModuleImages};
use crate::memory::{MemoryRegion, OwnerScope};

/// What [`StoreOwner::instantiate`] takes: a samepage [`crate::Module`] (its images are
/// mapped) or a plain `wasmtime::Module` (wasmtime copies its data segments).
#[derive(Clone, Copy)]
pub struct ModuleRef<'a> {
    module: &'a wasmtime::Module,
    images: Option<&'a ModuleImages>,
}

impl<'a> From<&'a wasmtime::Module> for ModuleRef<'a> {
    fn from(module: &'a wasmtime::Module) -> Self {
        Self {
            module,
            images: None,
        }
    }
}

impl<'a> From<&'a crate::Module> for ModuleRef<'a> {
    fn from(module: &'a crate::Module) -> Self {
        Self {
            module: module.wasmtime(),
            images: Some(module.images()),
        }
    }
}

/// What [`StoreOwner::instantiate_component`] takes, as [`ModuleRef`] for components.
#[derive(Clone, Copy)]
pub struct ComponentRef<'a> {
    component: &'a wasmtime::component::Component,
    images: Option<&'a ModuleImages>,
}

impl<'a> From<&'a wasmtime::component::Component> for ComponentRef<'a> {
    fn from(component: &'a wasmtime::component::Component) -> Self {
        Self {
            component,
            images: None,
        }
    }
}

impl<'a> From<&'a crate::Component> for ComponentRef<'a> {
    fn from(component: &'a crate::Component) -> Self {
        Self {
            component: component.wasmtime(),
            images: Some(component.images()),
        }
    }
}

/// A module pre-linked for instantiation, with its images: what
/// [`StoreOwner::instantiate_pre`] takes. Type-checking the imports and resolving them
/// happens once, in [`ModulePre::new`]; each instantiation only creates and initialises.
/// Cheap to clone.
pub struct ModulePre<T: 'static> {
    pre: wasmtime::InstancePre<T>,
    images: Option<Arc<ModuleImages>>,
}

impl<T: 'static> Clone for ModulePre<T> {
    fn clone(&self) -> Self {
        Self {
            pre: self.pre.clone(),
            images: self.images.clone(),
        }
    }
}

impl<T: 'static> ModulePre<T> {
    /// Resolves `module`'s imports in `linker` once.
    pub fn new(linker: &wasmtime::Linker<T>, module: &crate::Module) -> Result<Self, RuntimeError> {
        Ok(Self {
            pre: linker
                .instantiate_pre(module.wasmtime())
                .map_err(RuntimeError::Instantiate)?,
            images: Some(module.images().clone()),
        })
    }

    /// The wasmtime `InstancePre` (its module's lifted segments are empty: instantiate it
    /// through [`StoreOwner::instantiate_pre`], which maps the images).
    pub fn wasmtime(&self) -> &wasmtime::InstancePre<T> {
        &self.pre
    }
}

/// A plain `InstancePre`, whose module keeps its data segments (wasmtime copies them).
impl<T: 'static> From<wasmtime::InstancePre<T>> for ModulePre<T> {
    fn from(pre: wasmtime::InstancePre<T>) -> Self {
        Self { pre, images: None }
    }
}

/// [`ModulePre`] for components: what [`StoreOwner::instantiate_component_pre`] takes.
pub struct ComponentPre<T: 'static> {
    pre: wasmtime::component::InstancePre<T>,
    images: Option<Arc<ModuleImages>>,
}

impl<T: 'static> Clone for ComponentPre<T> {
    fn clone(&self) -> Self {
        Self {
            pre: self.pre.clone(),
            images: self.images.clone(),
        }
    }
}

impl<T: 'static> ComponentPre<T> {
    /// Resolves `component`'s imports in `linker` once.
    pub fn new(
        linker: &wasmtime::component::Linker<T>,
        component: &crate::Component,
    ) -> Result<Self, RuntimeError> {
        Ok(Self {
            pre: linker
                .instantiate_pre(component.wasmtime())
                .map_err(RuntimeError::Instantiate)?,
            images: Some(component.images().clone()),
        })
    }

    /// The wasmtime `InstancePre` (see [`ModulePre::wasmtime`]).
    pub fn wasmtime(&self) -> &wasmtime::component::InstancePre<T> {
        &self.pre
    }
}

/// A plain component `InstancePre` (wasmtime copies its data segments).
impl<T: 'static> From<wasmtime::component::InstancePre<T>> for ComponentPre<T> {
    fn from(pre: wasmtime::component::InstancePre<T>) -> Self {
        Self { pre, images: None }
    }
}

/// Store data that holds a [`StoreOwner`]: what host functions that need the owner (the guest
/// API's) ask of a store's data.
pub trait HasStoreOwner {
    fn store_owner(&self) -> &StoreOwner;
}

impl HasStoreOwner for StoreOwner {
    fn store_owner(&self) -> &StoreOwner {
        self
    }
}

/// The owner of one store's memories; cheap to clone (all clones are the same owner). Keep
/// one in the store's data to reach it from host functions.
#[derive(Clone)]
pub struct StoreOwner {
    shared: Arc<OwnerState>,
}

struct OwnerState {
    owner: Owner,
    /// The engine merging this owner's memories; `None` when the host does not merge.
    dedup: Option<Engine>,
    /// The guard while the owner runs, and how deeply calls nest.
    held: Mutex<Held>,
    /// Lend the gate to the engine's running merges while wasm runs (rule 7 of
    /// `samepage_dedup::quiesce`): set only when the engine merges running owners.
    merge_while_running: AtomicBool,
    /// The store's memories, in creation order.
    regions: Mutex<Vec<MemoryRegion>>,
    /// Merge new memories right after instantiation (see [`crate::SamepageConfig`]).
    merge_on_instantiate: bool,
    /// How long its instances live: a kept one's parks are announced to the engine.
    lifetime: Lifetime,
    /// The images the store's memories were made from, for resets.
    images: Mutex<Option<ImagePlan>>,
}

#[derive(Default)]
struct Held {
    /// Calls into wasm (and host accesses) in progress.
    depth: u32,
    /// The owner's guard, while `depth > 0` and host code may run.
    guard: Option<OwnerGuard>,
    /// The same, lent to running merges while wasm runs.
    lent: Option<LentGate>,
    /// Whether wasm ran since the guard was taken: then its release is a park.
    ran: bool,
}

impl StoreOwner {
    pub(crate) fn new(
        owner: Owner,
        dedup: Option<Engine>,
        merge_on_instantiate: bool,
        lifetime: Lifetime,
    ) -> Self {
        Self {
            shared: Arc::new(OwnerState {
                owner,
                dedup,
                held: Mutex::new(Held::default()),
                merge_while_running: AtomicBool::new(false),
                regions: Mutex::new(Vec::new()),
                merge_on_instantiate,
                lifetime,
                images: Mutex::new(None),
            }),
        }
    }

    /// The owner the merge engine knows this store by.
    pub fn owner(&self) -> &Owner {
        &self.shared.owner
    }

    /// The merge engine, when the host merges.
    pub fn dedup(&self) -> Option<&Engine> {
        self.shared.dedup.as_ref()
    }

    /// The store's memories registered with the engine, in creation order.
    pub fn regions(&self) -> Vec<MemoryRegion> {
        self.shared.regions.lock().clone()
    }

    /// The store's first memory (a core module's memory 0, a component's main module's).
    pub fn first_region(&self) -> Option<MemoryRegion> {
        self.shared.regions.lock().first().copied()
    }

    /// Bytes of the store's registered memories, added up (zero when nothing merges them).
    pub fn memory_bytes(&self) -> u64 {
        let Some(engine) = self.dedup() else {
            return 0;
        };
        let regions = self.shared.regions.lock();
        regions
            .iter()
            .filter_map(|region| engine.owned_region_len(region.id, self.owner().id()))
            .map(|len| len as u64)
            .sum()
    }

    /// Copies of the store's registered memories, in creation order, read with the guard
    /// held: what the instance sees, for checks against a shadow copy.
    pub fn snapshot(&self) -> Vec<Vec<u8>> {
        let Some(engine) = self.dedup() else {
            return Vec::new();
        };
        let regions = self.regions();
        self.access(|| {
            regions
                .iter()
                .filter_map(|region| {
                    let len = engine.owned_region_len(region.id, self.owner().id())?;
                    // SAFETY: a region registered under this owner is `len` readable bytes at
                    // `base` for as long as it stays so, which the store (alive behind
                    // `&self`'s store data) keeps it: a memory dropped with its store goes to
                    // another owner (a slot's) or is unregistered, and is then skipped here;
                    // the guard held here keeps the owner from writing, and the engine from
                    // remapping or handing the region over, while the bytes are copied.
                    let bytes =
                        unsafe { std::slice::from_raw_parts(region.base as *const u8, len) };
                    Some(bytes.to_vec())
                })
                .collect()
        })
    }

    /// The region of the memory that starts at `base`.
    pub fn region_at(&self, base: usize) -> Option<RegionId> {
        let regions = self.shared.regions.lock();
        regions.iter().find(|r| r.base == base).map(|r| r.id)
    }

    /// What merging saves this owner (as Linux's `/proc/PID/ksm_stat`); zeros unmerged.
    pub fn stats(&self) -> OwnerStats {
        self.dedup()
            .map(|engine| engine.owner_stats(self.owner().id()))
            .unwrap_or_default()
    }

    /// What samepage's call hook does, for an embedder whose own hook calls it.
    pub fn on_call(&self, hook: CallHook) -> wasmtime::Result<()> {
        match hook {
            CallHook::CallingWasm => {
                self.enter(true);
                self.lend();
            }
            CallHook::ReturningFromWasm => {
                self.reclaim();
                self.leave();
            }
            // Host functions called by wasm run inside the call, with the guard held: taken
            // back from running merges first, so that no write of theirs (the kernel's
            // included, as `fd_read` makes) meets a write-protected page.
            CallHook::CallingHost => self.reclaim(),
            CallHook::ReturningFromHost => self.lend(),
        }
        Ok(())
    }

    /// Lets the merge engine merge this owner's memories while its wasm code runs, or not
    /// (then only while it is parked, between calls). It takes effect from the next call into
    /// wasm, and only if the engine can ([`samepage_dedup::Engine::running_merges`]); returns
    /// whether it is on.
    pub fn merge_while_running(&self, on: bool) -> bool {
        let on = on
            && self
                .dedup()
                .is_some_and(|engine| engine.running_merges().is_ok());
        self.shared.merge_while_running.store(on, Ordering::Relaxed);
        on
    }

    /// Lends the guard to running merges, if this owner merges while running.
    fn lend(&self) {
        if !self.shared.merge_while_running.load(Ordering::Relaxed) {
            return;
        }
        let mut held = self.shared.held.lock();
        if let Some(guard) = held.guard.take() {
            held.lent = Some(guard.lend());
        }
    }

    /// Takes the guard back from running merges, waiting at most for one window.
    fn reclaim(&self) {
        let mut held = self.shared.held.lock();
        if let Some(lent) = held.lent.take() {
            held.guard = Some(lent.reclaim());
        }
    }

    /// Installs samepage's call hook on `store` (replacing any other).
    pub fn drive<T>(&self, store: &mut Store<T>) {
        let owner = self.clone();
        store.call_hook(move |_, hook| owner.on_call(hook));
    }

    /// Runs `f` with the owner's guard held: for the host's reads and writes of the store's
    /// memories outside calls into wasm. Nests with calls and with itself.
    pub fn access<R>(&self, f: impl FnOnce() -> R) -> R {
        self.enter(false);
        let result = f();
        self.leave();
        result
    }

    /// Runs `f` with the guard the owner holds right now (inside a call into wasm, or inside
    /// [`StoreOwner::access`]); `None` when the owner is not running.
    pub fn with_guard<R>(&self, f: impl FnOnce(&OwnerGuard) -> R) -> Option<R> {
        let held = self.shared.held.lock();
        held.guard.as_ref().map(f)
    }

    /// Instantiates `module` through `linker` into `store`, with this owner's memories:
    /// installs the call hook, names the owner to the memory creator and holds the guard
    /// while wasmtime creates memories and runs the start function. A [`crate::Module`]'s
    /// memories start as its images, mapped; a plain `wasmtime::Module` gets its data
    /// segments copied in by wasmtime.
    pub fn instantiate<'m, T>(
        &self,
        store: &mut Store<T>,
        linker: &wasmtime::Linker<T>,
        module: impl Into<ModuleRef<'m>>,
    ) -> Result<wasmtime::Instance, RuntimeError> {
        let ModuleRef { module, images } = module.into();
        let memories = module.resources_required().num_memories;
        self.drive(store);
        self.creating(store, memories, images, |store| {
            linker.instantiate(store, module)
        })
    }

    /// [`StoreOwner::instantiate`] for a component: its core instances' memories are all this
    /// owner's.
    pub fn instantiate_component<'m, T>(
        &self,
        store: &mut Store<T>,
        linker: &wasmtime::component::Linker<T>,
        component: impl Into<ComponentRef<'m>>,
    ) -> Result<wasmtime::component::Instance, RuntimeError> {
        let ComponentRef { component, images } = component.into();
        let memories = component
            .resources_required()
            .map_or(0, |resources| resources.num_memories);
        self.drive(store);
        self.creating(store, memories, images, |store| {
            linker.instantiate(store, component)
        })
    }

    /// [`StoreOwner::instantiate`] from a pre-linked module: the imports were resolved once,
    /// in [`ModulePre::new`].
    pub fn instantiate_pre<T>(
        &self,
        store: &mut Store<T>,
        pre: &ModulePre<T>,
    ) -> Result<wasmtime::Instance, RuntimeError> {
        let memories = pre.pre.module().resources_required().num_memories;
        self.drive(store);
        self.creating(store, memories, pre.images.as_deref(), |store| {
            pre.pre.instantiate(store)
        })
    }

    /// [`StoreOwner::instantiate_component`] from a pre-linked component.
    pub fn instantiate_component_pre<T>(
        &self,
        store: &mut Store<T>,
        pre: &ComponentPre<T>,
    ) -> Result<wasmtime::component::Instance, RuntimeError> {
        let memories = pre
            .pre
            .component()
            .resources_required()
            .map_or(0, |resources| resources.num_memories);
        self.drive(store);
        self.creating(store, memories, pre.images.as_deref(), |store| {
            pre.pre.instantiate(store)
        })
    }

    /// Puts every memory of the store back to its module image (or zeros), in time
    /// proportional to the pages the instance touched: what it wrote is freed and the images
    /// are mapped again. Globals and tables are not the memories': this is for instances whose
    /// calls leave them as they found them, or for memories about to be reused.
    pub fn reset_memories(&self) -> Result<(), RuntimeError> {
        let Some(engine) = self.dedup() else {
            return Ok(());
        };
        let regions = self.regions();
        let images = self.shared.images.lock().clone();
        self.access(|| {
            self.with_guard(|guard| {
                for (index, region) in regions.iter().enumerate() {
                    let image = images.as_ref().and_then(|plan| plan.image_of(index));
                    engine.reset_region(guard, region.id, image)?;
                }
                Ok::<_, samepage_dedup::Error>(())
            })
            .transpose()
        })?;
        Ok(())
    }

    /// Runs an instantiation `f` that creates `memories` linear memories, as the owner.
    fn creating<T, R>(
        &self,
        store: &mut Store<T>,
        memories: u32,
        images: Option<&ModuleImages>,
        f: impl FnOnce(&mut Store<T>) -> wasmtime::Result<R>,
    ) -> Result<R, RuntimeError> {
        let plan = match (images, self.dedup()) {
            (Some(images), Some(engine)) if images.has_content() => {
                Some(images.plan(engine, self.owner().domain())?)
            }
            (Some(images), None) if images.has_content() => {
                return Err(RuntimeError::ImagesWithoutMerging);
            }
            _ => None,
        };
        let scope = OwnerScope::enter(self.owner(), plan.clone());
        let result = self.access(|| f(store));
        let created = scope.take_created();
        let result = result.map_err(|source| match scope.take_failure() {
            Some(memory) => RuntimeError::MemoryCreation(memory),
            None => RuntimeError::Instantiate(source),
        })?;
        if created.len() < memories as usize && self.dedup().is_some() {
            // wasmtime made memories without asking samepage's creator: the pooling
            // allocator does that. They cannot be merged, and nothing must pretend they are.
            return Err(RuntimeError::ForeignMemories {
                created: created.len(),
                expected: memories as usize,
            });
        }
        self.adopt(created, plan)?;
        Ok(result)
    }

    /// Runs `f` as an instantiation by this owner, for code that instantiates into the store
    /// itself where [`StoreOwner::instantiate`] cannot wrap it: a library or a test harness
    /// (such as `wasmtime-wast`) that takes the `Store` and calls `Linker::instantiate` or
    /// `Memory::new` on it. Memories that wasmtime creates on this thread inside `f` become
    /// this owner's [`MemoryRegion`]s, and the guard is held for all of `f`, so wasmtime's
    /// copies of data segments and any start function run as the owner's writes (calls into
    /// wasm inside `f` nest, as in [`StoreOwner::access`]). Install the call hook first
    /// ([`StoreOwner::drive`] or [`StoreOwner::on_call`]), so that calls made after `f` hold
    /// the guard too.
    ///
    /// What it cannot do that [`StoreOwner::instantiate`] does: map module images (wasmtime
    /// copies the data segments of whatever `f` instantiates), and count the memories the
    /// instantiation should have made, since it does not know the module; build the engine
    /// from the `Config` that [`crate::Samepage::configure`] set up, or memories made without
    /// samepage's creator stay unmerged unnoticed. A memory samepage cannot create (a shared
    /// one, say) fails the instantiation inside `f`, with samepage's reason in wasmtime's
    /// error: `f` sees it as it would any failed instantiation. The error here is only the
    /// merge of the new memories ([`crate::SamepageConfig::merge_on_instantiate`]) failing.
    pub fn instantiating<R>(&self, f: impl FnOnce() -> R) -> Result<R, RuntimeError> {
        let scope = OwnerScope::enter(self.owner(), None);
        let result = self.access(f);
        let created = scope.take_created();
        self.adopt(created, None)?;
        Ok(result)
    }

    /// Makes the memories an instantiation `created` this owner's regions (and `plan` its
    /// images, if they are the store's first), and merges them when they were copied in.
    fn adopt(
        &self,
        created: Vec<MemoryRegion>,
        plan: Option<ImagePlan>,
    ) -> Result<(), RuntimeError> {
        // Memories made from images start merged; what wasmtime copied in has to be merged.
        let merge_now = self
            .dedup()
            .filter(|_| self.shared.merge_on_instantiate && !created.is_empty() && plan.is_none());
        {
            let mut regions = self.shared.regions.lock();
            if regions.is_empty() {
                *self.shared.images.lock() = plan;
            }
            regions.extend(created);
        }
        if merge_now.is_some() {
            // The data segments wasmtime copied (and a start function's writes) are the same
            // in every instance of the module: they start out shared, as wasmtime's
            // copy-on-write images would be.
            self.merge_now()?;
        }
        Ok(())
    }

    /// Merges what can be merged in the store's memories now, with the guard held, instead
    /// of waiting for the scanner ([`samepage_dedup::Engine::merge_owner_now`]): for a host
    /// that must keep its memory down while it starts instances. `None` without merging.
    pub fn merge_now(&self) -> Result<Option<samepage_dedup::MergeNowReport>, RuntimeError> {
        let Some(engine) = self.dedup() else {
            return Ok(None);
        };
        Ok(self
            .access(|| self.with_guard(|guard| engine.merge_owner_now(guard)))
            .transpose()?)
    }

    fn enter(&self, wasm: bool) {
        let mut held = self.shared.held.lock();
        if held.depth == 0 {
            held.guard = Some(self.shared.owner.enter());
            held.ran = false;
        }
        held.depth += 1;
        held.ran |= wasm;
    }

    fn leave(&self) {
        let mut held = self.shared.held.lock();
        held.depth = held.depth.saturating_sub(1);
        if held.depth > 0 {
            return;
        }
        if let Some(lent) = held.lent.take() {
            // A call that ended without its return hook (it cannot, but a guard left lent
            // would keep the scanner merging a parked owner in windows).
            drop(lent.reclaim());
        }
        held.guard = None;
        let parked = std::mem::take(&mut held.ran) && self.shared.lifetime == Lifetime::Kept;
        drop(held);
        if parked && let Some(engine) = &self.shared.dedup {
            engine.parked(&self.shared.owner);
        }
    }
}

impl std::fmt::Debug for StoreOwner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreOwner")
            .field("owner", &self.shared.owner.id())
            .field("regions", &self.shared.regions.lock().len())
            .finish()
    }
}
