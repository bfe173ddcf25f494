//! Runs batches through the stages in order and says what became of every
//! input: outputs, filtered, or a dead-letter entry naming the stage and the
//! reason. The chain knows nothing of where records come from or go to.

use std::time::{Duration, Instant};

use crate::record::{read_outcomes, Encoded, Part};
use crate::wasm::{CallError, LoadedStage, Record, StageInstance};

/// A record that could not go on, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The stage that rejected or failed on the record (or `source`).
    pub stage: String,
    pub reason: String,
    /// The record as it reached that stage.
    pub record: Record,
    /// Index of the input in its batch; `None` for records a timer emitted.
    pub input: Option<usize>,
    /// Lost to a failure (a crash, a deadline, a sink's refusal) rather than
    /// refused by a stage for what it holds: an HTTP caller gets a 500, not
    /// a 422.
    pub fault: bool,
}

/// What became of one input of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InputOutcome {
    /// At least one output and no dead letter.
    Emitted,
    /// Every path ended in a filter: no output, no dead letter.
    #[default]
    Filtered,
    /// At least one record derived from it went to the dead letter.
    DeadLettered,
}

/// The result of a batch (or of a flush, whose outputs have no input).
#[derive(Debug, Default)]
pub struct ChainOutput {
    /// Outputs in order, each with the index of the input it came from.
    pub outputs: Vec<(Option<usize>, Record)>,
    pub dead_letters: Vec<DeadLetter>,
    /// One entry per input of the batch.
    pub outcomes: Vec<InputOutcome>,
}

impl ChainOutput {
    pub fn records(&self) -> impl Iterator<Item = &Record> {
        self.outputs.iter().map(|(_, r)| r)
    }
}

/// Cumulative figures for one stage, for logs and metrics. `calls` and
/// `records_in` count every call made, the one-by-one retries after a failed
/// batch included.
#[derive(Debug, Clone, Default)]
pub struct StageStats {
    pub calls: u64,
    pub records_in: u64,
    pub records_out: u64,
    pub rejected: u64,
    pub failed_calls: u64,
    pub restarts: u64,
    pub busy: Duration,
}

/// After a batch fails, records are retried one by one; this many failures
/// in a row means the stage fails on everything, and the rest are not retried.
const MAX_FAILURES_IN_A_ROW: usize = 3;

struct Slot {
    stage: LoadedStage,
    instance: Option<StageInstance>,
    stats: StageStats,
    /// No call runs past this (a Lambda invocation's end, less a margin).
    deadline: Option<Instant>,
    /// Records and bytes this stage has output for the batch under way,
    /// in calls before the current one.
    batch_out: (usize, usize),
    /// Bytes of the batch under way as it reached this stage: a stage that
    /// hands on what it takes may always output that much.
    batch_in_bytes: usize,
    /// The most records this stage may output for one batch. Within a call
    /// the stage's memory cap holds, but the host keeps every output until
    /// the sink takes it, and a stage (or a chain of them) that fans out
    /// without bound would take the host's memory.
    max_batch_outputs: usize,
}

/// The most output bytes per batch beyond the batch's own, as a multiple of
/// the stage's memory cap.
const MAX_BATCH_OUTPUT_CAPS: usize = 4;

/// Why records are not run when the time a caller gave is up.
const OUT_OF_TIME: &str =
    "not run: the invocation's time was nearly up (its stages must end before it does)";

/// Stages in order, each with one live instance.
pub struct Chain {
    slots: Vec<Slot>,
    /// The most records one call into a stage takes: a stage that fans
    /// out must not hand the next one a call its deadline was not set for.
    max_call_records: usize,
}

impl Chain {
    /// Starts one instance of every stage; the first `init` failure is the error.
    pub fn start(stages: Vec<LoadedStage>) -> Result<Self, (String, CallError)> {
        let mut slots = Vec::with_capacity(stages.len());
        for stage in stages {
            let instance = stage
                .instantiate()
                .map_err(|err| (stage.name().to_string(), err))?;
            slots.push(Slot {
                stage,
                instance: Some(instance),
                stats: StageStats::default(),
                deadline: None,
                batch_out: (0, 0),
                batch_in_bytes: 0,
                max_batch_outputs: crate::config::DEFAULT_MAX_BATCH_OUTPUTS,
            });
        }
        Ok(Chain {
            slots,
            max_call_records: usize::MAX,
        })
    }

