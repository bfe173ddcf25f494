//! The WebAssembly side of the host: one engine, stages compiled once and
//! cached, and instances that run under a deadline and a memory cap.

mod cache;
mod engine;
mod host;
mod instance;
mod output;
mod timers;

pub use cache::CacheOutcome;
pub use engine::{CpuTarget, Engine, EngineOptions};
pub use instance::{CallError, LoadError, LoadedStage, StageInstance, StageLimits};

pub use crate::record::{Outcome, Record};

pub(crate) mod bindings {
    #![allow(missing_docs)]
    wasmtime::component::bindgen!({
        world: "stage",
        path: "../sdk/wit",
    });
}
