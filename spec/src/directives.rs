//! A `.wast` script cut into its top-level directives, so that the harness can act between
//! them.
//!
//! `wasmtime-wast` runs a whole script in one call. The harness instead hands it one
//! directive at a time on the same `WastContext` (its instances, registered names and
//! module definitions live in the context and carry over from call to call), which leaves
//! a point between any two directives where the store is idle and the harness can merge or
//! unmerge its memories. Cutting uses the `wast` crate's own lexer, so strings, nested block
//! comments and annotations are taken as `wasmtime-wast` takes them.

use wast::lexer::{Lexer, TokenKind};

/// One top-level directive of a script: `(module ...)`, `(assert_return ...)` and so on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Directive<'a> {
    /// Its text, from its opening parenthesis to its closing one.
    pub text: &'a str,
    /// The line of the script it starts on (from 1).
    pub line: usize,
    /// Whether it mentions a module (`(module ...)` at any depth): it may instantiate one,
    /// which creates memories and writes their data segments.
    pub mentions_module: bool,
}

/// Why a script could not be cut into directives.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    #[error("line {line}: {source}")]
    Lex {
        line: usize,
        #[source]
        source: Box<wast::Error>,
    },
    #[error("line {line}: `{token}` outside any directive (a script of bare module fields)")]
    OutsideDirective { line: usize, token: String },
    #[error("line {line}: a closing parenthesis without an opening one")]
    Unopened { line: usize },
    #[error("the directive that starts on line {line} is never closed")]
    Unclosed { line: usize },
}

/// Cuts `script` into its top-level directives, in order. A script whose first form is not
/// a directive is one inline module, as `wast` reads it (`(func) (memory 0)` is a module of
/// two fields): then it is one directive.
pub fn split(script: &str) -> Result<Vec<Directive<'_>>, SplitError> {
    let mut lexer = Lexer::new(script);
    // `wasmtime-wast` allows it for `names.wast`, whose names are made of such characters;
    // the lexer only cuts here, so allowing it everywhere changes nothing else.
    lexer.allow_confusing_unicode(true);
    let mut directives = Vec::new();
    let mut position = 0;
    // Lines are counted up to `counted` as tokens go by, so that the whole script is counted
    // once.
    let (mut line, mut counted) = (1, 0);
    let mut line_at = |offset: usize| {
        line += script[counted..offset].matches('\n').count();
        counted = offset;
        line
    };
    // The open parentheses, innermost last.
    let mut groups: Vec<Group> = Vec::new();
    let mut start = (0, 0);
    let mut mentions_module = false;
    // The first keyword of the first top-level form: whether the text is a script at all.
    let mut first_keyword: Option<&str> = None;
    loop {
        let offset = position;
        let token = match lexer.parse(&mut position) {
            Ok(Some(token)) => token,
            Ok(None) => break,
            Err(source) => {
                return Err(SplitError::Lex {
                    line: line_at(offset),
                    source: Box::new(source),
                });
            }
        };
        match token.kind {
            TokenKind::Whitespace | TokenKind::LineComment | TokenKind::BlockComment => {}
            TokenKind::LParen => {
                if groups.is_empty() {
                    start = (token.offset, line_at(token.offset));
                    mentions_module = false;
                }
                let ignored = groups.last().is_some_and(|group| group.ignored);
                groups.push(Group {
                    started: false,
                    ignored,
                });
            }
            TokenKind::RParen => {
                let closed = groups.pop().ok_or_else(|| SplitError::Unopened {
                    line: line_at(token.offset),
                })?;
                match groups.last_mut() {
                    // `()` is a form, not an annotation: it starts its parent.
                    Some(parent) if !closed.started => parent.started = true,
                    Some(_) => {}
                    None => directives.push(Directive {
                        text: &script[start.0..token.offset + token.len as usize],
                        line: start.1,
                        mentions_module,
                    }),
                }
            }
            _ => {
                let depth = groups.len();
                let Some(group) = groups.last_mut() else {
                    return Err(SplitError::OutsideDirective {
                        line: line_at(token.offset),
                        token: token.src(script).to_owned(),
                    });
                };
                if std::mem::replace(&mut group.started, true) {
                    continue;
                }
                // The group's first token: an annotation's name, which makes the whole
                // group one to skip (`((@a) module ...)` is a module), or a form's head.
                if token.kind == TokenKind::Annotation {
                    group.ignored = true;
                    continue;
                }
                let ignored = group.ignored;
                if let Some(parent) = depth.checked_sub(2).map(|i| &mut groups[i]) {
                    parent.started = true;
                }
                if token.kind == TokenKind::Keyword && !ignored {
                    let keyword = token.keyword(script);
                    mentions_module |= keyword == "module";
                    if depth == 1 && directives.is_empty() {
                        first_keyword.get_or_insert(keyword);
                    }
                }
            }
        }
    }
    if !groups.is_empty() {
        return Err(SplitError::Unclosed { line: start.1 });
    }
    if first_keyword.is_some_and(|keyword| !is_directive(keyword)) {
        return Ok(vec![Directive {
            text: script,
            line: 1,
            mentions_module: true,
        }]);
    }
    Ok(directives)
}

