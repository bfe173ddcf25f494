//! The WebAssembly side of the host: one engine, stages compiled once and
//! cached, and instances that run under a deadline and a memory cap.

mod cache;
mod engine;
mod host;
mod instance;
mod output;

pub use cache::CacheOutcome;
pub use engine::{Engine, EngineOptions};
pub use instance::{CallError, LoadError, LoadedStage, StageInstance, StageLimits};

pub(crate) mod bindings {
    #![allow(missing_docs)]
    wasmtime::component::bindgen!({
        world: "stage",
        path: "../sdk/wit",
        additional_derives: [PartialEq, Eq],
    });
}

/// The record type shared by the host, the sources and the sinks: the one
/// the stage contract defines, so a batch crosses into wasm without conversion.
pub use bindings::runnel::stage::types::Record;

impl Record {
    /// A record with this payload and nothing else set.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Record {
            payload: payload.into(),
            key: None,
            topic: None,
            timestamp: None,
            headers: Vec::new(),
        }
    }
}
