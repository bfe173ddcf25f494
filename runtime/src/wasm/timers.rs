//! A stage's timers end by its call's deadline.
//!
//! Epoch interruption stops wasm code, not a host call, and in this sandbox
//! the only host calls that can block are WASI timers (no files, sockets or
//! name lookups; stdin is empty). A stage that sleeps, directly or through a
//! library, would otherwise outlast its deadline. So the host's
//! `subscribe-duration` and `subscribe-instant` are replaced by versions whose
//! timers fire no later than the call's deadline. A timer cut short that way
//! marks the call as overslept: the stage then runs on, is interrupted at its
//! next epoch check if it keeps running, and if it returns first, its answer
//! is refused as late all the same.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::p2::{subscribe, DynPollable, Pollable};
use wasmtime_wasi::{HostMonotonicClock, WasiView};

use super::host::HostState;

/// The interface wasmtime-wasi links; kept in step with its WIT version
/// (the `a_stage_that_sleeps_is_stopped_at_its_deadline` test fails if not).
const MONOTONIC_CLOCK: &str = "wasi:clocks/monotonic-clock@0.2.12";

/// Replaces the monotonic clock's timers in `linker`, which already holds WASI.
pub(super) fn clip_to_deadline(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut clock = linker.instance(MONOTONIC_CLOCK)?;
    clock.func_wrap("subscribe-duration", |mut store, (nanos,): (u64,)| {
        let wake = Instant::now().checked_add(Duration::from_nanos(nanos));
        timer(store.data_mut(), wake)
    })?;
    clock.func_wrap("subscribe-instant", |mut store, (when,): (u64,)| {
        let state: &mut HostState = store.data_mut();
        let ahead = when.saturating_sub(state.clock.now());
        let wake = Instant::now().checked_add(Duration::from_nanos(ahead));
        timer(state, wake)
    })?;
    linker.allow_shadowing(false);
    Ok(())
}

/// `wake` is `None` when the guest asked for a time past what an instant holds.
fn timer(
    state: &mut HostState,
    wake: Option<Instant>,
) -> wasmtime::Result<(Resource<DynPollable>,)> {
    let deadline = state.call_deadline;
    let timer = match wake {
        Some(wake) if wake <= deadline => Timer {
            at: wake,
            cut_short: None,
        },
        _ => Timer {
            at: deadline,
            cut_short: Some(state.overslept.clone()),
        },
    };
    let table = state.ctx().table;
    let timer = table.push(timer)?;
    Ok((subscribe(table, timer)?,))
}

struct Timer {
    at: Instant,
    /// Set when this timer fires at the call's deadline instead of the
    /// later time the stage asked for.
    cut_short: Option<Arc<AtomicBool>>,
}

#[async_trait::async_trait]
impl Pollable for Timer {
    async fn ready(&mut self) {
        tokio::time::sleep_until(self.at).await;
        if let Some(overslept) = &self.cut_short {
            overslept.store(true, Ordering::Relaxed);
        }
    }
}

/// The monotonic clock a stage sees, shared with `subscribe-instant` so both
/// measure from the same origin.
#[derive(Clone, Copy)]
pub(crate) struct StageClock {
    origin: std::time::Instant,
}

impl StageClock {
    pub(crate) fn new() -> Self {
        StageClock {
            origin: std::time::Instant::now(),
        }
    }
}

impl HostMonotonicClock for StageClock {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}
