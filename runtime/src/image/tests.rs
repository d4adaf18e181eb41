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
    let unnamed = lift(r#"(module (memory 1) (data (i32.const 0) "ab") (data (i32.const 9) "c"))"#);
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
