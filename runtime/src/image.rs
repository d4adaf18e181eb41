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
//!    and `data.drop` does nothing.
//! 3. The first instantiation in a domain builds the engine's image of each memory
//!    ([`samepage_dedup::MemoryImage`]); the memory creator maps it into each new memory,
//!    whose pages start merged.
//!
//! A module with any segment that cannot be lifted (an offset read from a global, an
//! imported memory, a segment past the initial size) is left as it is, whole: wasmtime
//! copies its segments as before, and reports an out-of-bounds segment with its own error.
//! Lifting all or nothing keeps the order of writes exactly wasmtime's.
//!
//! A component's core modules are lifted too. The memory creator is told nothing of which
//! module a memory is for, so an instantiation carries the list of the memories it will
//! create, in the order wasmtime creates them: a module's defined memories in index order,
//! and a component's core instances in the order of its core instance section. Each entry
//! names the memory's initial size, and the creator refuses a memory of another size rather
//! than map an image into the wrong memory. Components with nested components are left as
//! they are.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use samepage_dedup::{DomainId, MemoryImage, PAGE_SIZE};
use wasmparser::{DataKind, Operator, Parser, Payload};

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
}

/// One linear memory an instantiation creates, in creation order.
#[derive(Clone, Debug)]
struct PlannedMemory {
    /// The memory's initial size in bytes: the creator checks it.
    minimum: u64,
    /// Its initial content, whole pages from offset 0, when its segments were lifted and are
    /// not all zeros.
    content: Option<Vec<u8>>,
}

/// The memories one instantiation of a module or component creates, and the images built of
/// them per domain.
#[derive(Debug, Default)]
pub struct ModuleImages {
    /// Per memory to be created: its initial size, and whether it has an image.
    memories: Vec<(u64, bool)>,
    state: Mutex<ImagesState>,
}

#[derive(Debug, Default)]
struct ImagesState {
    /// The lifted bytes per memory, until the first domain's images are built from them;
    /// later domains' images are read back from the first's, so that the host keeps no copy.
    contents: Option<Vec<Option<Vec<u8>>>>,
    /// Per domain, an image per planned memory (`None` for those that start as zeros).
    built: HashMap<DomainId, Arc<[Option<MemoryImage>]>>,
}

