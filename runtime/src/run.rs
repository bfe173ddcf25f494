//! Runs a pipeline: source to chain to sinks, with timers, acknowledgement
//! after every output and dead letter is accepted, and counts that add up.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;

use crate::chain::{Chain, ChainOutput, DeadLetter, InputOutcome};
use crate::config::{ConfigError, Pipeline};
use crate::metrics::Metrics;
use crate::mqtt::{Connections, SourceNeeds};
use crate::sink::{Sink, SinkConfig, SinkRole};
use crate::source::{Clock, Source};
use crate::wasm::{CacheOutcome, CpuTarget, Engine, EngineOptions, LoadedStage, StageLimits};
use crate::Record;

/// Where the dead letter goes when the pipeline file does not say.
pub const DEFAULT_DEAD_LETTER: &str = "dead-letter.jsonl";

/// How a run is set up beyond the pipeline file.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Compile every stage afresh instead of using the on-disk cache.
    pub no_cache: bool,
    /// The run's figures as they stand, kept up to date as it goes, for a
    /// caller that stops waiting for it.
    pub progress: Arc<std::sync::Mutex<Summary>>,
}

/// The files a run of `pipeline` appends to, each with the field of the
/// pipeline file it comes from: its file sink, its dead letter (a file
/// unless the pipeline says otherwise), and each MQTT connection's spool.
pub fn output_files(pipeline: &Pipeline) -> Vec<(String, std::path::PathBuf)> {
    let dead = pipeline.dead_letter_sink();
    let sinks = [
        ("sink", &pipeline.file.sink),
        ("dead_letter", dead.as_ref()),
    ]
    .into_iter()
    .filter_map(|(field, sink)| match sink {
        SinkConfig::File { path, .. } => Some((format!("{field}.path"), pipeline.resolve(path))),
        _ => None,
    });
    let spools = pipeline.file.mqtt.iter().filter_map(|(name, connection)| {
        connection.spool.as_ref().map(|spool| {
            (
                format!("mqtt.{name}.spool.path"),
                pipeline.resolve(&spool.path).join(crate::mqtt::SPOOL_FILE),
            )
        })
    });
    sinks.chain(spools).collect()
}

/// Whether this process may append to `path`, as a run would (making its
/// folder and the file). What is made only to find out is removed again.
pub fn check_writable(path: &std::path::Path) -> Result<(), String> {
    let fail = |what: &str, err: std::io::Error| format!("cannot {what} {}: {err}", path.display());
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    // The folders a run would make, deepest first.
    let missing: Vec<&std::path::Path> = dir
        .map(|d| {
            d.ancestors()
                .take_while(|a| !a.as_os_str().is_empty() && !a.exists())
                .collect()
        })
        .unwrap_or_default();
    // Said plainly, rather than as the "File exists" of making the folder.
    if let Some(file) = dir
        .into_iter()
        .flat_map(|d| d.ancestors())
        .find(|a| a.is_file())
    {
        return Err(format!(
            "{} is a file, and {} would need it to be a folder",
            file.display(),
            path.display()
        ));
    }
    let existed = path.exists();
    let tried = dir
        .map_or(Ok(()), std::fs::create_dir_all)
        .map_err(|e| fail("create the folder of", e))
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map(drop)
                .map_err(|e| fail("open for writing", e))
        });
    if !existed {
        let _ = std::fs::remove_file(path);
    }
    for folder in missing {
        let _ = std::fs::remove_dir(folder);
    }
    tried
}

/// What a run did. An input counts once its outcome is settled: its outputs
/// accepted by the sink and its dead letters written. Until then, and for
/// good when an error stops the run, it is [`Summary::unfinished`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Inputs read from the source, unreadable ones included.
    pub inputs: u64,
    /// Inputs that produced at least one output and no dead letter.
    pub emitted: u64,
    /// Inputs every stage path filtered out.
    pub filtered: u64,
    /// Inputs with at least one dead-letter entry.
    pub dead_lettered: u64,
    /// Records written to the sink, timer outputs included.
    pub outputs: u64,
    /// Of `outputs`, those that windows and other timers emitted.
    pub timer_outputs: u64,
    /// Entries written to the dead letter.
    pub dead_letters: u64,
    /// Messages sent to a `drop-oldest` spool (outputs, or dead letters on
    /// MQTT) that it dropped later to make room.
    pub spool_dropped: u64,
}

