//! Module images for memfd memories: data segments lifted out of a module when it is loaded,
//! and mapped, not copied, into every instance's memory.
//!
//! wasmtime's copy-on-write images (`memory_init_cow`) assume a memory is wasmtime's own
//! mmap, so samepage's memfd memories turn them off, and wasmtime would then copy each
//! instance's data segments into its memory. Instead, [`Module::new`] *lifts* the segments:
//!
//! 1. It reads the module's active data segments. When every one of them targets a memory the
//!    module defines, at a constant offset, and fits that memory's initial size, their bytes
//!    are laid out once, page-aligned, as each memory's initial content (in segment order,
//!    later segments overwriting earlier ones, as instantiation writes them).
//! 2. It compiles a rewritten module in which each of those segments is an empty passive
//!    segment. wasmtime then writes nothing at instantiation; segment indices are unchanged,
//!    and an empty passive segment behaves exactly as an active segment does after
//!    instantiation (which drops it): `memory.init` of it traps unless it copies nothing,
//!    and `data.drop` does nothing. A module without a data count section cannot name a
//!    segment from its code (`memory.init` and `data.drop` need that section to validate),
//!    so there the lifted segments are left out altogether: wasmtime keeps a base and a
//!    length in every instance's `VMContext` for each passive segment and writes them at
//!    each instantiation, which for CPython's 24,171 segments costs more than the rest of
//!    its instantiation.
//! 3. The first instantiation in a domain builds the engine's image of each memory
//!    ([`samepage_dedup::MemoryImage`]); the memory creator maps it into each new memory,
//!    whose pages start merged.
//!
//! A module with any segment that cannot be lifted (an offset read from a global, an
//! imported memory, a segment past the initial size) is left as it is, whole: wasmtime
//! copies its segments as before, and reports an out-of-bounds segment with its own error.
//! Lifting all or nothing keeps the order of writes exactly wasmtime's.
//!
//! A component's core modules are lifted too, at any depth of nested components. The memory
//! creator is told nothing of which module a memory is for, so an instantiation carries the
//! list of the memories it will create, in the order wasmtime creates them, each with its
//! initial size (the creator refuses a memory of another size rather than map an image into
//! the wrong memory; that check is a guard, the order below is the design). wasmtime inlines
//! a component into one list of core instantiations (`inline.rs` and `dfg.rs` of
//! `wasmtime-environ`) and runs them in that order: a component's core instance and
//! component instance sections in section order, a nested component's instantiation
//! contributing its own, recursively, where its `instantiate` stands, and once per
//! `instantiate`; each core instance creates its module's defined memories in index order.
//! The adapter modules wasmtime adds between components import their memories and create
//! none. So the plan is made by walking the binary once (lifting each module section, and
//! recording per component what enters its core module and component index spaces and what
//! it instantiates), then instantiating the top-level component symbolically: core modules
//! and components are followed through definitions, instantiation arguments, exports and
//! outer aliases. A module or component taken from an instance's exports, or imported by the
//! top-level component, is not followed: if one is instantiated, the order is unknown and the
//! component is left whole, every module as it is.
//!
//! What is not lifted is kept, with the reason ([`Unlifted`], [`ModuleImages::unlifted`]),
//! for the host to report.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use samepage_dedup::{DomainId, MemoryImage, PAGE_SIZE};
use wasmparser::{
    Chunk, ComponentAlias, ComponentExternalKind, ComponentInstance, ComponentOuterAliasKind,
    ComponentTypeRef, DataKind, Instance, Operator, Parser, Payload,
};

use crate::RuntimeError;
use component::{MAX_NESTING, lift_component};

mod component;

/// Images larger than this (from the memory's start to the end of its last segment) are not
/// built: the module keeps its segments and wasmtime copies them.
const MAX_IMAGE_BYTES: u64 = 1 << 30;

/// Why a module's data could not be lifted: it is then compiled as it is.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the module does not parse: {0}")]
    Parse(#[from] wasmparser::BinaryReaderError),
    #[error("the module's text does not parse: {0}")]
    Text(#[from] wat::Error),
    #[error("the module or component nested at byte {0} runs past the end of the binary")]
    Truncated(usize),
}

/// What was not lifted, and why: wasmtime copies those data segments into every instance.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unlifted {
    /// A core module keeps all its segments (the others of its component are lifted).
    #[error("{module} keeps its data segments: {why}")]
    Module { module: ModuleAt, why: SegmentsKept },
    /// No module of the component is lifted: the order of its memories is not known.
    #[error("no data segment of the component is lifted: {0}")]
    Component(UnknownOrder),
}

