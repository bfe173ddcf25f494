use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

use runnel::config::{ConfigError, Pipeline};
use runnel::run::{engine_for, start_chain};
use runnel::source::SourceConfig;
use runnel::{error_text, RunOptions};

/// Whether the log is JSON lines (`--log-format json`, or under Lambda):
/// then what runnel says on stderr is a JSON line too, at its level.
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The log target of what [`say!`] says: RUST_LOG does not filter it out,
/// as the plain lines of a text log are not filtered either.
const REPORT_TARGET: &str = "runnel::report";

/// Says something on stderr: a plain line, or in a JSON log a log line of
/// that level. `eprintln!` panics when stderr is gone (a pipe whose reader
/// quit, as in `runnel run p.toml 2>&1 | head`); here the line is lost then,
/// but the run and its exit code are not.
macro_rules! say {
    ($level:ident, $($arg:tt)*) => {{
        let text = format!($($arg)*);
        if JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
            let text = text.strip_prefix("runnel: ").unwrap_or(&text);
            let text = text.strip_prefix("warning: ").unwrap_or(text);
            tracing::$level!(target: REPORT_TARGET, "{text}");
        } else {
            let _ = writeln!(std::io::stderr(), "{text}");
        }
    }};
}

/// Exit code for a pipeline file or stage that is not valid.
const EXIT_INVALID: u8 = 2;
/// Exit code for a failure while running (a sink or source that broke).
const EXIT_FAILED: u8 = 1;

/// Runs chains of WebAssembly stream-processing stages.
#[derive(Parser)]
#[command(name = "runnel", version, about, propagate_version = true)]
struct Cli {
    /// Log format on stderr (default: text, JSON under Lambda); RUST_LOG
    /// filters what is logged (default: info).
    #[arg(long, global = true, value_enum)]
    log_format: Option<LogFormat>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a pipeline until its source ends or the process is told to stop
    /// (Ctrl-C, SIGTERM, SIGHUP), then prints what became of every input.
    Run {
        /// The pipeline file (TOML).
        pipeline: PathBuf,
        /// Compile every stage afresh rather than use the compile cache.
        #[arg(long)]
        no_cache: bool,
    },
    /// Checks a pipeline file and loads and starts every stage, without
    /// reading any input. Exits 2 with the file, line and field at fault,
    /// or 1 when a file the run would write (a file sink, the dead letter,
    /// a spool) cannot be written.
    Check {
        /// The pipeline file (TOML).
        pipeline: PathBuf,
        /// Compile every stage afresh rather than use the compile cache
        /// (nor fill it).
        #[arg(long)]
        no_cache: bool,
    },
    /// Serves AWS Lambda invocations with a pipeline whose source is
    /// `type = "lambda"`. Started with no arguments where the Lambda Runtime
    /// API is set (as `bootstrap`), runnel does this by itself.
    Lambda {
        /// The pipeline file; default $RUNNEL_PIPELINE, else
        /// $LAMBDA_TASK_ROOT/pipeline.toml, else ./pipeline.toml.
        pipeline: Option<PathBuf>,
    },
}

/// The pipeline of Lambda mode when none is named.
fn lambda_pipeline() -> PathBuf {
    if let Some(path) = std::env::var_os("RUNNEL_PIPELINE") {
        return PathBuf::from(path);
    }
    let root =
        std::env::var_os("LAMBDA_TASK_ROOT").map_or_else(|| PathBuf::from("."), PathBuf::from);
    root.join("pipeline.toml")
}

fn main() -> ExitCode {
    // As a Lambda function's `bootstrap`, runnel is started with no arguments.
    let as_bootstrap =
        std::env::args_os().len() == 1 && std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some();
    let cli = if as_bootstrap {
        Cli {
            log_format: None,
            command: Command::Lambda { pipeline: None },
        }
    } else {
        Cli::parse()
    };
    let in_lambda = matches!(cli.command, Command::Lambda { .. });
    // CloudWatch Logs keeps JSON lines as fields to query.
    let default_format = if in_lambda {
        LogFormat::Json
    } else {
        LogFormat::Text
    };
    let format = cli.log_format.unwrap_or(default_format);
    JSON_LOGS.store(
        matches!(format, LogFormat::Json),
        std::sync::atomic::Ordering::Relaxed,
    );
    init_tracing(format);
    // A Lambda function serves one invocation at a time, and its stages run
    // on the blocking pool: worker threads would only add to a cold start.
    let runtime = if in_lambda {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Runtime::new()
    };
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            say!(error, "runnel: cannot start the async runtime: {err}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let code = match cli.command {
        Command::Run { pipeline, no_cache } => runtime.block_on(run(
            pipeline,
            RunOptions {
                no_cache,
                ..RunOptions::default()
            },
        )),
        Command::Check { pipeline, no_cache } => check(
            pipeline,
            RunOptions {
                no_cache,
                ..RunOptions::default()
            },
        ),
        Command::Lambda { pipeline } => {
            let pipeline = pipeline.unwrap_or_else(lambda_pipeline);
            runtime.block_on(lambda(pipeline))
        }
    };
    // A read of stdin blocks a thread the runtime cannot interrupt; waiting
    // for it on a requested stop would hang until the input closed.
    runtime.shutdown_timeout(SHUTDOWN_GRACE);
    code
}

