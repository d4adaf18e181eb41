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
use std::ops::Range;
use std::rc::Rc;
use std::sync::Arc;

use parking_lot::Mutex;
use samepage_dedup::{DomainId, MemoryImage, PAGE_SIZE};
use wasmparser::{
    Chunk, ComponentAlias, ComponentExternalKind, ComponentInstance, ComponentOuterAliasKind,
    ComponentTypeRef, DataKind, Instance, Operator, Parser, Payload,
};

use crate::RuntimeError;

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

/// How deep components may nest, and component instantiations recurse, for samepage to plan
/// them: far deeper than any toolchain's output, and shallow enough for the stack.
const MAX_NESTING: usize = 100;

/// Lifts every core module of a component, at any depth, and plans the memories of its
/// instantiation (see the module docs): all of them, or none when the order is unknown.
fn lift_component(wasm: &[u8]) -> Result<Lifted, ImageError> {
    let mut lifter = ComponentLifter {
        wasm,
        modules: Vec::new(),
        components: Vec::new(),
        unlifted: Vec::new(),
        changed: false,
        too_deep: false,
    };
    let (rewritten, root) = lifter.component(0..wasm.len(), 0)?;
    let mut memories = Vec::new();
    let order = match lifter.too_deep {
        true => Err(UnknownOrder::TooDeep),
        false => lifter.instantiate(
            &Closure {
                def: root,
                outer: None,
            },
            &HashMap::new(),
            0,
            &mut memories,
        ),
    };
    let mut unlifted = lifter.unlifted;
    if let Err(why) = order {
        unlifted.insert(0, Unlifted::Component(why));
    }
    Ok(match (order, lifter.changed) {
        (Ok(()), true) => Lifted {
            wasm: Some(rewritten),
            memories,
            unlifted,
        },
        _ => Lifted {
            wasm: None,
            memories: Vec::new(),
            unlifted,
        },
    })
}

/// A component of the binary (the top-level one or a nested one) as far as the plan needs
/// it: in section order, what enters its core module and component index spaces, and what it
/// instantiates.
#[derive(Default)]
struct ComponentDef {
    steps: Vec<Step>,
}

enum Step {
    /// A new core module index (a module section, an import, an alias or an export).
    Module(Source),
    /// A new component index.
    Component(Source),
    /// A core instance section's `instantiate` of a module index: its memories are created.
    InstantiateModule(u32),
    /// A component instance section's `instantiate`, with the core modules and components
    /// passed to it, by import name and index (its other arguments create no memory).
    InstantiateComponent {
        component: u32,
        modules: Vec<(String, u32)>,
        components: Vec<(String, u32)>,
    },
}

/// Where an entry of a core module or component index space comes from.
enum Source {
    /// A section of the binary: the lifter's module or component number.
    Defined(usize),
    /// An import: what the instantiating component passes under this name.
    Import(String),
    /// An outer alias: `index` in the component `count` levels out (0 is this one).
    Outer { count: u32, index: u32 },
    /// An export of this component's own `index`: the same item under a new index.
    Local(u32),
    /// An export of an instance: not followed by the plan.
    Unknown,
}

/// Walks a component's binary once: lifts its modules, records its components' steps.
struct ComponentLifter<'a> {
    wasm: &'a [u8],
    /// Per module section, depth-first: the memories an instantiation of it creates.
    modules: Vec<Vec<PlannedMemory>>,
    /// Per component section, nested ones before the one they are in.
    components: Vec<ComponentDef>,
    unlifted: Vec<Unlifted>,
    /// Whether any module was rewritten.
    changed: bool,
    /// Whether components nest deeper than [`MAX_NESTING`] (the deeper ones are not read).
    too_deep: bool,
}

/// A component as a value of an index space: its definition, and the index spaces around
/// it where it was defined, which its outer aliases see.
#[derive(Clone)]
struct Closure {
    def: usize,
    outer: Option<Rc<Scope>>,
}

/// A component's index spaces as they stood where a nested component was defined (entries
/// never change once made, so the snapshot is what outer aliases see); `None` is unknown.
struct Scope {
    modules: Vec<Option<usize>>,
    components: Vec<Option<Closure>>,
    outer: Option<Rc<Scope>>,
}

/// What a component instantiation passes for an import.
enum Arg {
    Module(Option<usize>),
    Component(Option<Closure>),
}