/// Which core module: the one loaded, or one in a component's binary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleAt {
    /// The core module given to [`Module::new`].
    Itself,
    /// The `index`th module section of a component, counted depth-first through its nested
    /// components, at byte `offset` of the binary.
    InComponent { index: usize, offset: usize },
}

impl std::fmt::Display for ModuleAt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModuleAt::Itself => write!(f, "the module"),
            ModuleAt::InComponent { index, offset } => {
                write!(f, "core module {index} (at byte {offset:#x})")
            }
        }
    }
}

/// Why a core module's segments stay in it: the first segment (or memory) found that cannot
/// be lifted, by its index in the module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SegmentsKept {
    #[error("data segment {0}'s offset is not a constant: it is computed at instantiation")]
    OffsetNotConstant(u32),
    #[error("data segment {0} is for an imported memory")]
    ImportedMemory(u32),
    #[error("data segment {0} ends past its memory's initial size (instantiation traps)")]
    PastInitialSize(u32),
    #[error("data segment {0} ends past {MAX_IMAGE_BYTES} bytes, the largest image built")]
    TooLarge(u32),
    #[error("memory {0} is shared")]
    SharedMemory(u32),
}

/// Why the memories a component's instantiation creates cannot be planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UnknownOrder {
    #[error(
        "it instantiates a core module imported or taken from an instance's exports, whose \
         memories samepage does not follow"
    )]
    ModuleFromOutside,
    #[error(
        "it instantiates a component imported or taken from an instance's exports, whose \
         memories samepage does not follow"
    )]
    ComponentFromOutside,
    #[error("its components nest or instantiate more than {MAX_NESTING} deep")]
    TooDeep,
}

/// One linear memory an instantiation creates, in creation order.
#[derive(Clone, Debug)]
struct PlannedMemory {
    /// The memory's initial size in bytes: the creator checks it.
    minimum: u64,
    /// Its initial content, whole pages from offset 0, when its segments were lifted and are
    /// not all zeros; shared by every instantiation of its module within a component.
    content: Option<Arc<[u8]>>,
}

/// The memories one instantiation of a module or component creates, and the images built of
/// them per domain.
#[derive(Debug, Default)]
pub struct ModuleImages {
    /// Per memory to be created: its initial size, and whether it has an image.
    memories: Vec<(u64, bool)>,
    unlifted: Vec<Unlifted>,
    state: Mutex<ImagesState>,
}

#[derive(Debug, Default)]
struct ImagesState {
    /// The lifted bytes per memory, until the first domain's images are built from them;
    /// later domains' images are read back from the first's, so that the host keeps no copy.
    contents: Option<Vec<Option<Arc<[u8]>>>>,
    /// Per domain, an image per planned memory (`None` for those that start as zeros).
    built: HashMap<DomainId, Arc<[Option<MemoryImage>]>>,
}

impl ModuleImages {
    fn new(lifted: Lifted) -> Self {
        let Lifted {
            memories, unlifted, ..
        } = lifted;
        Self {
            memories: memories
                .iter()
                .map(|memory| (memory.minimum, memory.content.is_some()))
                .collect(),
            unlifted,
            state: Mutex::new(ImagesState {
                contents: Some(memories.into_iter().map(|memory| memory.content).collect()),
                built: HashMap::new(),
            }),
        }
    }
}

/// What the memory creator follows during one instantiation: per memory to be created, in
/// order, its initial size and image. Cheap to clone.
#[derive(Clone)]
pub(crate) struct ImagePlan {
    images: Arc<[Option<MemoryImage>]>,
    minimums: Arc<[u64]>,
}

impl ImagePlan {
    /// The initial size of the `index`th memory created, if the plan has one.
    pub(crate) fn minimum(&self, index: usize) -> Option<u64> {
        self.minimums.get(index).copied()
    }

    /// The image of the `index`th memory created, if it has one.
    pub(crate) fn image_of(&self, index: usize) -> Option<&MemoryImage> {
        self.images.get(index)?.as_ref()
    }
}

impl ModuleImages {
    /// Whether any memory has content to map.
    pub fn has_content(&self) -> bool {
        self.memories.iter().any(|&(_, image)| image)
    }

    /// What was not lifted, and why (empty for a module or component compiled as it is by
    /// choice, through `From`).
    pub fn unlifted(&self) -> &[Unlifted] {
        &self.unlifted
    }