/// How long a requested stop waits for outputs under way to be accepted
/// before it gives them up; a second Ctrl-C or SIGTERM gives up at once.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(20);

/// How long a stopping process waits for its last I/O threads.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::filter::{filter_fn, FilterExt as _};
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    use tracing_subscriber::Layer as _;
    // The embedded broker's own log is off unless RUST_LOG asks for it: at
    // info it logs every client's connect and disconnect, and it logs errors
    // for ordinary events (a client that connects, publishes and leaves, as
    // mosquitto_pub does, gives "no-connection id N is already gone").
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rumqttd=off"));
    // Except its warning that it dropped messages a slow subscriber had not
    // read yet (see mqtt::broker): that loses inputs, and must be seen. It
    // is the event with a `start_cursor` field.
    let dropped_by_broker = filter_fn(|meta| {
        meta.target().starts_with("rumqttd") && meta.fields().field("start_cursor").is_some()
    })
    // Without a hint the combined filter would let every crate's trace
    // logging be built, only to be thrown away.
    .with_max_level_hint(tracing_subscriber::filter::LevelFilter::WARN);
    let report = filter_fn(|meta| meta.target() == REPORT_TARGET)
        .with_max_level_hint(tracing_subscriber::filter::LevelFilter::INFO);
    let filter = filter.or(dropped_by_broker).or(report);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        // Reporting a failed write would go to the same stderr, with a
        // panic when it is gone; the log line is lost, the run goes on.
        .log_internal_errors(false);
    let layer = match format {
        LogFormat::Text => layer
            .with_writer(runnel::logline::OneLinePerEvent { ansi })
            .with_filter(filter)
            .boxed(),
        LogFormat::Json => layer
            .json()
            .with_writer(std::io::stderr)
            .with_filter(filter)
            .boxed(),
    };
    tracing_subscriber::registry().with(layer).init();
}

fn load(path: &std::path::Path) -> Result<Pipeline, ExitCode> {
    Pipeline::load(path).map_err(|err| invalid(&err))
}

fn invalid(err: &ConfigError) -> ExitCode {
    say!(error, "runnel: {err}");
    ExitCode::from(EXIT_INVALID)
}

async fn run(path: PathBuf, options: RunOptions) -> ExitCode {
    let stops = stop_requests();
    let pipeline = match load(&path) {
        Ok(pipeline) => pipeline,
        Err(code) => return code,
    };
    if matches!(pipeline.file.source, SourceConfig::Lambda { .. }) {
        say!(
            error,
            "runnel: {}: a lambda source takes Lambda invocations: run it with `runnel lambda`",
            pipeline.path.display()
        );
        return ExitCode::from(EXIT_INVALID);
    }
    // A setting the service lacks: starting again cannot help.
    if let Some(missing) = pipeline.missing_env().first() {
        say!(error, "runnel: {missing}");
        return ExitCode::from(EXIT_INVALID);
    }
    if let Err(code) = environment_settings() {
        return code;
    }
    let shutdown = {
        let mut stops = stops.clone();
        async move { stop_requested(&mut stops, 1).await }
    };
    // A stop waits for outputs under way, which a broker out of reach never
    // acknowledges; it must not wait forever for that.
    let give_up = {
        let mut stops = stops.clone();
        async move {
            stop_requested(&mut stops, 1).await;
            say!(
                info,
                "runnel: stopping: what was read is processed and its outputs delivered, for up \
                 to {} s; a second Ctrl-C, SIGTERM or SIGHUP stops at once",
                STOP_GRACE.as_secs()
            );
            tokio::select! {
                () = tokio::time::sleep(STOP_GRACE) => {}
                () = stop_requested(&mut stops, 2) => {}
            }
        }
    };
    let progress = options.progress.clone();
    let result = tokio::select! {
        result = runnel::run(&pipeline, &options, shutdown) => result,
        () = give_up => {
            let inputs = match pipeline.file.source {
                SourceConfig::Mqtt { qos: 0, .. } => {
                    "their inputs, and those read but not yet processed, are lost (QoS 0)"
                }
                SourceConfig::Mqtt { .. } => {
                    "their inputs were not acknowledged, so a broker that keeps the session \
                     delivers them again"
                }
                _ => "they were not delivered",
            };
            say!(error, "runnel: stopped without waiting longer for outputs under way: {inputs}");
            if let Ok(progress) = progress.lock() {
                say!(info, "runnel: until then: {progress}");
            }
            // At once: a stage call still running would outlive the async
            // runtime's shutdown and fail in it.
            std::process::exit(EXIT_FAILED.into());
        }
    };
    match result {
        Ok(summary) => {
            say!(info, "runnel: {summary}");
            ExitCode::SUCCESS
        }
        Err(err) => match err.downcast_ref::<ConfigError>() {
            Some(config) => invalid(config),
            None => {
                say!(error, "runnel: {}", error_text(&err));
                ExitCode::from(EXIT_FAILED)
            }
        },
    }
}

