use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};

use super::bindings::Stage as StageBindings;
use super::cache::CompileCache;
use super::host::HostState;

/// How often the epoch advances. Deadlines are whole ticks, so a stage may
/// run up to one tick past its deadline; 5 ms keeps that small while the
/// ticker thread wakes only 200 times a second.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);

/// Settings of the engine shared by every stage.
#[derive(Clone, Debug, Default)]
pub struct EngineOptions {
    /// Where compiled stages are kept; `None` compiles on every start.
    pub cache_dir: Option<PathBuf>,
}

/// One wasmtime engine and linker for every stage of a process.
///
/// Instances are reused across calls and replaced only after a trap, so
/// instantiation is rare: the on-demand allocator serves that better than
/// the pooling allocator, whose large reservation buys nothing here and does
/// not fit the 39-bit address spaces of some aarch64 gateways.
#[derive(Clone)]
pub struct Engine {
    pub(crate) engine: wasmtime::Engine,
    pub(crate) linker: Arc<Linker<HostState>>,
    pub(crate) cache: Option<Arc<CompileCache>>,
    _ticker: Arc<EpochTicker>,
}

impl Engine {
    pub fn new(options: &EngineOptions) -> anyhow::Result<Self> {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        // Deadlines by epoch: a load and a compare at loop heads, far cheaper
        // than fuel's per-instruction count.
        config.epoch_interruption(true);
        config.cranelift_opt_level(wasmtime::OptLevel::Speed);
        // `perf` can then name the stages' functions in a profile.
        if std::env::var_os("RUNNEL_PERF_MAP").is_some() {
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = wasmtime::Engine::new(&config)?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        super::timers::clip_to_deadline(&mut linker)?;
        StageBindings::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;

        let cache = options
            .cache_dir
            .as_ref()
            .map(|dir| Arc::new(CompileCache::new(dir.clone(), &engine)));
        let ticker = EpochTicker::start(engine.clone());
        Ok(Engine {
            engine,
            linker: Arc::new(linker),
            cache,
            _ticker: Arc::new(ticker),
        })
    }
}

/// Advances the engine's epoch every tick until dropped.
struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    fn start(engine: wasmtime::Engine) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let spawned = thread::Builder::new()
            .name("runnel-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            });
        if let Err(err) = spawned {
            // Without the ticker no deadline fires; say so loudly rather than fail.
            tracing::error!("cannot start the epoch thread, stage deadlines are off: {err}");
        }
        EpochTicker { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}