impl Summary {
    /// Inputs read whose outcome was not settled: in flight, or cut off by
    /// the error that stopped the run.
    pub fn unfinished(&self) -> u64 {
        self.inputs
            .saturating_sub(self.emitted + self.filtered + self.dead_lettered)
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unfinished = match self.unfinished() {
            0 => String::new(),
            n => format!(", {n} not finished"),
        };
        let dropped = match self.spool_dropped {
            0 => String::new(),
            n => format!("; {n} sent, then dropped from a full spool"),
        };
        write!(
            f,
            "{} in: {} produced output, {} filtered, {} dead-lettered{unfinished}; {} out ({} from timers); {} dead-letter entries{dropped}",
            self.inputs,
            self.emitted,
            self.filtered,
            self.dead_lettered,
            self.outputs,
            self.timer_outputs,
            self.dead_letters
        )
    }
}

/// The engine for a pipeline, with its compile cache.
pub fn engine_for(pipeline: &Pipeline, options: &RunOptions) -> anyhow::Result<Engine> {
    let cache_dir = if options.no_cache {
        None
    } else {
        Some(match &pipeline.file.pipeline.cache_dir {
            Some(dir) => pipeline.resolve(dir),
            None => default_cache_dir(),
        })
    };
    let cpu = CpuTarget::from_env()?;
    Engine::new(&EngineOptions { cache_dir, cpu }).context("cannot set up the WebAssembly engine")
}

fn default_cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("RUNNEL_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    // A Lambda package ships its stages compiled, next to the pipeline.
    if let Some(root) = std::env::var_os("LAMBDA_TASK_ROOT") {
        return PathBuf::from(root).join("cache");
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("runnel");
    }
    match std::env::var_os("HOME") {
        Some(home) => PathBuf::from(home).join(".cache").join("runnel"),
        // One folder per user: a shared one would let any user put code
        // there for another's runnel to run.
        None => std::env::temp_dir().join(format!("runnel-cache-{}", crate::user_id())),
    }
}

/// Compiles (or loads from the cache) and links every stage. Errors point
/// at the stage's line in the pipeline file.
pub fn load_stages(pipeline: &Pipeline, engine: &Engine) -> Result<Vec<LoadedStage>, ConfigError> {
    let mut stages = Vec::with_capacity(pipeline.file.stages.len());
    for stage in &pipeline.file.stages {
        let name = stage.name.get_ref().as_str();
        let limits = StageLimits {
            timeout: Duration::from_millis(stage.timeout_ms()),
            memory_bytes: (stage.memory_mb() as usize) << 20,
        };
        let path = pipeline.resolve(stage.wasm.get_ref());
        let started = std::time::Instant::now();
        let loaded =
            LoadedStage::load(engine, name, &path, stage.config_json(), limits).map_err(|err| {
                pipeline.error_at(stage.wasm.span(), format!("stage `{name}`: {err}"))
            })?;
        tracing::info!(
            stage = name,
            from_cache = loaded.cache == Some(CacheOutcome::Hit),
            ms = crate::ms_since(started),
            "stage loaded"
        );
        stages.push(loaded);
    }
    Ok(stages)
}

/// Loads every stage and starts it (its `init` runs with its config), the
/// whole of what `runnel run` does before it reads a record.
pub fn start_chain(pipeline: &Pipeline, engine: &Engine) -> Result<Chain, ConfigError> {
    let stages = load_stages(pipeline, engine)?;
    let chain = Chain::start(stages)
        .map_err(|(name, err)| pipeline.stage_error(&name, format!("stage `{name}`: {err}")))?;
    let settings = &pipeline.file.pipeline;
    Ok(chain
        .with_max_call_records(settings.batch_size)
        .with_max_batch_outputs(settings.max_batch_outputs))
}