async fn lambda(path: PathBuf) -> ExitCode {
    match runnel::lambda::serve(&path, &RunOptions::default()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => match err.downcast_ref::<ConfigError>() {
            Some(config) => invalid(config),
            None => {
                say!(error, "runnel: {}", error_text(&err));
                ExitCode::from(EXIT_FAILED)
            }
        },
    }
}

fn check(path: PathBuf, options: RunOptions) -> ExitCode {
    let pipeline = match load(&path) {
        Ok(pipeline) => pipeline,
        Err(code) => return code,
    };
    for warning in pipeline.warnings() {
        say!(warn, "runnel: warning: {warning}");
    }
    // The service's environment may differ from this shell's.
    for missing in pipeline.missing_env() {
        say!(
            warn,
            "runnel: warning: {missing}, in this environment: run stops unless its own sets it"
        );
    }
    // What `run` would fail on at once, for a service that would else
    // restart over it: files it cannot write.
    for (field, path) in runnel::run::output_files(&pipeline) {
        if let Err(reason) = runnel::run::check_writable(&path) {
            say!(
                error,
                "runnel: {}: {field}: {reason}",
                pipeline.path.display()
            );
            return ExitCode::from(EXIT_FAILED);
        }
    }
    if let Err(code) = environment_settings() {
        return code;
    }
    let engine = match engine_for(&pipeline, &options) {
        Ok(engine) => engine,
        Err(err) => {
            say!(error, "runnel: {}", error_text(&err));
            return ExitCode::from(EXIT_FAILED);
        }
    };
    match start_chain(&pipeline, &engine) {
        Ok(_) => {
            let ok = writeln!(
                std::io::stdout(),
                "{}: ok, {} stage(s) loaded and started",
                path.display(),
                pipeline.file.stages.len()
            );
            // The answer is the exit code; a closed stdout only loses the line.
            drop(ok);
            ExitCode::SUCCESS
        }
        Err(err) => invalid(&err),
    }
}

/// Counts stop requests: Ctrl-C or SIGTERM (what systemd and Lambda send).
/// The handlers are installed when this is called, not when it is first
/// awaited, so a stop that comes while the stages load or the broker is still
/// being reached ends the run cleanly instead of killing the process.
fn stop_requests() -> watch::Receiver<u32> {
    let (requests, count) = watch::channel(0u32);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        // SIGHUP too (a closed terminal or ssh session): by default it would
        // end the process on the spot, with no last flush and no figures.
        // Unless it is ignored already, as under `nohup`: a handler would
        // undo that, and the run would stop at logout.
        let mut hangup = if hangup_ignored() {
            None
        } else {
            signal(SignalKind::hangup()).ok()
        };
        if let (Ok(mut interrupt), Ok(mut terminate)) = (
            signal(SignalKind::interrupt()),
            signal(SignalKind::terminate()),
        ) {
            tokio::spawn(async move {
                loop {
                    let hung_up = async {
                        match hangup.as_mut() {
                            Some(hangup) => hangup.recv().await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        Some(()) = interrupt.recv() => {}
                        Some(()) = terminate.recv() => {}
                        Some(()) = hung_up => {}
                        else => break,
                    }
                    requests.send_modify(|n| *n += 1);
                }
            });
            return count;
        }
    }
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            requests.send_modify(|n| *n += 1);
        }
    });
    count
}

/// Settings read from the environment (`RUNNEL_CPU`): a wrong one is as
/// invalid as a wrong pipeline file, and a restart cannot fix it either.
fn environment_settings() -> Result<(), ExitCode> {
    runnel::wasm::CpuTarget::from_env()
        .map(|_| ())
        .map_err(|err| {
            say!(error, "runnel: {err}");
            ExitCode::from(EXIT_INVALID)
        })
}

/// Whether SIGHUP is set to be ignored, as `nohup` sets it.
#[cfg(unix)]
fn hangup_ignored() -> bool {
    // SAFETY: with no new action given, sigaction only reads the current
    // one into `current`, which is a plain C struct.
    unsafe {
        let mut current: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut current) == 0
            && current.sa_sigaction == libc::SIG_IGN
    }
}

/// Resolves once `times` stops were asked for.
async fn stop_requested(count: &mut watch::Receiver<u32>, times: u32) {
    if count.wait_for(|n| *n >= times).await.is_err() {
        // No signal can come any more.
        std::future::pending::<()>().await;
    }
}