impl ComponentLifter<'_> {
    /// Lifts the modules of the component at `range` of the binary, nested ones included,
    /// and records its steps: its rewritten bytes, and its number in `components`.
    fn component(
        &mut self,
        range: Range<usize>,
        depth: usize,
    ) -> Result<(Vec<u8>, usize), ImageError> {
        let mut encoded = wasm_encoder::Component::new();
        let mut def = ComponentDef::default();
        for payload in own_payloads(self.wasm, range) {
            let payload = payload?;
            match &payload {
                Payload::ModuleSection {
                    unchecked_range, ..
                } => {
                    let bytes = &self.wasm[unchecked_range.clone()];
                    let at = ModuleAt::InComponent {
                        index: self.modules.len(),
                        offset: unchecked_range.start,
                    };
                    let lifted = lift_module(bytes, at)?;
                    self.changed |= lifted.wasm.is_some();
                    self.unlifted.extend(lifted.unlifted);
                    encoded.section(&wasm_encoder::RawSection {
                        id: wasm_encoder::ComponentSectionId::CoreModule as u8,
                        data: lifted.wasm.as_deref().unwrap_or(bytes),
                    });
                    def.steps
                        .push(Step::Module(Source::Defined(self.modules.len())));
                    self.modules.push(lifted.memories);
                    continue;
                }
                Payload::ComponentSection {
                    unchecked_range, ..
                } if depth < MAX_NESTING => {
                    let (nested, index) = self.component(unchecked_range.clone(), depth + 1)?;
                    encoded.section(&wasm_encoder::RawSection {
                        id: wasm_encoder::ComponentSectionId::Component as u8,
                        data: &nested,
                    });
                    def.steps.push(Step::Component(Source::Defined(index)));
                    continue;
                }
                Payload::ComponentSection { .. } => {
                    self.too_deep = true;
                    def.steps.push(Step::Component(Source::Unknown));
                }
                Payload::ComponentImportSection(imports) => {
                    for import in imports.clone() {
                        let import = import?;
                        let source = Source::Import(import.name.name.to_owned());
                        match import.ty {
                            ComponentTypeRef::Module(_) => def.steps.push(Step::Module(source)),
                            ComponentTypeRef::Component(_) => {
                                def.steps.push(Step::Component(source))
                            }
                            _ => {}
                        }
                    }
                }
                Payload::ComponentExportSection(exports) => {
                    for export in exports.clone() {
                        let export = export?;
                        let source = Source::Local(export.index);
                        match export.kind {
                            ComponentExternalKind::Module => def.steps.push(Step::Module(source)),
                            ComponentExternalKind::Component => {
                                def.steps.push(Step::Component(source))
                            }
                            _ => {}
                        }
                    }
                }
                Payload::ComponentAliasSection(aliases) => {
                    for alias in aliases.clone() {
                        match alias? {
                            ComponentAlias::InstanceExport {
                                kind: ComponentExternalKind::Module,
                                ..
                            } => def.steps.push(Step::Module(Source::Unknown)),
                            ComponentAlias::InstanceExport {
                                kind: ComponentExternalKind::Component,
                                ..
                            } => def.steps.push(Step::Component(Source::Unknown)),
                            ComponentAlias::Outer { kind, count, index } => {
                                let source = Source::Outer { count, index };
                                match kind {
                                    ComponentOuterAliasKind::CoreModule => {
                                        def.steps.push(Step::Module(source))
                                    }
                                    ComponentOuterAliasKind::Component => {
                                        def.steps.push(Step::Component(source))
                                    }
                                    _ => {}
                                }
                            }
                            _ => {}
                        }
                    }
                }
                Payload::InstanceSection(instances) => {
                    for instance in instances.clone() {
                        if let Instance::Instantiate { module_index, .. } = instance? {
                            def.steps.push(Step::InstantiateModule(module_index));
                        }
                    }
                }
                Payload::ComponentInstanceSection(instances) => {
                    for instance in instances.clone() {
                        let ComponentInstance::Instantiate {
                            component_index,
                            args,
                        } = instance?
                        else {
                            continue;
                        };
                        let of = |kind| {
                            args.iter()
                                .filter(|arg| arg.kind == kind)
                                .map(|arg| (arg.name.to_owned(), arg.index))
                                .collect()
                        };
                        def.steps.push(Step::InstantiateComponent {
                            component: component_index,
                            modules: of(ComponentExternalKind::Module),
                            components: of(ComponentExternalKind::Component),
                        });
                    }
                }
                _ => {}
            }
            if let Some((id, range)) = payload.as_section() {
                encoded.section(&wasm_encoder::RawSection {
                    id,
                    data: &self.wasm[range],
                });
            }
        }
        self.components.push(def);
        Ok((encoded.finish(), self.components.len() - 1))
    }

    /// Appends to `plan` the memories that instantiating `component` with `args` creates, in
    /// wasmtime's order: the steps in section order, a nested instantiation's memories where
    /// its `instantiate` is.
    fn instantiate(
        &self,
        component: &Closure,
        args: &HashMap<&str, Arg>,
        depth: usize,
        plan: &mut Vec<PlannedMemory>,
    ) -> Result<(), UnknownOrder> {
        if depth > MAX_NESTING {
            return Err(UnknownOrder::TooDeep);
        }
        let mut modules: Vec<Option<usize>> = Vec::new();
        let mut components: Vec<Option<Closure>> = Vec::new();
        // The scope `count` levels out of this component (0 is this one, which has no
        // snapshot: its own index spaces are the vectors above).
        let outer = |count: u32| {
            let mut scope = component.outer.as_deref();
            for _ in 1..count {
                scope = scope?.outer.as_deref();
            }
            scope
        };
        for step in &self.components[component.def].steps {
            match step {
                Step::Module(source) => {
                    let module = match source {
                        Source::Defined(module) => Some(*module),
                        Source::Import(name) => match args.get(name.as_str()) {
                            Some(Arg::Module(module)) => *module,
                            _ => None,
                        },
                        Source::Outer { count: 0, index } | Source::Local(index) => {
                            modules.get(*index as usize).copied().flatten()
                        }
                        Source::Outer { count, index } => outer(*count)
                            .and_then(|scope| scope.modules.get(*index as usize).copied())
                            .flatten(),
                        Source::Unknown => None,
                    };
                    modules.push(module);
                }
                Step::Component(source) => {
                    let nested = match source {
                        Source::Defined(def) => Some(Closure {
                            def: *def,
                            outer: Some(Rc::new(Scope {
                                modules: modules.clone(),
                                components: components.clone(),
                                outer: component.outer.clone(),
                            })),
                        }),
                        Source::Import(name) => match args.get(name.as_str()) {
                            Some(Arg::Component(nested)) => nested.clone(),
                            _ => None,
                        },
                        Source::Outer { count: 0, index } | Source::Local(index) => {
                            components.get(*index as usize).cloned().flatten()
                        }
                        Source::Outer { count, index } => outer(*count)
                            .and_then(|scope| scope.components.get(*index as usize).cloned())
                            .flatten(),
                        Source::Unknown => None,
                    };
                    components.push(nested);
                }
                Step::InstantiateModule(index) => {
                    let module = modules.get(*index as usize).copied().flatten();
                    let module = module.ok_or(UnknownOrder::ModuleFromOutside)?;
                    plan.extend(self.modules[module].iter().cloned());
                }
                Step::InstantiateComponent {
                    component: index,
                    modules: module_args,
                    components: component_args,
                } => {
                    let nested = components.get(*index as usize).cloned().flatten();
                    let nested = nested.ok_or(UnknownOrder::ComponentFromOutside)?;
                    let module_args = module_args.iter().map(|(name, index)| {
                        let module = modules.get(*index as usize).copied().flatten();
                        (name.as_str(), Arg::Module(module))
                    });
                    let component_args = component_args.iter().map(|(name, index)| {
                        let component = components.get(*index as usize).cloned().flatten();
                        (name.as_str(), Arg::Component(component))
                    });
                    let args = module_args.chain(component_args).collect();
                    self.instantiate(&nested, &args, depth + 1, plan)?;
                }
            }
        }
        Ok(())
    }
}