/// Runs until the source ends or `shutdown` resolves, then drains: the batch
/// in hand is finished and delivered before it returns.
pub async fn run(
    pipeline: &Pipeline,
    options: &RunOptions,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Summary> {
    // Bound before the sinks open: a port in use stops the start with no
    // file created or broker connected.
    let metrics_listener = match &pipeline.file.metrics {
        Some(config) => {
            let address = config
                .address()
                .map_err(|message| anyhow::anyhow!("{}: {message}", pipeline.path.display()))?;
            let cannot_listen = move || {
                format!(
                    "{}: metrics.listen: cannot listen on {address}",
                    pipeline.path.display()
                )
            };
            let listener = tokio::net::TcpListener::bind(address)
                .await
                .with_context(cannot_listen)?;
            Some((listener, cannot_listen))
        }
        None => None,
    };
    let mut runner = Runner::open(pipeline, options).await?;
    if let Some((listener, cannot_listen)) = metrics_listener {
        let metrics = Arc::new(Metrics::new(
            &runner.name,
            runner.connections.with_roles().map(|(r, c)| (r, c.clone())),
        ));
        let bound = crate::metrics::serve(listener, metrics.clone()).with_context(cannot_listen)?;
        tracing::info!("metrics on http://{bound}/metrics");
        runner.metrics = Some(metrics);
    }
    let mut source = pipeline
        .file
        .source
        .open(pipeline.base_dir(), &runner.connections)
        .await?;
    for warning in pipeline.warnings() {
        tracing::warn!("{warning}");
    }
    tracing::info!(
        pipeline = %pipeline.file.pipeline.name,
        file = %pipeline.path.display(),
        source = source.describe(),
        sink = runner.sink.describe(),
        dead_letter = runner.dead_sink.describe(),
        stages = pipeline.file.stages.len(),
        "pipeline started"
    );
    let batch_size = pipeline.file.pipeline.batch_size;
    let timer = Duration::from_millis(pipeline.file.pipeline.timer_ms);
    let result = runner
        .run_loop(source.as_mut(), batch_size, timer, shutdown)
        .await;
    let closed = runner.close().await;
    runner.summary.spool_dropped = runner.connections.spool_dropped();
    if result.is_err() || closed.is_err() {
        // The error ends the run; what it got through before is worth
        // knowing, as an input read again may lead to outputs sent again.
        tracing::warn!("stopped by an error after: {}", runner.summary);
    }
    result?;
    closed?;
    Ok(runner.summary)
}

/// The chain and where its outputs go, fed by a source (`run`) or by
/// invocations (Lambda).
pub(crate) struct Runner {
    name: String,
    /// `None` only while a batch runs on the blocking pool.
    chain: Option<Chain>,
    sink: Box<dyn Sink>,
    dead_sink: Box<dyn Sink>,
    /// Where dead letters are also logged: not when the entries go to
    /// standard output, which under Lambda lands in the same CloudWatch
    /// log, and would show each one twice.
    dead_letter_log: Option<crate::deadletter::DeadLetterLog>,
    summary: Summary,
    /// Newest record timestamp seen, for the event clock.
    watermark: Option<i64>,
    /// The event clock at the last timer flush.
    event_flushed_at: Option<i64>,
    /// The pipeline's `timer_ms`: on the event clock, a flush follows the
    /// record that moves the clock this far past the last one.
    timer_ms: i64,
    /// A record's time far in the future was said once already.
    said_clock_jump: bool,
    connections: Connections,
    batch_size: usize,
    /// Outputs handed to the sink, in order, not yet accepted; their
    /// batches are acknowledged as they finish.
    in_flight: std::collections::VecDeque<Delivery>,
    /// Where the figures go after each step, when `[metrics]` is set.
    metrics: Option<Arc<Metrics>>,
    progress: Arc<std::sync::Mutex<Summary>>,
}

/// A chain output handed to the sink, its acceptance still to come.
struct Delivery {
    /// The source's batch to acknowledge once it is finished.
    batch: Option<u64>,
    from_timer: bool,
    outcomes: Vec<InputOutcome>,
    /// For each output, the input it came from.
    inputs: Vec<Option<usize>>,
    records: Vec<Record>,
    dead_letters: Vec<DeadLetter>,
    /// Inputs the source could not read, dead-lettered with this delivery.
    unreadable: u64,
    sending: Option<crate::sink::Sending>,
    /// What `sending` came to, once it did.
    accepted: Option<Result<Vec<crate::sink::Rejected>, crate::sink::SinkError>>,
}

/// Resolves once the oldest delivery's outputs were accepted (or refused).
/// Cancel-safe: the sending stays in the delivery until it completes.
async fn oldest_accepted(in_flight: &mut std::collections::VecDeque<Delivery>) {
    if let Some(delivery) = in_flight.front_mut() {
        if let Some(sending) = delivery.sending.as_mut() {
            let accepted = sending.await;
            delivery.sending = None;
            delivery.accepted = Some(accepted);
        }
    }
}

/// Deliveries under way at once: the outputs of the next batch are published
/// while a broker still acknowledges the last one's, so a broker that holds
/// its acknowledgements back (Nagle's algorithm) does not stall the run.
const DELIVERIES_IN_FLIGHT: usize = 2;

/// What became of records given to [`Runner::process`].
pub(crate) struct Processed {
    /// One per record given.
    pub outcomes: Vec<InputOutcome>,
    /// Outputs in order, with the index of the record each came from.
    pub outputs: Vec<(Option<usize>, Record)>,
    /// Dead letters: the record's index (none for timer output), stage, reason.
    /// Input, stage, reason, and whether a failure rather than a refusal.
    pub dead: Vec<(Option<usize>, String, String, bool)>,
}

impl Runner {
    /// Starts the chain, the MQTT connections and the sinks of `pipeline`.
    pub(crate) async fn open(pipeline: &Pipeline, options: &RunOptions) -> anyhow::Result<Self> {
        let engine = engine_for(pipeline, options)?;
        let chain = start_chain(pipeline, &engine)?;
        let base = pipeline.base_dir();
        let needs = pipeline
            .file
            .source
            .mqtt_subscription()
            .map(|(connection, subscription)| SourceNeeds {
                connection: connection.unwrap_or_default(),
                subscription,
            });
        let publishing: Vec<&str> = std::iter::once(&pipeline.file.sink)
            .chain(pipeline.file.dead_letter.as_ref())
            .filter_map(|sink| sink.mqtt_connection().flatten())
            .collect();
        let connections = Connections::open(
            &pipeline.file.mqtt,
            &pipeline.file.pipeline.name,
            base,
            needs,
            &publishing,
        )
        .map_err(|message| anyhow::anyhow!("{}: {message}", pipeline.path.display()))?;
        let sink = pipeline
            .file
            .sink
            .open(base, SinkRole::Outputs, &connections)
            .await?;
        let dead_letter = pipeline.dead_letter_sink();
        let dead_sink = dead_letter
            .open(base, SinkRole::DeadLetters, &connections)
            .await?;
        Ok(Runner {
            name: pipeline.file.pipeline.name.clone(),
            chain: Some(chain),
            sink,
            dead_sink,
            dead_letter_log: (!matches!(*dead_letter, SinkConfig::Stdout { .. }))
                .then(Default::default),
            summary: Summary::default(),
            watermark: None,
            event_flushed_at: None,
            timer_ms: i64::try_from(pipeline.file.pipeline.timer_ms).unwrap_or(i64::MAX),
            said_clock_jump: false,
            connections,
            batch_size: pipeline.file.pipeline.batch_size,
            in_flight: std::collections::VecDeque::new(),
            metrics: None,
            progress: options.progress.clone(),
        })
    }

    /// Logs each stage's totals, closes the sinks and the connections.
    /// Adds to the figures the outputs of a delivery the sink accepted.
    fn count_accepted(
        &mut self,
        accepted: &Result<Vec<crate::sink::Rejected>, crate::sink::SinkError>,
        sent: usize,
        from_timer: bool,
    ) {
        let taken = match accepted {
            Ok(rejected) => sent - rejected.len(),
            Err(err) => err.accepted_before(),
        } as u64;
        self.summary.outputs += taken;
        if from_timer {
            self.summary.timer_outputs += taken;
        }
    }

    /// Counts what the sink accepted of the deliveries an error left under
    /// way: their inputs are not finished, but a file or a broker may hold
    /// their outputs, and "out" says what the sink took. A sending that does
    /// not end soon is not waited for; its outputs are not counted.
    async fn count_abandoned_deliveries(&mut self) {
        const WAIT: Duration = Duration::from_secs(1);
        while let Some(delivery) = self.in_flight.pop_front() {
            let accepted = match (delivery.accepted, delivery.sending) {
                (Some(accepted), _) => Some(accepted),
                (None, Some(sending)) => tokio::time::timeout(WAIT, sending).await.ok(),
                (None, None) => None,
            };
            if let Some(accepted) = accepted {
                self.count_accepted(&accepted, delivery.records.len(), delivery.from_timer);
            }
        }
    }

    pub(crate) async fn close(&mut self) -> anyhow::Result<()> {
        self.count_abandoned_deliveries().await;
        if let Some(log) = &mut self.dead_letter_log {
            log.end_window();
        }
        if let Some(chain) = &self.chain {
            for (stage, stats) in chain.stats() {
                tracing::info!(
                    stage,
                    calls = stats.calls,
                    records_in = stats.records_in,
                    records_out = stats.records_out,
                    rejected = stats.rejected,
                    failed_calls = stats.failed_calls,
                    restarts = stats.restarts,
                    busy_ms = stats.busy.as_millis() as u64,
                    "stage totals"
                );
            }
        }
        let closed = async {
            self.sink.close().await?;
            self.dead_sink.close().await
        }
        .await;
        self.connections.disconnect().await;
        Ok(closed?)
    }

    /// No stage call runs past `deadline` (see [`Chain::set_deadline`]).
    pub(crate) fn set_deadline(&mut self, deadline: Option<std::time::Instant>) {
        if let Some(chain) = &mut self.chain {
            chain.set_deadline(deadline);
        }
    }

    /// Runs `records` through the chain in batches, delivers the outputs and
    /// dead letters, then flushes the stages' timers at `now`, and says what
    /// became of each record.
    pub(crate) async fn process(
        &mut self,
        records: Vec<Record>,
        now: i64,
    ) -> anyhow::Result<Processed> {
        let total = records.len();
        self.summary.inputs += total as u64;
        let mut processed = Processed {
            outcomes: Vec::with_capacity(total),
            outputs: Vec::new(),
            dead: Vec::new(),
        };
        let mut rest = records;
        let mut offset = 0;
        while !rest.is_empty() {
            let tail = rest.split_off(rest.len().min(self.batch_size));
            let batch = std::mem::replace(&mut rest, tail);
            let count = batch.len();
            let output = self.on_chain(move |chain| chain.process(batch)).await?;
            let shift = |i: Option<usize>| i.map(|i| i + offset);
            processed
                .outputs
                .extend(output.outputs.iter().map(|(i, r)| (shift(*i), r.clone())));
            let delivered = self.deliver(output, false).await?;
            processed.outcomes.extend(delivered.outcomes);
            processed.dead.extend(
                delivered
                    .dead
                    .into_iter()
                    .map(|(i, stage, reason, fault)| (shift(i), stage, reason, fault)),
            );
            offset += count;
        }
        let output = self.on_chain(move |chain| chain.flush(now, false)).await?;
        processed
            .outputs
            .extend(output.outputs.iter().map(|(_, r)| (None, r.clone())));
        let delivered = self.deliver(output, true).await?;
        processed.dead.extend(delivered.dead);
        Ok(processed)
    }

    async fn run_loop(
        &mut self,
        source: &mut dyn Source,
        batch_size: usize,
        timer: Duration,
        shutdown: impl Future<Output = ()>,
    ) -> anyhow::Result<()> {
        tokio::pin!(shutdown);
        let clock = source.clock();
        let mut ticker = tokio::time::interval(timer);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            tokio::select! {
                biased;
                () = &mut shutdown => {
                    // Inputs already read are processed, not dropped, a batch
                    // at a time as ever; then the final flush below emits
                    // what windows hold.
                    let left_at = source.stop();
                    while let Some(batch) = source.take_pending(batch_size) {
                        self.handle(source, batch, clock).await?;
                        self.publish_metrics();
                    }
                    tracing::info!("stopping: what was read before the stop is processed");
                    if let Some(left_at) = left_at {
                        tracing::warn!("the run stopped before the end of its input: {left_at}");
                    }
                    break;
                }
                reason = self.connections.failed() => {
                    anyhow::bail!("{reason}");
                }
                _ = ticker.tick(), if clock == Clock::Wall => {
                    self.settle(source).await?;
                    self.flush(now_ms(), false).await?;
                }
                batch = source.next_batch(batch_size) => {
                    let Some(batch) = batch? else { break };
                    self.handle(source, batch, clock).await?;
                }
                // The oldest delivery's outputs were accepted: its batch is
                // acknowledged now rather than when the next batch comes.
                () = oldest_accepted(&mut self.in_flight), if !self.in_flight.is_empty() => {
                    self.finish_deliveries(source, self.in_flight.len() - 1).await?;
                }
            }
            self.publish_metrics();
        }
        self.settle(source).await?;
        // The input ended or a stop was asked for: every stage flushes a last
        // time, so the last window is not lost.
        let now = match clock {
            Clock::Wall => now_ms(),
            Clock::Event => self.watermark.unwrap_or_else(now_ms),
        };
        self.flush(now, true).await
    }

    fn publish_metrics(&self) {
        if let Some(metrics) = &self.metrics {
            let stages = self.chain.as_ref().map(Chain::stats);
            metrics.update(&self.summary, stages);
        }
        if let Ok(mut progress) = self.progress.lock() {
            progress.clone_from(&self.summary);
        }
    }

    /// One batch through the chain. While it runs, earlier deliveries are
    /// finished and acknowledged, down to one still under way; then its
    /// outputs are handed to the sink. `settle` finishes the rest when no
    /// batch comes.
    async fn handle(
        &mut self,
        source: &mut dyn Source,
        batch: crate::source::Batch,
        clock: Clock,
    ) -> anyhow::Result<()> {
        self.summary.inputs += batch.inputs() as u64;
        // Shown now, as the batch below may wait long on an earlier delivery
        // (a broker out of reach) before the loop publishes the figures.
        self.publish_metrics();
        let crate::source::Batch {
            id,
            records,
            unreadable,
        } = batch;
        // With event time, timers fire as the newest timestamp advances,
        // right after the record that moves it on, as part of the same work.
        let runs = match clock {
            Clock::Event => self.event_runs(records),
            Clock::Wall => vec![(records, None)],
        };
        let running = self.start_on_chain(move |chain| {
            runs.into_iter()
                .map(|(records, flush_at)| {
                    let output = chain.process(records);
                    let flushed = flush_at.map(|now| chain.flush(now, false));
                    (output, flushed)
                })
                .collect::<Vec<_>>()
        })?;
        let settled = self
            .finish_deliveries(source, DELIVERIES_IN_FLIGHT - 1)
            .await;
        let outputs = self.chain_done(running).await?;
        settled?;
        let mut unreadable = Some(unreadable);
        let last = outputs.len().saturating_sub(1);
        for (k, (mut output, flushed)) in outputs.into_iter().enumerate() {
            let unread = unreadable.take().unwrap_or_default();
            let unread_count = unread.len() as u64;
            output.dead_letters.extend(unread);
            // The batch is acknowledged with its last part, once every
            // part before it was delivered.
            let batch = (k == last).then_some(id);
            let mut delivery = self.start_delivery(output, false, batch).await;
            delivery.unreadable = unread_count;
            self.in_flight.push_back(delivery);
            if let Some(flushed) = flushed {
                let delivery = self.start_delivery(flushed, true, None).await;
                self.in_flight.push_back(delivery);
            }
        }
        Ok(())
    }

    /// A batch on the event clock, cut after each record that moves the
    /// clock a `timer_ms` past the last flush, each part with the time to
    /// flush at after it: windows then close at the same records whatever
    /// the batch size, and a record is late or not by the records before it
    /// alone. Always at least one part, so the batch is acknowledged.
    fn event_runs(&mut self, records: Vec<Record>) -> Vec<(Vec<Record>, Option<i64>)> {
        let mut runs = Vec::new();
        let mut run = Vec::new();
        let far_ahead = now_ms().saturating_add(24 * 60 * 60 * 1000);
        for record in records {
            if let Some(time) = record.timestamp {
                if time > far_ahead && !self.said_clock_jump {
                    self.said_clock_jump = true;
                    tracing::warn!(
                        timestamp = time,
                        "a record's timestamp is more than a day ahead of this machine's \
                         clock: the event clock jumps there and closes every window before \
                         it (timestamps are ms since the Unix epoch; is this one in µs?)"
                    );
                }
                self.watermark = self.watermark.max(Some(time));
            }
            run.push(record);
            let due = match (self.watermark, self.event_flushed_at) {
                (Some(now), None) => Some(now),
                (Some(now), Some(then)) if now.saturating_sub(then) >= self.timer_ms => Some(now),
                _ => None,
            };
            if let Some(now) = due {
                self.event_flushed_at = Some(now);
                runs.push((std::mem::take(&mut run), Some(now)));
            }
        }
        if !run.is_empty() || runs.is_empty() {
            runs.push((run, None));
        }
        runs
    }

    /// Finishes every delivery under way and acknowledges their batches.
    async fn settle(&mut self, source: &mut dyn Source) -> anyhow::Result<()> {
        self.finish_deliveries(source, 0).await
    }

    /// Finishes the oldest deliveries, in order, until at most `keep` are
    /// under way; each batch is acknowledged once its delivery is done.
    async fn finish_deliveries(
        &mut self,
        source: &mut dyn Source,
        keep: usize,
    ) -> anyhow::Result<()> {
        while self.in_flight.len() > keep {
            let Some(delivery) = self.in_flight.pop_front() else {
                break;
            };
            let batch = delivery.batch;
            self.finish_delivery(delivery).await?;
            if let Some(id) = batch {
                source.ack(id).await?;
            }
        }
        Ok(())
    }

    async fn flush(&mut self, now: i64, end_of_input: bool) -> anyhow::Result<()> {
        let output = self
            .on_chain(move |chain| chain.flush(now, end_of_input))
            .await?;
        self.deliver(output, true).await.map(drop)
    }

    /// Runs wasm off the async threads: a stage may compute for its whole deadline.
    async fn on_chain<T: Send + 'static>(
        &mut self,
        work: impl FnOnce(&mut Chain) -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let running = self.start_on_chain(work)?;
        self.chain_done(running).await
    }

    /// Starts `work` on the blocking pool with the chain, which stays away
    /// until [`Self::chain_done`] takes it back; meanwhile the runner may
    /// deliver earlier outputs.
    fn start_on_chain<T: Send + 'static>(
        &mut self,
        work: impl FnOnce(&mut Chain) -> T + Send + 'static,
    ) -> anyhow::Result<tokio::task::JoinHandle<(Chain, T)>> {
        let mut chain = self
            .chain
            .take()
            .context("the chain was lost by an earlier failure")?;
        Ok(tokio::task::spawn_blocking(move || {
            let output = work(&mut chain);
            (chain, output)
        }))
    }

    async fn chain_done<T>(
        &mut self,
        running: tokio::task::JoinHandle<(Chain, T)>,
    ) -> anyhow::Result<T> {
        let (chain, output) = running.await.context("the chain's worker thread failed")?;
        self.chain = Some(chain);
        Ok(output)
    }

    /// Outputs to the sink and dead letters to theirs, both accepted before
    /// the caller acknowledges the inputs.
    async fn deliver(
        &mut self,
        output: ChainOutput,
        from_timer: bool,
    ) -> anyhow::Result<Delivered> {
        let delivery = self.start_delivery(output, from_timer, None).await;
        self.finish_delivery(delivery).await
    }

    /// Counts a chain output and hands its outputs to the sink, without
    /// waiting for the sink to accept them.
    async fn start_delivery(
        &mut self,
        output: ChainOutput,
        from_timer: bool,
        batch: Option<u64>,
    ) -> Delivery {
        let (inputs, records): (Vec<Option<usize>>, Vec<Record>) =
            output.outputs.into_iter().unzip();
        let sending = if records.is_empty() {
            None
        } else {
            Some(self.sink.start_send(&records).await)
        };
        Delivery {
            batch,
            from_timer,
            outcomes: output.outcomes,
            inputs,
            records,
            dead_letters: output.dead_letters,
            unreadable: 0,
            sending,
            accepted: None,
        }
    }

    /// Waits for the sink to accept a delivery's outputs, dead-letters those
    /// it refused, and writes the dead letters.
    async fn finish_delivery(&mut self, delivery: Delivery) -> anyhow::Result<Delivered> {
        let Delivery {
            from_timer,
            mut outcomes,
            inputs,
            mut records,
            mut dead_letters,
            unreadable,
            sending,
            accepted,
            ..
        } = delivery;
        let accepted = match (accepted, sending) {
            (Some(accepted), _) => Some(accepted),
            (None, Some(sending)) => Some(sending.await),
            (None, None) => None,
        };
        if let Some(accepted) = accepted {
            // On an error the run stops; its figures still count what got through.
            self.count_accepted(&accepted, records.len(), from_timer);
            let rejected = accepted?;
            // From the last, so each index still points at its record; the
            // dead letters are then put back in the outputs' order.
            let mut refused_letters = Vec::with_capacity(rejected.len());
            for refused in rejected.into_iter().rev() {
                let input = inputs.get(refused.index).copied().flatten();
                // An input with a refused output counts as dead-lettered.
                if let Some(outcome) = input.and_then(|i| outcomes.get_mut(i)) {
                    *outcome = InputOutcome::DeadLettered;
                }
                refused_letters.push(DeadLetter {
                    stage: "sink".into(),
                    reason: format!("the sink refused it: {}", refused.reason),
                    record: records.swap_remove(refused.index),
                    input,
                    fault: true,
                });
            }
            dead_letters.extend(refused_letters.into_iter().rev());
        }
        self.write_dead_letters(&dead_letters).await?;
        self.summary.dead_lettered += unreadable;
        for outcome in &outcomes {
            match outcome {
                InputOutcome::Emitted => self.summary.emitted += 1,
                InputOutcome::Filtered => self.summary.filtered += 1,
                InputOutcome::DeadLettered => self.summary.dead_lettered += 1,
            }
        }
        Ok(Delivered {
            outcomes,
            dead: dead_letters
                .into_iter()
                .map(|d| (d.input, d.stage, d.reason, d.fault))
                .collect(),
        })
    }
}