    /// The plan for an instantiation in `domain`, building the domain's images on first use.
    pub(crate) fn plan(
        &self,
        engine: &samepage_dedup::Engine,
        domain: DomainId,
    ) -> Result<ImagePlan, RuntimeError> {
        let mut state = self.state.lock();
        let images = match state.built.get(&domain) {
            Some(images) => images.clone(),
            None => {
                let read_back: Vec<Option<Arc<[u8]>>>;
                let contents = match &state.contents {
                    Some(contents) => contents,
                    None => {
                        let built = state.built.values().next().expect("built once");
                        read_back = built
                            .iter()
                            .map(|image| image.as_ref().map(|image| image.read().into()))
                            .collect();
                        &read_back
                    }
                };
                let images: Arc<[Option<MemoryImage>]> = contents
                    .iter()
                    .map(|content| {
                        let image = content.as_ref().map(|bytes| engine.image(domain, bytes));
                        image.transpose()
                    })
                    .collect::<Result<_, _>>()?;
                // Built once: from now on the stable store holds the only copy.
                state.contents = None;
                state.built.insert(domain, images.clone());
                images
            }
        };
        Ok(ImagePlan {
            images,
            minimums: self.memories.iter().map(|&(minimum, _)| minimum).collect(),
        })
    }
}

/// A core module compiled for samepage's memories: its data segments lifted into images.
#[derive(Clone, Debug)]
pub struct Module {
    module: wasmtime::Module,
    images: Arc<ModuleImages>,
}

impl Module {
    /// Compiles `bytes` (binary or text) with its data segments lifted (see the module docs).
    pub fn new(engine: &wasmtime::Engine, bytes: &[u8]) -> wasmtime::Result<Self> {
        let binary = wat::parse_bytes(bytes)?;
        let mut lifted = lift_module(&binary, ModuleAt::Itself)?;
        let wasm = lifted.wasm.take();
        let module = wasmtime::Module::new(engine, wasm.as_deref().unwrap_or(&binary))?;
        Ok(Self {
            module,
            images: Arc::new(ModuleImages::new(lifted)),
        })
    }

    /// The compiled module (with its lifted segments empty: instantiate it through
    /// [`crate::StoreOwner::instantiate`], which maps the images).
    pub fn wasmtime(&self) -> &wasmtime::Module {
        &self.module
    }

    pub fn images(&self) -> &Arc<ModuleImages> {
        &self.images
    }
}

/// A module compiled as it is: wasmtime copies its data segments (for hosts that do not
/// merge, whose memories are wasmtime's own).
impl From<wasmtime::Module> for Module {
    fn from(module: wasmtime::Module) -> Self {
        Self {
            module,
            images: Arc::default(),
        }
    }
}

/// A component compiled for samepage's memories: its core modules' data segments lifted.
#[derive(Clone)]
pub struct Component {
    component: wasmtime::component::Component,
    images: Arc<ModuleImages>,
}

impl std::fmt::Debug for Component {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Component")
            .field("images", &self.images)
            .finish_non_exhaustive()
    }
}

impl Component {
    pub fn new(engine: &wasmtime::Engine, bytes: &[u8]) -> wasmtime::Result<Self> {
        let binary = wat::parse_bytes(bytes)?;
        let mut lifted = lift_component(&binary)?;
        let wasm = lifted.wasm.take();
        let component =
            wasmtime::component::Component::new(engine, wasm.as_deref().unwrap_or(&binary))?;
        Ok(Self {
            component,
            images: Arc::new(ModuleImages::new(lifted)),
        })
    }

    pub fn wasmtime(&self) -> &wasmtime::component::Component {
        &self.component
    }

    pub fn images(&self) -> &Arc<ModuleImages> {
        &self.images
    }
}

/// As for modules: compiled as it is.
impl From<wasmtime::component::Component> for Component {
    fn from(component: wasmtime::component::Component) -> Self {
        Self {
            component,
            images: Arc::default(),
        }
    }
}

/// What lifting a module or a component gives.
struct Lifted {
    /// The rewritten binary, or `None` when it stays as it is.
    wasm: Option<Vec<u8>>,
    /// The memories an instantiation of it creates, in creation order.
    memories: Vec<PlannedMemory>,
    unlifted: Vec<Unlifted>,
}

/// A defined memory of a module being lifted.
struct DefinedMemory {
    minimum: u64,
    /// Lifted bytes from offset 0 (grown as segments land).
    content: Vec<u8>,
}

