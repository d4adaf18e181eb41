//! What `samepage run` and `samepage serve` share on the command line: the parsers of
//! `wasmtime`'s option spellings, the engine's knob flags (derived from the engine's own
//! declaration of each knob), and how an error reaches the terminal.

mod errors;
mod knobs;
mod parsers;

pub use errors::causes_once;
pub use knobs::KnobFlags;
pub use parsers::*;