impl Runner {
    /// Logs dead letters and writes them to the dead-letter sink.
    async fn write_dead_letters(&mut self, dead_letters: &[DeadLetter]) -> anyhow::Result<()> {
        if dead_letters.is_empty() {
            return Ok(());
        }
        let now = now_ms();
        let entries: Vec<Record> = dead_letters
            .iter()
            .map(|dead| crate::deadletter::to_record(&self.name, dead, now))
            .collect();
        let logged = match &mut self.dead_letter_log {
            Some(log) => log.log(dead_letters),
            None => 0,
        };
        let refused = match self.dead_sink.send(&entries).await {
            Ok(refused) => refused,
            Err(err) => {
                // Not written: the log is the last place of those it has
                // not shown yet.
                dead_letters[logged..]
                    .iter()
                    .for_each(crate::deadletter::log_one);
                return Err(err.into());
            }
        };
        if refused.is_empty() {
            self.summary.dead_letters += entries.len() as u64;
            return Ok(());
        }
        // Most often the record is what made the entry too large: the rest
        // of it still goes, without the payload.
        let trimmed: Vec<Record> = refused
            .iter()
            .map(|r| {
                crate::deadletter::to_record_without_payload(
                    &self.name,
                    &dead_letters[r.index],
                    now,
                    &r.reason,
                )
            })
            .collect();
        let refused_again = self.dead_sink.send(&trimmed).await?;
        for (i, first) in refused.iter().enumerate() {
            match refused_again.iter().find(|r| r.index == i) {
                None => tracing::warn!(
                    stage = %dead_letters[first.index].stage,
                    "the dead-letter sink refused an entry ({}); it was sent without the record's payload",
                    first.reason
                ),
                // Nowhere further to send it: the log is its last place.
                Some(again) => tracing::error!(
                    entry = %String::from_utf8_lossy(&entries[first.index].payload),
                    "the dead-letter sink refused an entry, even without the record's payload: {}",
                    again.reason
                ),
            }
        }
        self.summary.dead_letters += (entries.len() - refused_again.len()) as u64;
        Ok(())
    }

    /// Dead-letters an input the chain produced outputs for that could not
    /// be passed on after all (a Lambda answer over its size limit).
    pub(crate) async fn dead_letter_input(
        &mut self,
        record: Record,
        emitted: bool,
        stage: &str,
        reason: &str,
    ) -> anyhow::Result<()> {
        // Counted as emitted when its outputs went to the sink; an input
        // already dead-lettered stays counted once.
        if emitted {
            self.summary.emitted = self.summary.emitted.saturating_sub(1);
            self.summary.dead_lettered += 1;
        }
        let dead = DeadLetter {
            stage: stage.into(),
            reason: reason.into(),
            record,
            input: Some(0),
            fault: true,
        };
        self.write_dead_letters(std::slice::from_ref(&dead)).await
    }
}

/// What `deliver` settled: each input's outcome (a refused output makes it
/// dead-lettered) and every dead letter written.
struct Delivered {
    outcomes: Vec<InputOutcome>,
    dead: Vec<(Option<usize>, String, String, bool)>,
}

/// Wall-clock time in ms since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