/// Lifts a core module's active data segments (see the module docs).
fn lift_module(wasm: &[u8], at: ModuleAt) -> Result<Lifted, ImageError> {
    let mut imported_memories = 0u32;
    let mut memories: Vec<DefinedMemory> = Vec::new();
    // The first reason the module must stay whole; nothing more is laid out after it.
    let mut kept: Option<SegmentsKept> = None;
    let mut segments = 0u32;
    for payload in Parser::new(0).parse_all(wasm) {
        match payload? {
            Payload::ImportSection(imports) => {
                for import in imports.into_imports() {
                    if matches!(import?.ty, wasmparser::TypeRef::Memory(_)) {
                        imported_memories += 1;
                    }
                }
            }
            Payload::MemorySection(section) => {
                for memory in section {
                    let memory = memory?;
                    if memory.shared {
                        let index = imported_memories + memories.len() as u32;
                        kept.get_or_insert(SegmentsKept::SharedMemory(index));
                    }
                    let page = 1u64 << memory.page_size_log2.unwrap_or(16);
                    memories.push(DefinedMemory {
                        minimum: memory.initial.saturating_mul(page),
                        content: Vec::new(),
                    });
                }
            }
            Payload::DataSection(section) => {
                for data in section {
                    let data = data?;
                    let segment = segments;
                    segments += 1;
                    let DataKind::Active {
                        memory_index,
                        offset_expr,
                    } = data.kind
                    else {
                        continue;
                    };
                    if kept.is_some() {
                        continue;
                    }
                    let defined = memory_index
                        .checked_sub(imported_memories)
                        .and_then(|index| memories.get_mut(index as usize));
                    let Some(memory) = defined else {
                        kept = Some(SegmentsKept::ImportedMemory(segment));
                        continue;
                    };
                    let Some(offset) = constant_offset(&offset_expr) else {
                        kept = Some(SegmentsKept::OffsetNotConstant(segment));
                        continue;
                    };
                    let end = offset.saturating_add(data.data.len() as u64);
                    if end > memory.minimum {
                        kept = Some(SegmentsKept::PastInitialSize(segment));
                        continue;
                    }
                    if end > MAX_IMAGE_BYTES {
                        kept = Some(SegmentsKept::TooLarge(segment));
                        continue;
                    }
                    let end = end as usize;
                    if memory.content.len() < end {
                        memory.content.resize(end.next_multiple_of(PAGE_SIZE), 0);
                    }
                    memory.content[offset as usize..end].copy_from_slice(data.data);
                }
            }
            _ => {}
        }
    }
    let lifted = kept.is_none() && segments > 0;
    let memories = memories
        .into_iter()
        .map(|memory| PlannedMemory {
            minimum: memory.minimum,
            content: (lifted && memory.content.iter().any(|&b| b != 0))
                .then(|| memory.content.into()),
        })
        .collect();
    Ok(Lifted {
        wasm: lifted.then(|| rewrite_data(wasm)).transpose()?,
        memories,
        unlifted: kept
            .map(|why| Unlifted::Module { module: at, why })
            .into_iter()
            .collect(),
    })
}

/// The offset of a segment whose offset expression is a constant.
fn constant_offset(expr: &wasmparser::ConstExpr<'_>) -> Option<u64> {
    let mut ops = expr.get_operators_reader();
    let offset = match ops.read().ok()? {
        Operator::I32Const { value } => u64::from(value as u32),
        Operator::I64Const { value } => value as u64,
        _ => return None,
    };
    matches!(ops.read().ok()?, Operator::End).then_some(offset)
}

/// `wasm` with every active data segment turned into an empty passive one, or left out
/// where no code can name a segment (no data count section); every other section copied as
/// it is.
fn rewrite_data(wasm: &[u8]) -> Result<Vec<u8>, ImageError> {
    let payloads = Parser::new(0)
        .parse_all(wasm)
        .collect::<Result<Vec<_>, _>>()?;
    let indices_named = payloads
        .iter()
        .any(|payload| matches!(payload, Payload::DataCountSection { .. }));
    let mut module = wasm_encoder::Module::new();
    for payload in &payloads {
        if let Payload::DataSection(section) = payload {
            let mut data = wasm_encoder::DataSection::new();
            for segment in section.clone() {
                let segment = segment?;
                match segment.kind {
                    DataKind::Active { .. } if indices_named => {
                        data.passive([0u8; 0]);
                    }
                    DataKind::Active { .. } => {}
                    DataKind::Passive => {
                        data.passive(segment.data.iter().copied());
                    }
                }
            }
            module.section(&data);
        } else if let Some((id, range)) = payload.as_section() {
            module.section(&wasm_encoder::RawSection {
                id,
                data: &wasm[range],
            });
        }
    }
    Ok(module.finish())
}

#[cfg(test)]
mod tests;
