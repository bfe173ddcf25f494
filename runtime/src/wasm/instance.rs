use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use wasmtime::component::Component;
use wasmtime::{Store, Trap};

use super::bindings::{Stage as StageBindings, StagePre};
use super::cache::CacheOutcome;
use super::engine::EPOCH_TICK;
use super::host::HostState;
use super::Engine;
use crate::record::{decode_outcomes, decode_records, encode_batch, Outcome, Record};

/// How long a call may run and how much memory an instance may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StageLimits {
    pub timeout: Duration,
    pub memory_bytes: usize,
}

/// `init` may set up tables or models, so it gets at least this long.
const MIN_INIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a stage file could not become a stage.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a WebAssembly file{hint}")]
    NotWasm { path: PathBuf, hint: &'static str },
    #[error(
        "{path} is a core WebAssembly module, not a component: build the stage for the \
         wasm32-wasip2 target (cargo build --release --target wasm32-wasip2)"
    )]
    CoreModule { path: PathBuf },
    #[error("{path} is not a valid WebAssembly component: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(
        "{path} is not a runnel stage (world runnel:stage/stage@0.1.0): {reason}; a stage \
         built with runnel-sdk exports one through #[map], #[filter], #[flat_map] or \
         runnel_sdk::export_stage!(YourStage)"
    )]
    WrongWorld { path: PathBuf, reason: String },
}

/// Why a call into a stage failed as a whole; the text is the dead-letter reason.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CallError {
    #[error("timed out: still running after its {} ms deadline", .0.as_millis())]
    Timeout(Duration),
    #[error(
        "stopped after {} ms: the invocation's time was nearly up (its stages must end before it does)",
        .0.as_millis()
    )]
    OutOfTime(Duration),
    #[error("{0}")]
    MemoryCap(String),
    #[error("stage {0}")]
    Panic(String),
    #[error("stage trapped: {0}")]
    Trap(String),
    #[error("init failed: {0}")]
    InitRejected(String),
    #[error("stage broke the contract: {0}")]
    Contract(String),
}

impl CallError {
    /// What kind of failure, in a word or two, for a count of them.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Timeout(_) => "timeout",
            CallError::OutOfTime(_) => "invocation deadline",
            CallError::MemoryCap(_) => "memory cap",
            CallError::Panic(_) => "panic",
            CallError::Trap(_) => "trap",
            CallError::InitRejected(_) => "failed init",
            CallError::Contract(_) => "broken contract",
        }
    }
}

/// A stage compiled and linked, ready to instantiate.
pub struct LoadedStage {
    name: Arc<str>,
    pre: StagePre<HostState>,
    engine: Engine,
    config_json: String,
    limits: StageLimits,
    /// Whether the compiled stage came from the cache.
    pub cache: Option<CacheOutcome>,
}

