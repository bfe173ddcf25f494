//! What a stage's store holds: its sandboxed WASI context, its memory cap,
//! and what it said (log lines, a panic message) during the current call.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::ResourceTable;
use wasmtime::ResourceLimiter;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::runnel::stage::host::{Host, Level};
use super::output::{GuestOutput, LogBudget, MAX_LOG_LINES_PER_CALL};
use super::timers::StageClock;

/// Marks a panic message written by the SDK's panic hook.
const PANIC_PREFIX: &str = "panicked at ";

/// The longest log message shown whole; the rest of a longer one is cut.
const MAX_LOG_MESSAGE: usize = 16 * 1024;

/// Host state of one stage instance.
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limits: MemoryCap,
    stage: Arc<str>,
    /// The panic message of the current call, if the stage panicked.
    pub(crate) panic: Option<String>,
    stderr: GuestOutput,
    logs: LogBudget,
    /// The clock the stage reads, and when its current call must end.
    pub(crate) clock: StageClock,
    pub(crate) call_deadline: tokio::time::Instant,
    /// Whether a timer of the current call was cut short at its deadline.
    pub(crate) overslept: Arc<AtomicBool>,
}

impl HostState {
    /// A sandbox: no preopened directories, no sockets, no environment or
    /// arguments; stdout and stderr go to the log.
    pub fn new(stage: Arc<str>, memory_cap: usize) -> Self {
        let logs = LogBudget::default();
        let stdout = GuestOutput::new(stage.clone(), false, logs.clone());
        let stderr = GuestOutput::new(stage.clone(), true, logs.clone());
        let clock = StageClock::new();
        let wasi = WasiCtx::builder()
            .monotonic_clock(clock)
            .stdout(stdout)
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        HostState {
            wasi,
            table: ResourceTable::new(),
            limits: MemoryCap::new(memory_cap),
            stage,
            panic: None,
            stderr,
            logs,
            clock,
            call_deadline: tokio::time::Instant::now(),
            overslept: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Clears what the last call left behind and sets when this one must end.
    pub(crate) fn begin_call(&mut self, timeout: Duration) {
        self.call_deadline = tokio::time::Instant::now() + timeout;
        self.overslept.store(false, Ordering::Relaxed);
        self.panic = None;
        self.limits.denied = None;
        self.stderr.take_tail();
        self.logs.reset();
    }

    /// Says how many log lines the call that just ended dropped, if any.
    pub(crate) fn end_call(&mut self) {
        let dropped = self.logs.reset();
        if dropped > 0 {
            tracing::warn!(
                stage = &*self.stage,
                "{dropped} log lines of one call were dropped: a call may log \
                 {MAX_LOG_LINES_PER_CALL} lines (log calls, stdout and stderr together)"
            );
        }
    }

    /// Whether the current call waited on a timer until its deadline.
    pub(crate) fn overslept(&self) -> bool {
        self.overslept.load(Ordering::Relaxed)
    }

    /// The best explanation of a trap the stage gave: its panic message, or
    /// the tail of what it wrote to stderr (a stage not built with the SDK).
    pub(crate) fn last_words(&mut self) -> Option<String> {
        self.panic.take().or_else(|| {
            let tail = self.stderr.take_tail();
            (!tail.is_empty()).then_some(tail)
        })
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        let stage = &*self.stage;
        let is_panic = matches!(level, Level::Error) && message.starts_with(PANIC_PREFIX);
        // A call's panic explains its dead letter, so it is shown over the
        // budget too, once: the prefix is no way around the budget.
        let first_panic = is_panic && self.panic.is_none();
        if !first_panic && !self.logs.take() {
            return;
        }
        let mut shown = crate::cut_text(&message, MAX_LOG_MESSAGE);
        // One call, one log line: a line break in the message would let a
        // stage write lines that read as the host's own.
        if shown.contains(['\n', '\r']) {
            shown = shown.replace('\n', "\\n").replace('\r', "\\r").into();
        }
        match level {
            Level::Trace => tracing::trace!(target: "runnel::stage", stage, "{shown}"),
            Level::Debug => tracing::debug!(target: "runnel::stage", stage, "{shown}"),
            Level::Info => tracing::info!(target: "runnel::stage", stage, "{shown}"),
            Level::Warn => tracing::warn!(target: "runnel::stage", stage, "{shown}"),
            Level::Error => {
                tracing::error!(target: "runnel::stage", stage, "{shown}");
                if first_panic {
                    self.panic = Some(crate::chain::bounded_reason(message));
                }
            }
        }
    }
}

/// Caps the memory of one instance: its linear memories and its tables
/// together (a component may hold several core modules, each with its own).
/// Growth past the cap traps the call with a message that names the cap,
/// rather than handing the guest a failed allocation it would turn into an
/// opaque abort.
pub struct MemoryCap {
    cap: usize,
    /// Bytes held by every memory and table of the instance. An instance
    /// lives in a store of its own and neither is freed before the store,
    /// so the sum only grows.
    held: usize,
    /// The size the stage asked for when it was refused, for the dead letter.
    pub(crate) denied: Option<usize>,
}

impl MemoryCap {
    fn new(cap: usize) -> Self {
        MemoryCap {
            cap,
            held: 0,
            denied: None,
        }
    }
}

/// What the host holds for one table element (a function reference).
const TABLE_ELEMENT_BYTES: usize = 8;

/// Core instances, tables and memories one stage may make. A component
/// built from Rust has a handful of each; a crafted one could ask for
/// thousands, each with host memory of its own.
const MAX_CORE_INSTANCES: usize = 64;
const MAX_TABLES: usize = 64;
const MAX_MEMORIES: usize = 16;

impl MemoryCap {
    fn grow(&mut self, bytes: usize) -> wasmtime::Result<bool> {
        let total = self.held.saturating_add(bytes);
        if total > self.cap {
            self.denied = Some(total);
            wasmtime::bail!(
                "memory limit reached: the stage asked for {} MiB, its cap is {} MiB",
                total.div_ceil(1 << 20),
                self.cap >> 20
            );
        }
        self.held = total;
        Ok(true)
    }
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow(desired.saturating_sub(current))
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.grow(
            desired
                .saturating_sub(current)
                .saturating_mul(TABLE_ELEMENT_BYTES),
        )
    }

    fn instances(&self) -> usize {
        MAX_CORE_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}