    /// No stage call runs past `deadline`: a call's own deadline is cut to
    /// the time left, and records reached after it are dead-lettered as not
    /// run (a Lambda batch reports them failed, so they come again).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        for slot in &mut self.slots {
            slot.deadline = deadline;
        }
    }

    /// Sets the most records one stage may output for one batch.
    pub fn with_max_batch_outputs(mut self, records: usize) -> Self {
        for slot in &mut self.slots {
            slot.max_batch_outputs = records;
        }
        self
    }

    /// Calls into a stage take at most `records` records (the pipeline's
    /// `batch_size`), however many the stage before it made.
    pub fn with_max_call_records(mut self, records: usize) -> Self {
        self.max_call_records = records.max(1);
        self
    }

    pub fn stats(&self) -> impl Iterator<Item = (&str, &StageStats)> {
        self.slots.iter().map(|s| (s.stage.name(), &s.stats))
    }

    /// Runs a batch through every stage. Never fails: what cannot go on is
    /// in `dead_letters`, and `outcomes` has one entry per input.
    pub fn process(&mut self, batch: Vec<Record>) -> ChainOutput {
        let inputs = batch.len();
        let mut current = Encoded::from_records(&batch, (0..inputs).map(Some));
        drop(batch);
        let mut dead_letters = Vec::new();
        for slot in &mut self.slots {
            if current.is_empty() {
                break;
            }
            current = slot.process(current, self.max_call_records, &mut dead_letters);
        }
        settle(inputs, current.into_records(), dead_letters)
    }

    /// Calls every stage's timer hook with the pipeline clock. What stage k
    /// emits goes through the stages after it, before their own flush, so the
    /// end of the input drains every window in order.
    pub fn flush(&mut self, now_ms: i64, end_of_input: bool) -> ChainOutput {
        let mut current = Encoded::from_records(&[], std::iter::empty());
        let mut dead_letters = Vec::new();
        for slot in &mut self.slots {
            if !current.is_empty() {
                current = slot.process(current, self.max_call_records, &mut dead_letters);
            }
            if let Some(emitted) = slot.flush(now_ms, end_of_input, &mut dead_letters) {
                current = append(current, &emitted);
            }
        }
        settle(0, current.into_records(), dead_letters)
    }
}

fn append(mut to: Encoded, from: &Encoded) -> Encoded {
    for i in 0..from.len() {
        to.push_raw(&from.buf[from.ranges[i].clone()], from.origins[i]);
    }
    to.seal();
    to
}

impl Slot {
    fn instance(&mut self) -> Result<&mut StageInstance, CallError> {
        if self.instance.is_none() {
            self.stats.restarts += 1;
            let fresh = self.stage.instantiate().map_err(|err| match err {
                CallError::InitRejected(reason) => {
                    CallError::InitRejected(format!("{reason} (while restarting the stage)"))
                }
                other => other,
            })?;
            self.instance = Some(fresh);
        }
        // Just filled above when it was empty.
        self.instance
            .as_mut()
            .ok_or_else(|| CallError::Contract("no instance".into()))
    }