/// An open parenthesis while cutting.
struct Group {
    /// Whether its first token (other than trivia) went by.
    started: bool,
    /// Whether it is an annotation, or inside one: its keywords are not the script's.
    ignored: bool,
}

/// Whether a form headed by `keyword` is a directive, by `wast`'s own test of whether a text
/// is a script (anything else heads a module field).
fn is_directive(keyword: &str) -> bool {
    keyword.starts_with("assert_")
        || matches!(keyword, "module" | "component" | "register" | "invoke")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directives_are_cut_at_their_own_parentheses() {
        let script = "(module $m (memory 1) (data (i32.const 0) \"a)b\"))\n\
                      ;; a comment (\n\
                      (; a block (; nested ;) comment ) ;)\n\
                      (assert_return (invoke \"f\" (i32.const 1)) (i32.const 2))\n\
                      (assert_trap (module (func unreachable) (start 0)) \"unreachable\")";
        let directives = split(script).expect("a well-formed script");
        let texts: Vec<_> = directives
            .iter()
            .map(|d| (d.line, d.mentions_module))
            .collect();
        assert_eq!(texts, [(1, true), (4, false), (5, true)]);
        assert_eq!(
            directives[0].text,
            "(module $m (memory 1) (data (i32.const 0) \"a)b\"))"
        );
        assert!(directives[1].text.starts_with("(assert_return"));
        assert!(directives[2].text.ends_with("\"unreachable\")"));
    }

    #[test]
    fn annotations_do_not_hide_a_module_and_bare_fields_are_one_module() {
        let script = "((@a) module (@a) $m (memory 1))\n((@a) invoke (@a) \"f\")";
        let directives = split(script).expect("an annotated script");
        let found: Vec<_> = directives.iter().map(|d| d.mentions_module).collect();
        assert_eq!(found, [true, false]);

        let script = "(func) (memory 0) (func (export \"f\"))";
        assert_eq!(
            split(script).expect("an inline module"),
            [Directive {
                text: script,
                line: 1,
                mentions_module: true,
            }]
        );
    }

    #[test]
    fn broken_scripts_are_refused_with_their_line() {
        assert!(matches!(
            split("(module)\n(func)\n)"),
            Err(SplitError::Unopened { line: 3 })
        ));
        assert!(matches!(
            split("(module)\n(module"),
            Err(SplitError::Unclosed { line: 2 })
        ));
        assert!(matches!(
            split("(module)\n\nfunc"),
            Err(SplitError::OutsideDirective { line: 3, .. })
        ));
        assert!(matches!(
            split("(module \"unterminated)"),
            Err(SplitError::Lex { line: 1, .. })
        ));
    }
}