impl ModuleImages {
    fn new(memories: Vec<PlannedMemory>) -> Self {
        Self {
            memories: memories
                .iter()
                .map(|memory| (memory.minimum, memory.content.is_some()))
                .collect(),
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
                let read_back: Vec<Option<Vec<u8>>>;
                let contents = match &state.contents {
                    Some(contents) => contents,
                    None => {
                        let built = state.built.values().next().expect("built once");
                        read_back = built
                            .iter()
                            .map(|image| image.as_ref().map(MemoryImage::read))
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
        let (lifted, memories) = lift_module(&binary)?;
        let module = wasmtime::Module::new(engine, lifted.as_deref().unwrap_or(&binary))?;
        Ok(Self {
            module,
            images: Arc::new(ModuleImages::new(memories)),
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
        let (lifted, memories) = lift_component(&binary)?;
        let component =
            wasmtime::component::Component::new(engine, lifted.as_deref().unwrap_or(&binary))?;
        Ok(Self {
            component,
            images: Arc::new(ModuleImages::new(memories)),
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

/// A defined memory of a module being lifted.
struct DefinedMemory {
    minimum: u64,
    /// Lifted bytes from offset 0 (grown as segments land).
    content: Vec<u8>,
}

/// Lifts a core module's active data segments (see the module docs): the rewritten module,
/// or `None` when it must stay as it is, and the memories an instantiation of it creates.
fn lift_module(wasm: &[u8]) -> Result<(Option<Vec<u8>>, Vec<PlannedMemory>), ImageError> {
    let mut imported_memories = 0u32;
    let mut memories: Vec<DefinedMemory> = Vec::new();
    let mut liftable = true;
    let mut segments = 0usize;
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
                    let page = 1u64 << memory.page_size_log2.unwrap_or(16);
                    memories.push(DefinedMemory {
                        minimum: memory.initial.saturating_mul(page),
                        content: Vec::new(),
                    });
                    liftable &= !memory.shared;
                }
            }
            Payload::DataSection(section) => {
                for data in section {
                    let data = data?;
                    segments += 1;
                    let DataKind::Active {
                        memory_index,
                        offset_expr,
                    } = data.kind
                    else {
                        continue;
                    };
                    let defined = memory_index
                        .checked_sub(imported_memories)
                        .and_then(|index| memories.get_mut(index as usize));
                    let (Some(memory), Some(offset)) = (defined, constant_offset(&offset_expr))
                    else {
                        liftable = false;
                        continue;
                    };
                    let end = offset.saturating_add(data.data.len() as u64);
                    if end > memory.minimum || end > MAX_IMAGE_BYTES {
                        liftable = false;
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
    let planned = |lifted: bool, memories: Vec<DefinedMemory>| {
        memories
            .into_iter()
            .map(|memory| PlannedMemory {
                minimum: memory.minimum,
                content: (lifted && memory.content.iter().any(|&b| b != 0))
                    .then_some(memory.content),
            })
            .collect()
    };
    if !liftable || segments == 0 {
        return Ok((None, planned(false, memories)));
    }
    Ok((Some(rewrite_data(wasm)?), planned(true, memories)))
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

/// `wasm` with every active data segment turned into an empty passive one; every other
/// section copied as it is.
fn rewrite_data(wasm: &[u8]) -> Result<Vec<u8>, ImageError> {
    let mut module = wasm_encoder::Module::new();
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload?;
        if let Payload::DataSection(section) = &payload {
            let mut data = wasm_encoder::DataSection::new();
            for segment in section.clone() {
                let segment = segment?;
                match segment.kind {
                    DataKind::Active { .. } => data.passive([0u8; 0]),
                    DataKind::Passive => data.passive(segment.data.iter().copied()),
                };
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

/// Lifts every core module of a top-level component (see the module docs): the rewritten
/// component, or `None` when it stays as it is, and the memories an instantiation creates.
fn lift_component(wasm: &[u8]) -> Result<(Option<Vec<u8>>, Vec<PlannedMemory>), ImageError> {
    let mut component = wasm_encoder::Component::new();
    let mut modules: Vec<Vec<PlannedMemory>> = Vec::new();
    let mut instantiations: Vec<u32> = Vec::new();
    let mut nested = false;
    let mut depth = 0usize;
    let mut changed = false;
    for payload in Parser::new(0).parse_all(wasm) {
        let payload = payload?;
        if depth > 0 {
            // Inside a nested module or component, whose bytes were handled whole.
            match payload {
                Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
                Payload::End(_) => depth -= 1,
                _ => {}
            }
            continue;
        }
        match &payload {
            Payload::ModuleSection {
                unchecked_range, ..
            } => {
                let bytes = &wasm[unchecked_range.clone()];
                let (lifted, memories) = lift_module(bytes)?;
                changed |= lifted.is_some();
                component.section(&wasm_encoder::RawSection {
                    id: wasm_encoder::ComponentSectionId::CoreModule as u8,
                    data: lifted.as_deref().unwrap_or(bytes),
                });
                modules.push(memories);
                depth = 1;
                continue;
            }
            Payload::ComponentSection { .. } => {
                nested = true;
                depth = 1;
            }
            Payload::InstanceSection(instances) => {
                for instance in instances.clone() {
                    if let wasmparser::Instance::Instantiate { module_index, .. } = instance? {
                        instantiations.push(module_index);
                    }
                }
            }
            _ => {}
        }
        if let Some((id, range)) = payload.as_section() {
            component.section(&wasm_encoder::RawSection {
                id,
                data: &wasm[range],
            });
        }
    }
    if nested || !changed {
        return Ok((None, Vec::new()));
    }
    let mut planned = Vec::new();
    for module in instantiations {
        let Some(memories) = modules.get(module as usize) else {
            return Ok((None, Vec::new()));
        };
        planned.extend(memories.iter().map(|memory| PlannedMemory {
            minimum: memory.minimum,
            content: memory.content.clone(),
        }));
    }
    Ok((Some(component.finish()), planned))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lift(text: &str) -> (Option<Vec<u8>>, Vec<PlannedMemory>) {
        lift_module(&wat::parse_str(text).expect("wat")).expect("lift")
    }

    #[test]
    fn constant_segments_of_defined_memories_are_lifted_in_order() {
        let (lifted, memories) = lift(
            r#"(module (memory 2) (memory 1)
                 (data (i32.const 4096) "ab") (data (i32.const 4097) "XY")
                 (data (memory 1) (i32.const 10) "z") (data "passive"))"#,
        );
        assert!(lifted.is_some());
        assert_eq!(memories[0].minimum, 2 << 16);
        let first = memories[0].content.as_ref().expect("content");
        assert_eq!(first.len(), 2 * PAGE_SIZE);
        assert_eq!(&first[4096..4099], b"aXY");
        assert_eq!(memories[1].content.as_ref().expect("content")[10], b'z');
        let rewritten = lifted.expect("lifted");
        let module = Parser::new(0)
            .parse_all(&rewritten)
            .find_map(|payload| match payload.expect("parses") {
                Payload::DataSection(section) => Some(section),
                _ => None,
            })
            .expect("a data section");
        let kinds: Vec<(bool, usize)> = module
            .into_iter()
            .map(|data| {
                let data = data.expect("segment");
                (matches!(data.kind, DataKind::Passive), data.data.len())
            })
            .collect();
        assert_eq!(kinds, [(true, 0), (true, 0), (true, 0), (true, 7)]);
    }

    #[test]
    fn any_segment_that_cannot_be_lifted_keeps_the_module_whole() {
        for text in [
            r#"(module (memory 1) (data (i32.const 0) "a") (data (i32.const 65536) "b"))"#,
            r#"(module (global i32 (i32.const 0)) (memory 1) (data (global.get 0) "a"))"#,
            r#"(module (import "env" "m" (memory 1)) (data (i32.const 0) "a"))"#,
        ] {
            let (lifted, memories) = lift(text);
            assert!(lifted.is_none(), "{text}");
            assert!(memories.iter().all(|memory| memory.content.is_none()));
        }
    }
}
