//! runnel runs chains of stream-processing stages compiled to WebAssembly
//! components, fed by a source and feeding sinks, with every input ending as
//! outputs or in the dead letter with its reason.
//!
//! The binary is a thin shell over [`run::run`] and [`run::start_chain`].

pub mod chain;
pub mod codec;
pub mod config;
pub mod deadletter;
mod record;
pub mod run;
pub mod sink;
pub mod source;
pub mod wasm;

pub use config::Pipeline;
pub use run::{run, RunOptions, Summary};
pub use wasm::Record;
