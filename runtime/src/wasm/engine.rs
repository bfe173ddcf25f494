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
    pub cpu: CpuTarget,
}

/// Which CPU features compiled stages may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CpuTarget {
    /// Whatever this machine has: fastest code, but a compiled stage loads
    /// only on machines with the same features.
    #[default]
    Native,
    /// A fixed set every machine of the architecture has (x86-64-v2; on
    /// aarch64, LSE atomics as on Graviton2), so stages compiled on one
    /// machine load on another: a Lambda package built here runs on
    /// whichever host Lambda picks.
    Portable,
}

impl CpuTarget {
    /// `RUNNEL_CPU` (`native` or `portable`) when set, else portable under
    /// Lambda, where the package's compiled stages were made elsewhere.
    pub fn from_env() -> anyhow::Result<Self> {
        match std::env::var("RUNNEL_CPU") {
            Ok(value) => match value.as_str() {
                "native" => Ok(CpuTarget::Native),
                "portable" => Ok(CpuTarget::Portable),
                other => {
                    anyhow::bail!("RUNNEL_CPU is \"{other}\"; expected \"native\" or \"portable\"")
                }
            },
            Err(_) if std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some() => {
                Ok(CpuTarget::Portable)
            }
            Err(_) => Ok(CpuTarget::Native),
        }
    }

    fn apply(self, config: &mut wasmtime::Config) -> anyhow::Result<()> {
        if self == CpuTarget::Native {
            return Ok(());
        }
        // Naming the host's triple turns off feature detection.
        config.target(&target_lexicon::HOST.to_string())?;
        let features: &[&str] = if cfg!(target_arch = "x86_64") {
            &["x86-64-v2"]
        } else if cfg!(target_arch = "aarch64") {
            &["has_lse"]
        } else {
            &[]
        };
        for feature in features {
            // SAFETY: every CPU of the architecture that runnel targets
            // (x86-64-v2 machines; Graviton2 and later Arm cores) has these,
            // and wasmtime checks them again when it loads compiled code.
            unsafe {
                config.cranelift_flag_enable(feature);
            }
        }
        Ok(())
    }
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
        options.cpu.apply(&mut config)?;
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
            .and_then(|dir| CompileCache::open(dir.clone(), &engine))
            .map(Arc::new);
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
