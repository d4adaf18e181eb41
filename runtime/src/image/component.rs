//! Lifting a component: every core module at any depth, and the plan of its instantiation's
//! memories in wasmtime's order (the parent module's docs say why and how).

use std::ops::Range;
use std::rc::Rc;

use super::*;

/// How deep components may nest, and component instantiations recurse, for samepage to plan
/// them: far deeper than any toolchain's output, and shallow enough for the stack.
pub(super) const MAX_NESTING: usize = 100;

/// Lifts every core module of a component, at any depth, and plans the memories of its
/// instantiation (see the module docs): all of them, or none when the order is unknown.
pub(super) fn lift_component(wasm: &[u8]) -> Result<Lifted, ImageError> {
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