    /// A batch through this stage, in calls of at most `max_records`
    /// records and an eighth of its memory cap: the stage holds a call's
    /// records about four times over (the batch, its own copies, the
    /// outputs and their encoding), and a batch of large records must not
    /// hit the cap and take the stage's state with it.
    fn process(
        &mut self,
        batch: Encoded,
        max_records: usize,
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Encoded {
        let max_call_bytes = (self.stage.limits().memory_bytes / 8).max(1);
        let batch_bytes = batch.buf.len();
        let mut parts = batch.split(max_call_bytes, max_records).into_iter();
        let Some(first) = parts.next() else {
            return Encoded::with_capacity(0, 0);
        };
        self.batch_out = (0, 0);
        self.batch_in_bytes = batch_bytes;
        let mut next = self.process_call(first, dead_letters);
        for part in parts {
            self.batch_out = (next.len(), next.buf.len());
            let more = self.process_call(part, dead_letters);
            next = append(next, &more);
        }
        next
    }

    fn process_call(&mut self, batch: Encoded, dead_letters: &mut Vec<DeadLetter>) -> Encoded {
        let mut next = Encoded::with_capacity(batch.buf.len(), batch.len());
        if self.time_left() == Some(Duration::ZERO) {
            for i in 0..batch.len() {
                dead_letters.push(self.dead_letter(
                    OUT_OF_TIME.into(),
                    batch.record(i),
                    batch.origins[i],
                ));
            }
            next.seal();
            return next;
        }
        let failed_before = self.stats.failed_calls;
        let first_failure = match self.call(&batch, &mut next, dead_letters) {
            Ok(()) => None,
            Err(err) if batch.len() == 1 => {
                self.dead_letter_from(&err, &batch, 0, dead_letters);
                Some(err.to_string())
            }
            // One bad record must not take its batch with it: run the records
            // one by one on a fresh instance, so only the culprit is dead-lettered.
            Err(err) => {
                let first = err.to_string();
                let kinds = self.isolate(err, &batch, &mut next, dead_letters);
                Some(format!("{first}{}", kinds_said(&kinds)))
            }
        };
        if let Some(first) = first_failure {
            let replaced = self.stats.failed_calls - failed_before;
            dead_letters.push(self.state_lost(&first, replaced));
        }
        next.seal();
        next
    }

    /// Returns the kinds of the failures met, one per failed record.
    fn isolate(
        &mut self,
        first: CallError,
        batch: &Encoded,
        next: &mut Encoded,
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Vec<&'static str> {
        let mut failures_in_a_row = 0;
        let mut kinds = Vec::new();
        let mut last = first;
        for i in 0..batch.len() {
            if self.time_left() == Some(Duration::ZERO) {
                dead_letters.push(self.dead_letter(
                    OUT_OF_TIME.into(),
                    batch.record(i),
                    batch.origins[i],
                ));
                continue;
            }
            if failures_in_a_row >= MAX_FAILURES_IN_A_ROW {
                // The stage fails on everything: the rest are not run, rather
                // than each waiting out a deadline, and their reason says so.
                let reason = format!(
                    "not run: the stage failed on the {MAX_FAILURES_IN_A_ROW} records before \
                     it in a row, last with: {last}"
                );
                dead_letters.push(self.dead_letter(reason, batch.record(i), batch.origins[i]));
                continue;
            }
            match self.call(&batch.single(i), next, dead_letters) {
                Ok(()) => failures_in_a_row = 0,
                Err(err) => {
                    failures_in_a_row += 1;
                    kinds.push(err.kind());
                    self.dead_letter_from(&err, batch, i, dead_letters);
                    last = err;
                }
            }
        }
        kinds
    }

    /// One call: outputs go to `next`, rejections to the dead letter. On an
    /// error nothing was added to either.
    fn call(
        &mut self,
        batch: &Encoded,
        next: &mut Encoded,
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Result<(), CallError> {
        self.stats.calls += 1;
        self.stats.records_in += batch.len() as u64;
        let started = Instant::now();
        let limit = self.time_left();
        let answer = self
            .instance()
            .and_then(|i| i.process_encoded(&batch.buf, limit));
        let (kept, kept_dead) = (next.len(), dead_letters.len());
        let mut rejected = 0u64;
        // The batch's output limit: an input whose outputs would pass it is
        // dead-lettered and its outputs are not kept, not even for a moment;
        // later inputs whose outputs fit in what is left go on. The call
        // itself stands, so no record runs twice on the stage's state.
        let room_records = self
            .max_batch_outputs
            .saturating_sub(self.batch_out.0 + kept);
        let max_bytes =
            MAX_BATCH_OUTPUT_CAPS * self.stage.limits().memory_bytes + self.batch_in_bytes;
        let room_bytes = max_bytes.saturating_sub(self.batch_out.1 + next.buf.len());
        // Outputs kept so far in this call, and as they were when the input
        // whose outputs are being read began.
        let (mut out_records, mut out_bytes) = (0usize, 0usize);
        let mut current = (usize::MAX, 0usize, 0usize);
        let mut over_limit: Vec<usize> = Vec::new();
        let result = answer.and_then(|answer| {
            let name = self.stage.name();
            let read = read_outcomes(&answer, |i, part| match part {
                Part::Emit(_) => {}
                Part::Output(bytes) => {
                    if current.0 != i {
                        current = (i, out_records, out_bytes);
                    }
                    if over_limit.last() == Some(&i) {
                        return;
                    }
                    if out_records + 1 > room_records || out_bytes + bytes.len() > room_bytes {
                        // This input's outputs so far go too.
                        (out_records, out_bytes) = (current.1, current.2);
                        next.truncate(kept + out_records);
                        over_limit.push(i);
                    } else {
                        out_records += 1;
                        out_bytes += bytes.len();
                        next.push_raw(bytes, batch.origins.get(i).copied().flatten());
                    }
                }
                Part::Reject(reason) => {
                    rejected += 1;
                    if let Some(origin) = batch.origins.get(i) {
                        dead_letters.push(dead_letter(
                            name,
                            bounded_reason(reason.to_string()),
                            batch.record(i),
                            *origin,
                        ));
                    }
                }
            });
            match read {
                Ok(n) if n == batch.len() => Ok(()),
                Ok(n) => Err(CallError::Contract(format!(
                    "returned {n} outcomes for {} records",
                    batch.len()
                ))),
                Err(e) => Err(CallError::Contract(e.to_string())),
            }
        });
        if result.is_ok() {
            self.stats.records_out += (next.len() - kept) as u64;
            self.stats.rejected += rejected;
            if !over_limit.is_empty() {
                let reason = format!(
                    "its outputs for this batch would pass {} records (max_batch_outputs) or \
                     {} MiB (4 times its memory_mb, plus the batch), the most runnel holds for \
                     one batch at one stage; its outputs were not kept",
                    self.max_batch_outputs,
                    max_bytes >> 20
                );
                tracing::warn!(
                    stage = self.stage.name(),
                    inputs = over_limit.len(),
                    "outputs over the batch's limit: {reason}"
                );
                for &i in &over_limit {
                    dead_letters.push(self.dead_letter(
                        reason.clone(),
                        batch.record(i),
                        batch.origins[i],
                    ));
                }
            }
        } else {
            // Nothing of a failed call goes on: the records are retried or dead-lettered whole.
            next.truncate(kept);
            dead_letters.truncate(kept_dead);
        }
        self.stats.busy += started.elapsed();
        if let Err(err) = &result {
            if matches!(err, CallError::Timeout(_)) && batch.len() > 1 {
                // A deadline is per call: a slow stage, rather than a stuck
                // one, meets it only on full batches, as after a backlog.
                tracing::warn!(
                    stage = self.stage.name(),
                    records = batch.len(),
                    "the deadline is for a whole call, here of {} records: if the stage is \
                     slow rather than stuck, raise its timeout_ms or lower batch_size",
                    batch.len()
                );
            }
            self.fail(err);
        }
        result
    }

    /// The entry that says a replaced instance took its state with it: the
    /// open windows or running figures of a stateful stage are gone, and the
    /// inputs already folded into them cannot be told apart any more.
    ///
    /// One per batch: the records retried one by one after a failed batch
    /// may replace the instance again, which loses nothing more worth a
    /// second entry.
    fn state_lost(&self, first: &str, replaced: u64) -> DeadLetter {
        let times = if replaced > 1 {
            format!(" ({replaced} times, as its records were retried one by one)")
        } else {
            String::new()
        };
        self.dead_letter(
            format!("instance replaced after: {first}{times}; any state it held (open windows, running statistics) is lost"),
            Record::new(Vec::new()),
            None,
        )
    }

    fn flush(
        &mut self,
        now_ms: i64,
        end_of_input: bool,
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Option<Encoded> {
        // An instance replaced after a failure holds nothing yet: starting a
        // fresh one only to flush it emits nothing, and a stage whose init
        // now fails would add a dead letter at every tick.
        self.instance.as_ref()?;
        // With no time left the stage keeps what it holds for the next
        // flush, rather than lose it to a call stopped at once.
        let limit = self.time_left();
        if limit == Some(Duration::ZERO) {
            return None;
        }
        let started = Instant::now();
        let result = self
            .instance()
            .and_then(|i| i.flush_encoded(now_ms, end_of_input, limit))
            .and_then(|r| match r {
                Ok(buf) => Encoded::parse_records(buf)
                    .map(Ok)
                    .map_err(|e| CallError::Contract(e.to_string())),
                Err(reason) => Ok(Err(reason)),
            });
        self.stats.busy += started.elapsed();
        let reason = match result {
            Ok(Ok(records)) => {
                self.stats.records_out += records.len() as u64;
                return Some(records);
            }
            Ok(Err(reason)) => reason,
            Err(err) => {
                self.fail(&err);
                format!(
                    "{err}; instance replaced: any state it held (open windows, running \
                     statistics) is lost"
                )
            }
        };
        // A failed flush loses what the stage held for it; the dead letter
        // says so, with the clock, so it is never silent.
        let mut note = Record::new(Vec::new());
        note.timestamp = Some(now_ms);
        dead_letters.push(dead_letter(
            self.stage.name(),
            format!("flush failed: {reason}"),
            note,
            None,
        ));
        None
    }

    /// Time left before the caller's deadline, if it set one; under a
    /// millisecond counts as none, as no call could do anything in it.
    fn time_left(&self) -> Option<Duration> {
        self.deadline.map(|deadline| {
            let left = deadline.saturating_duration_since(Instant::now());
            if left < Duration::from_millis(1) {
                Duration::ZERO
            } else {
                left
            }
        })
    }

    fn fail(&mut self, err: &CallError) {
        self.stats.failed_calls += 1;
        tracing::warn!(
            stage = self.stage.name(),
            "call failed, instance replaced: {err}"
        );
        self.instance = None;
    }

    fn dead_letter_from(
        &self,
        err: &CallError,
        batch: &Encoded,
        i: usize,
        dead_letters: &mut Vec<DeadLetter>,
    ) {
        dead_letters.push(self.dead_letter(err.to_string(), batch.record(i), batch.origins[i]));
    }

    /// A dead letter for a failure of this stage, not a refusal.
    fn dead_letter(&self, reason: String, record: Record, input: Option<usize>) -> DeadLetter {
        DeadLetter {
            fault: true,
            ..dead_letter(self.stage.name(), reason, record, input)
        }
    }
}

/// `"; its records met 2 panics, 1 timeout"` when the
/// records of a failed call failed in more than one way, so the entry does
/// not lay them all to the first; empty otherwise.
fn kinds_said(kinds: &[&'static str]) -> String {
    let mut counted: Vec<(&str, usize)> = Vec::new();
    for kind in kinds {
        match counted.iter_mut().find(|(k, _)| k == kind) {
            Some((_, n)) => *n += 1,
            None => counted.push((kind, 1)),
        }
    }
    if counted.len() < 2 {
        return String::new();
    }
    let said: Vec<String> = counted
        .iter()
        .map(|(kind, n)| match n {
            1 => format!("1 {kind}"),
            n => format!("{n} {kind}s"),
        })
        .collect();
    format!("; its records met {}", said.join(", "))
}

/// The longest reason a dead letter keeps from a stage: one that returns
/// megabytes as its reason would otherwise write them to the dead letter
/// and the log for every record.
const MAX_REASON: usize = 4096;

/// `reason`, cut to [`MAX_REASON`] bytes with how much was left out.
pub(crate) fn bounded_reason(reason: String) -> String {
    match crate::cut_text(&reason, MAX_REASON) {
        std::borrow::Cow::Borrowed(_) => reason,
        cut => cut.into_owned(),
    }
}

/// A dead letter for a record a stage refused.
fn dead_letter(stage: &str, reason: String, record: Record, input: Option<usize>) -> DeadLetter {
    DeadLetter {
        stage: stage.to_string(),
        reason,
        record,
        input,
        fault: false,
    }
}

fn settle(
    inputs: usize,
    outputs: Vec<(Option<usize>, Record)>,
    dead_letters: Vec<DeadLetter>,
) -> ChainOutput {
    let mut outcomes = vec![InputOutcome::Filtered; inputs];
    for (origin, _) in &outputs {
        if let Some(slot) = origin.and_then(|i| outcomes.get_mut(i)) {
            *slot = InputOutcome::Emitted;
        }
    }
    for dead in &dead_letters {
        if let Some(slot) = dead.input.and_then(|i| outcomes.get_mut(i)) {
            *slot = InputOutcome::DeadLettered;
        }
    }
    ChainOutput {
        outputs,
        dead_letters,
        outcomes,
    }
}