/// The payloads of the component at `range` of `wasm`, without those of the modules and
/// components nested in it (each comes as its one section payload).
fn own_payloads(
    wasm: &[u8],
    range: Range<usize>,
) -> impl Iterator<Item = Result<Payload<'_>, ImageError>> {
    let mut parser = Parser::new(range.start as u64);
    let mut data = &wasm[range];
    let mut done = false;
    std::iter::from_fn(move || {
        if done {
            return None;
        }
        let payload = match parser.parse(data, true) {
            Ok(Chunk::Parsed { consumed, payload }) => {
                data = &data[consumed..];
                payload
            }
            Ok(Chunk::NeedMoreData(_)) => unreachable!("the whole component is given"),
            Err(error) => {
                done = true;
                return Some(Err(error.into()));
            }
        };
        match &payload {
            // The parser has stepped over the nested binary, which is left to the caller.
            Payload::ModuleSection {
                unchecked_range, ..
            }
            | Payload::ComponentSection {
                unchecked_range, ..
            } => match data.get(unchecked_range.len()..) {
                Some(rest) => data = rest,
                None => {
                    done = true;
                    return Some(Err(ImageError::Truncated(unchecked_range.start)));
                }
            },
            Payload::End(_) => done = true,
            _ => {}
        }
        Some(Ok(payload))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lift(text: &str) -> Lifted {
        lift_module(&wat::parse_str(text).expect("wat"), ModuleAt::Itself).expect("lift")
    }

    #[test]
    fn constant_segments_of_defined_memories_are_lifted_in_order() {
        let Lifted {
            wasm: lifted,
            memories,
            unlifted,
        } = lift(
            r#"(module (memory 2) (memory 1)
                 (data (i32.const 4096) "ab") (data (i32.const 4097) "XY")
                 (data (memory 1) (i32.const 10) "z") (data "passive"))"#,
        );
        assert!(lifted.is_some() && unlifted.is_empty());
        assert_eq!(memories[0].minimum, 2 << 16);
        let first = memories[0].content.as_ref().expect("content");
        assert_eq!(first.len(), 2 * PAGE_SIZE);
        assert_eq!(&first[4096..4099], b"aXY");
        assert_eq!(memories[1].content.as_ref().expect("content")[10], b'z');
        // No code names a segment (no data count section): the lifted ones are left out.
        assert_eq!(segments(&lifted.expect("lifted")), [(true, 7)]);
    }

    /// The kinds and lengths of `wasm`'s data segments.
    fn segments(wasm: &[u8]) -> Vec<(bool, usize)> {
        Parser::new(0)
            .parse_all(wasm)
            .filter_map(|payload| match payload.expect("parses") {
                Payload::DataSection(section) => Some(section),
                _ => None,
            })
            .flatten()
            .map(|data| {
                let data = data.expect("segment");
                (matches!(data.kind, DataKind::Passive), data.data.len())
            })
            .collect()
    }

    #[test]
    fn lifted_segments_are_left_out_where_no_code_can_name_them() {
        // Code that names a segment needs the data count section: segments stay, emptied,
        // so that the indices hold.
        let named = lift(
            r#"(module (memory 1) (data (i32.const 0) "ab") (data "passive")
                 (func (data.drop 1)))"#,
        );
        let named = named.wasm.expect("lifted");
        assert_eq!(segments(&named), [(true, 0), (true, 7)]);
        // Without it, no segment is named and the lifted ones go.
        let unnamed =
            lift(r#"(module (memory 1) (data (i32.const 0) "ab") (data (i32.const 9) "c"))"#);
        assert_eq!(
            unnamed.memories[0].content.as_ref().expect("content")[9],
            b'c'
        );
        let unnamed = unnamed.wasm.expect("lifted");
        assert!(
            !Parser::new(0)
                .parse_all(&unnamed)
                .any(|payload| matches!(payload, Ok(Payload::DataCountSection { .. })))
        );
        assert_eq!(segments(&unnamed), []);
        wasmparser::Validator::new()
            .validate_all(&unnamed)
            .expect("the rewritten module validates");
    }

    #[test]
    fn any_segment_that_cannot_be_lifted_keeps_the_module_whole() {
        for (text, why) in [
            (
                r#"(module (memory 1) (data (i32.const 0) "a") (data (i32.const 65536) "b"))"#,
                SegmentsKept::PastInitialSize(1),
            ),
            (
                r#"(module (global i32 (i32.const 0)) (memory 1) (data (global.get 0) "a"))"#,
                SegmentsKept::OffsetNotConstant(0),
            ),
            (
                r#"(module (import "env" "m" (memory 1)) (data (i32.const 0) "a"))"#,
                SegmentsKept::ImportedMemory(0),
            ),
        ] {
            let lifted = lift(text);
            assert!(lifted.wasm.is_none(), "{text}");
            assert!(
                lifted
                    .memories
                    .iter()
                    .all(|memory| memory.content.is_none())
            );
            let module = ModuleAt::Itself;
            assert_eq!(
                lifted.unlifted,
                [Unlifted::Module { module, why }],
                "{text}"
            );
        }
    }

    fn lift_text_component(text: &str) -> Lifted {
        lift_component(&wat::parse_str(text).expect("wat")).expect("lift")
    }

    /// Per planned memory: its initial size in wasm pages, and its first byte (0 if none).
    fn order(lifted: &Lifted) -> Vec<(u64, u8)> {
        lifted
            .memories
            .iter()
            .map(|memory| {
                let first = memory.content.as_ref().map_or(0, |content| content[0]);
                (memory.minimum >> 16, first)
            })
            .collect()
    }

    /// Nested components' core instances are created where the nested component is
    /// instantiated, depth-first, each time it is; modules reach them defined inside, passed
    /// by name, and through outer aliases.
    #[test]
    fn nested_components_plan_memories_in_wasmtimes_order() {
        let lifted = lift_text_component(
            r#"(component $root
                 (core module $a (memory 1) (data (i32.const 0) "A"))
                 (component $inner
                   (import "m" (core module $given))
                   (core module $b (memory 2) (data (i32.const 0) "B"))
                   (component $innermost
                     (alias outer $root $a (core module $outer))
                     (core instance (instantiate $outer)))
                   (core instance (instantiate $given))
                   (instance (instantiate $innermost))
                   (core instance (instantiate $b)))
                 (component $unused
                   (core module $z (memory 9) (data (i32.const 0) "Z"))
                   (core instance (instantiate $z)))
                 (core module $c (memory 3) (data (i32.const 0) "C"))
                 (core instance (instantiate $a))
                 (instance (instantiate $inner (with "m" (core module $c))))
                 (core instance (instantiate $c))
                 (instance (instantiate $inner (with "m" (core module $a)))))"#,
        );
        assert!(lifted.wasm.is_some() && lifted.unlifted.is_empty());
        assert_eq!(
            order(&lifted),
            [
                (1, b'A'),
                (3, b'C'),
                (1, b'A'),
                (2, b'B'),
                (3, b'C'),
                (1, b'A'),
                (1, b'A'),
                (2, b'B')
            ]
        );
        // Every module, nested ones too, is rewritten: no active segment is left.
        let rewritten = lifted.wasm.expect("rewritten");
        for payload in Parser::new(0).parse_all(&rewritten) {
            if let Payload::DataSection(section) = payload.expect("parses") {
                for data in section {
                    let data = data.expect("segment");
                    assert!(matches!(data.kind, DataKind::Passive) && data.data.is_empty());
                }
            }
        }
        wasmparser::Validator::new()
            .validate_all(&rewritten)
            .expect("the rewritten component validates");
    }

    /// componentize-py's shape: nested components that only re-export types and functions,
    /// instantiated after the core instances, add no memory.
    #[test]
    fn nested_components_without_modules_add_no_memories() {
        let lifted = lift_text_component(
            r#"(component
                 (core module $m (memory 1) (data (i32.const 0) "M"))
                 (core instance (instantiate $m))
                 (component $shim
                   (import "f" (func $f))
                   (export "g" (func $f)))
                 (core module $n (func (export "f")))
                 (core instance $n (instantiate $n))
                 (func $f (canon lift (core func $n "f")))
                 (instance (instantiate $shim (with "f" (func $f)))))"#,
        );
        assert!(lifted.wasm.is_some());
        assert_eq!(order(&lifted), [(1, b'M')]);
    }

    #[test]
    fn a_component_whose_order_is_unknown_is_left_whole_and_says_why() {
        for (text, why) in [
            (
                r#"(component
                     (import "m" (core module $m))
                     (core module $d (memory 1) (data (i32.const 0) "D"))
                     (core instance (instantiate $d))
                     (core instance (instantiate $m)))"#,
                UnknownOrder::ModuleFromOutside,
            ),
            (
                r#"(component
                     (import "c" (component $c))
                     (core module $d (memory 1) (data (i32.const 0) "D"))
                     (core instance (instantiate $d))
                     (instance (instantiate $c)))"#,
                UnknownOrder::ComponentFromOutside,
            ),
        ] {
            let lifted = lift_text_component(text);
            assert!(
                lifted.wasm.is_none() && lifted.memories.is_empty(),
                "{text}"
            );
            assert_eq!(lifted.unlifted, [Unlifted::Component(why)]);
        }
    }

    #[test]
    fn a_module_that_stays_whole_is_named_and_its_component_lifted() {
        let lifted = lift_text_component(
            r#"(component
                 (core module $lifted (memory 1) (data (i32.const 0) "L"))
                 (component
                   (core module $kept (global i32 (i32.const 8)) (memory 2)
                     (data (global.get 0) "K"))
                   (core instance (instantiate $kept))))"#,
        );
        assert!(lifted.wasm.is_some());
        let [Unlifted::Module { module, why }] = lifted.unlifted[..] else {
            panic!("{:?}", lifted.unlifted);
        };
        assert_eq!(why, SegmentsKept::OffsetNotConstant(0));
        assert!(matches!(module, ModuleAt::InComponent { index: 1, .. }));
        let text = Unlifted::Module { module, why }.to_string();
        assert!(
            text.starts_with("core module 1 (at byte 0x")
                && text.contains(") keeps its data segments: data segment 0's offset is not"),
            "{text}"
        );
    }
}