impl LoadedStage {
    /// Reads, checks, compiles (or loads from the cache) and links a stage.
    pub fn load(
        engine: &Engine,
        name: &str,
        path: &Path,
        config_json: String,
        limits: StageLimits,
    ) -> Result<Self, LoadError> {
        let read_error = |source| LoadError::Read {
            path: path.to_owned(),
            source,
        };
        let mut file = File::open(path).map_err(read_error)?;
        let mut header = Vec::with_capacity(8);
        (&mut file)
            .take(8)
            .read_to_end(&mut header)
            .map_err(read_error)?;
        check_header(path, &header)?;
        let invalid = |err: wasmtime::Error| LoadError::Invalid {
            path: path.to_owned(),
            reason: format!("{err:#}"),
        };
        // A cached stage is found by hashing the file as it is read; only a
        // stage to compile is read into memory whole.
        let cached = match &engine.cache {
            Some(cache) => {
                file.rewind().map_err(read_error)?;
                cache.find(&engine.engine, &mut file).map_err(read_error)?
            }
            None => None,
        };
        let (component, cache) = match cached {
            Some(component) => (component, Some(CacheOutcome::Hit)),
            None => {
                let mut bytes = Vec::new();
                file.rewind().map_err(read_error)?;
                file.read_to_end(&mut bytes).map_err(read_error)?;
                // The file may have changed since its header was read.
                check_header(path, &bytes)?;
                match &engine.cache {
                    Some(cache) => (
                        cache.compile(&engine.engine, &bytes).map_err(invalid)?,
                        Some(CacheOutcome::Compiled),
                    ),
                    None => (
                        Component::new(&engine.engine, &bytes).map_err(invalid)?,
                        None,
                    ),
                }
            }
        };
        let wrong_world = |err: wasmtime::Error| LoadError::WrongWorld {
            path: path.to_owned(),
            reason: format!("{err:#}"),
        };
        let instance_pre = engine
            .linker
            .instantiate_pre(&component)
            .map_err(wrong_world)?;
        let pre = StagePre::new(instance_pre).map_err(wrong_world)?;
        Ok(LoadedStage {
            name: name.into(),
            pre,
            engine: engine.clone(),
            config_json,
            limits,
            cache,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn limits(&self) -> StageLimits {
        self.limits
    }

    /// A fresh instance with its own store, after a successful `init`.
    pub fn instantiate(&self) -> Result<StageInstance, CallError> {
        let mut store = Store::new(
            &self.engine.engine,
            HostState::new(self.name.clone(), self.limits.memory_bytes),
        );
        store.limiter(|state| &mut state.limits);
        store.epoch_deadline_trap();
        let init_timeout = self.limits.timeout.max(MIN_INIT_TIMEOUT);
        store.set_epoch_deadline(deadline_ticks(init_timeout));
        store.data_mut().begin_call(init_timeout);
        let instantiated = self.pre.instantiate(&mut store);
        let bindings = finish(&mut store, instantiated, init_timeout)?;
        let init = bindings.call_init(&mut store, &self.config_json);
        match finish(&mut store, init, init_timeout) {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => return Err(CallError::InitRejected(reason)),
            Err(cause) => return Err(CallError::InitRejected(cause.to_string())),
        }
        Ok(StageInstance {
            store,
            bindings,
            buf: Vec::new(),
            timeout: self.limits.timeout,
            ticks: deadline_ticks(self.limits.timeout),
        })
    }
}

/// One live instance of a stage. After a `CallError` it must be replaced:
/// a trapped instance cannot be entered again.
pub struct StageInstance {
    store: Store<HostState>,
    bindings: StageBindings,
    /// Reused for every batch's encoding.
    buf: Vec<u8>,
    timeout: Duration,
    ticks: u64,
}

impl StageInstance {
    /// Runs an encoded batch and returns the stage's encoded answer, unread.
    /// `limit`, when shorter than the stage's own deadline, cuts this call's:
    /// a call stopped by it times out as [`CallError::OutOfTime`].
    pub(crate) fn process_encoded(
        &mut self,
        batch: &[u8],
        limit: Option<Duration>,
    ) -> Result<Vec<u8>, CallError> {
        let cut = self.begin_within(limit);
        let answer = self.bindings.call_process(&mut self.store, batch);
        self.finish_within(answer, cut)
    }

    /// Starts a call with the stage's deadline, or `limit` when that is
    /// shorter; returns the limit when it applies.
    fn begin_within(&mut self, limit: Option<Duration>) -> Option<Duration> {
        let cut = limit.filter(|&limit| limit < self.timeout);
        match cut {
            Some(limit) => self.begin_for(limit),
            None => self.begin(),
        }
        cut
    }

    /// [`finish`] for a call started by [`Self::begin_within`].
    fn finish_within<T>(
        &mut self,
        result: wasmtime::Result<T>,
        cut: Option<Duration>,
    ) -> Result<T, CallError> {
        match finish(&mut self.store, result, cut.unwrap_or(self.timeout)) {
            Err(CallError::Timeout(after)) if cut.is_some() => Err(CallError::OutOfTime(after)),
            other => other,
        }
    }

    /// One outcome per record, checked to be one per record.
    pub fn process(&mut self, batch: &[Record]) -> Result<Vec<Outcome>, CallError> {
        let mut buf = std::mem::take(&mut self.buf);
        encode_batch(batch, &mut buf);
        let answer = self.process_encoded(&buf, None);
        self.buf = buf;
        let outcomes = decode_outcomes(&answer?).map_err(|e| CallError::Contract(e.to_string()))?;
        if outcomes.len() != batch.len() {
            return Err(CallError::Contract(format!(
                "returned {} outcomes for {} records",
                outcomes.len(),
                batch.len()
            )));
        }
        Ok(outcomes)
    }

    /// The encoded records the stage emits on its timer or at the end of the
    /// input; an inner `Err` is the stage's own error.
    pub(crate) fn flush_encoded(
        &mut self,
        now_ms: i64,
        end_of_input: bool,
        limit: Option<Duration>,
    ) -> Result<Result<Vec<u8>, String>, CallError> {
        let cut = self.begin_within(limit);
        let answer = self
            .bindings
            .call_flush(&mut self.store, now_ms, end_of_input);
        self.finish_within(answer, cut)
    }

    /// [`Self::flush_encoded`], decoded.
    pub fn flush(
        &mut self,
        now_ms: i64,
        end_of_input: bool,
    ) -> Result<Result<Vec<Record>, String>, CallError> {
        match self.flush_encoded(now_ms, end_of_input, None)? {
            Ok(encoded) => decode_records(&encoded)
                .map(Ok)
                .map_err(|e| CallError::Contract(e.to_string())),
            Err(reason) => Ok(Err(reason)),
        }
    }

    fn begin(&mut self) {
        self.store.set_epoch_deadline(self.ticks);
        self.store.data_mut().begin_call(self.timeout);
    }

    /// [`Self::begin`] for a call cut short to `limit`.
    fn begin_for(&mut self, limit: Duration) {
        self.store.set_epoch_deadline(deadline_ticks(limit));
        self.store.data_mut().begin_call(limit);
    }
}

/// Epoch ticks for a deadline: rounded up, plus one because the first
/// tick may come at any moment after the deadline is set.
fn deadline_ticks(timeout: Duration) -> u64 {
    let tick = EPOCH_TICK.as_nanos();
    (timeout.as_nanos().div_ceil(tick) as u64).saturating_add(1)
}

/// A call's result as the chain sees it: a stage that returned after a
/// timer let it wait past its deadline is as late as one interrupted.
fn finish<T>(
    store: &mut Store<HostState>,
    result: wasmtime::Result<T>,
    timeout: Duration,
) -> Result<T, CallError> {
    store.data_mut().end_call();
    match result {
        Ok(_) if store.data().overslept() => Err(CallError::Timeout(timeout)),
        Ok(value) => Ok(value),
        Err(err) => Err(classify(store, err, timeout)),
    }
}

fn classify(store: &mut Store<HostState>, err: wasmtime::Error, timeout: Duration) -> CallError {
    let state = store.data_mut();
    if state.limits.denied.is_some() {
        return CallError::MemoryCap(root_message(&err));
    }
    if matches!(err.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
        return CallError::Timeout(timeout);
    }
    if let Some(words) = state.last_words() {
        return CallError::Panic(words);
    }
    let mut message = root_message(&err);
    if matches!(err.downcast_ref::<Trap>(), Some(Trap::MemoryOutOfBounds)) {
        // Rust keeps its stack in the stage's memory, below its data: a
        // recursion too deep runs off its end.
        message.push_str(" (in a Rust stage, a recursion too deep for its stack shows this way)");
    }
    CallError::Trap(message)
}

/// The innermost cause, which for a trap is what happened ("wasm `unreachable`
/// instruction executed"), without the backtrace wasmtime puts in the middle.
fn root_message(err: &wasmtime::Error) -> String {
    let root = err.root_cause().to_string();
    match err.downcast_ref::<Trap>() {
        Some(trap) if root != trap.to_string() => format!("{trap}: {root}"),
        Some(trap) => trap.to_string(),
        None => root,
    }
}

fn check_header(path: &Path, bytes: &[u8]) -> Result<(), LoadError> {
    const MAGIC: &[u8] = b"\0asm";
    const CORE_VERSION: &[u8] = &[1, 0, 0, 0];
    if bytes.len() < 8 || &bytes[..4] != MAGIC {
        let hint = if bytes.starts_with(b"\x7fELF") {
            " but a native program or library: build the stage with \
             --target wasm32-wasip2 and use the .wasm file under target/wasm32-wasip2/release/"
        } else {
            ""
        };
        return Err(LoadError::NotWasm {
            path: path.to_owned(),
            hint,
        });
    }
    if &bytes[4..8] == CORE_VERSION {
        return Err(LoadError::CoreModule {
            path: path.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deadline_rounds_up_and_adds_a_tick() {
        assert_eq!(deadline_ticks(Duration::from_millis(5)), 2);
        assert_eq!(deadline_ticks(Duration::from_millis(6)), 3);
        assert_eq!(deadline_ticks(Duration::from_millis(1000)), 201);
    }

    #[test]
    fn header_check_names_the_problem() {
        let path = Path::new("stage.wasm");
        assert!(matches!(
            check_header(path, b"hello world"),
            Err(LoadError::NotWasm { hint: "", .. })
        ));
        let native = check_header(path, b"\x7fELF\x02\x01\x01\0\0\0").expect_err("ELF");
        assert!(
            native
                .to_string()
                .contains("but a native program or library"),
            "{native}"
        );
        assert!(matches!(
            check_header(path, b"\0asm\x01\0\0\0"),
            Err(LoadError::CoreModule { .. })
        ));
        assert!(check_header(path, b"\0asm\x0d\0\x01\0").is_ok());
    }
}
