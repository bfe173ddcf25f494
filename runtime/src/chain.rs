//! Runs batches through the stages in order and says what became of every
//! input: outputs, filtered, or a dead-letter entry naming the stage and the
//! reason. The chain knows nothing of where records come from or go to.

use std::time::{Duration, Instant};

use crate::wasm::{CallError, LoadedStage, Outcome, Record, StageInstance};

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

/// Cumulative figures for one stage, for logs and metrics.
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
}

/// Stages in order, each with one live instance.
pub struct Chain {
    slots: Vec<Slot>,
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
            });
        }
        Ok(Chain { slots })
    }

    pub fn stats(&self) -> impl Iterator<Item = (&str, &StageStats)> {
        self.slots.iter().map(|s| (s.stage.name(), &s.stats))
    }

    /// Runs a batch through every stage. Never fails: what cannot go on is
    /// in `dead_letters`, and `outcomes` has one entry per input.
    pub fn process(&mut self, batch: Vec<Record>) -> ChainOutput {
        let inputs = batch.len();
        let mut current: Vec<(Option<usize>, Record)> = batch
            .into_iter()
            .enumerate()
            .map(|(i, r)| (Some(i), r))
            .collect();
        let mut dead_letters = Vec::new();
        for slot in &mut self.slots {
            if current.is_empty() {
                break;
            }
            current = slot.process(current, &mut dead_letters);
        }
        settle(inputs, current, dead_letters)
    }

    /// Calls every stage's timer hook with the pipeline clock. What stage k
    /// emits goes through the stages after it, before their own flush, so the
    /// end of the input drains every window in order.
    pub fn flush(&mut self, now_ms: i64, end_of_input: bool) -> ChainOutput {
        let mut current: Vec<(Option<usize>, Record)> = Vec::new();
        let mut dead_letters = Vec::new();
        for slot in &mut self.slots {
            if !current.is_empty() {
                current = slot.process(current, &mut dead_letters);
            }
            slot.flush(now_ms, end_of_input, &mut current, &mut dead_letters);
        }
        settle(0, current, dead_letters)
    }
}

impl Slot {
    fn instance(&mut self) -> Result<&mut StageInstance, CallError> {
        if self.instance.is_none() {
            self.stats.restarts += 1;
            let fresh = self.stage.instantiate().map_err(|err| {
                CallError::InitRejected(format!("stage could not be restarted: {err}"))
            })?;
            self.instance = Some(fresh);
        }
        // Just filled above when it was empty.
        self.instance
            .as_mut()
            .ok_or_else(|| CallError::Contract("no instance".into()))
    }

    fn process(
        &mut self,
        batch: Vec<(Option<usize>, Record)>,
        dead_letters: &mut Vec<DeadLetter>,
    ) -> Vec<(Option<usize>, Record)> {
        let (origins, records): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
        let mut next = Vec::with_capacity(records.len());
        match self.call(&records) {
            Ok(outcomes) => self.sort(origins, records, outcomes, &mut next, dead_letters),
            Err(err) if records.len() == 1 => {
                self.dead_letter_all(&err, origins, records, dead_letters);
            }
            // One bad record must not take its batch with it: run the records
            // one by one on a fresh instance, so only the culprit is dead-lettered.
            Err(err) => self.isolate(err, origins, records, &mut next, dead_letters),
        }
        next
    }

    fn isolate(
        &mut self,
        first: CallError,
        origins: Vec<Option<usize>>,
        records: Vec<Record>,
        next: &mut Vec<(Option<usize>, Record)>,
        dead_letters: &mut Vec<DeadLetter>,
    ) {
        let mut failures_in_a_row = 0;
        let mut last = first;
        let mut pending = origins.into_iter().zip(records);
        for (origin, record) in pending.by_ref() {
            let single = [record];
            match self.call(&single) {
                Ok(outcomes) => {
                    failures_in_a_row = 0;
                    let [record] = single;
                    self.sort(vec![origin], vec![record], outcomes, next, dead_letters);
                }
                Err(err) => {
                    failures_in_a_row += 1;
                    let [record] = single;
                    dead_letters.push(self.dead_letter(err.to_string(), record, origin));
                    last = err;
                    if failures_in_a_row >= MAX_FAILURES_IN_A_ROW {
                        break;
                    }
                }
            }
        }
        // The stage fails on everything: the rest share the last reason
        // rather than each waiting out a deadline.
        let (origins, records): (Vec<_>, Vec<_>) = pending.unzip();
        self.dead_letter_all(&last, origins, records, dead_letters);
    }

    fn call(&mut self, records: &[Record]) -> Result<Vec<Outcome>, CallError> {
        self.stats.calls += 1;
        self.stats.records_in += records.len() as u64;
        let started = Instant::now();
        let result = self.instance().and_then(|i| i.process(records));
        self.stats.busy += started.elapsed();
        if let Err(err) = &result {
            self.fail(err);
        }
        result
    }

    fn sort(
        &mut self,
        origins: Vec<Option<usize>>,
        records: Vec<Record>,
        outcomes: Vec<Outcome>,
        next: &mut Vec<(Option<usize>, Record)>,
        dead_letters: &mut Vec<DeadLetter>,
    ) {
        for ((origin, record), outcome) in origins.into_iter().zip(records).zip(outcomes) {
            match outcome {
                Outcome::Emit(outputs) => {
                    self.stats.records_out += outputs.len() as u64;
                    next.extend(outputs.into_iter().map(|out| (origin, out)));
                }
                Outcome::Reject(reason) => {
                    self.stats.rejected += 1;
                    dead_letters.push(self.dead_letter(reason, record, origin));
                }
            }
        }
    }

    fn dead_letter_all(
        &self,
        err: &CallError,
        origins: Vec<Option<usize>>,
        records: Vec<Record>,
        dead_letters: &mut Vec<DeadLetter>,
    ) {
        let reason = err.to_string();
        for (origin, record) in origins.into_iter().zip(records) {
            dead_letters.push(self.dead_letter(reason.clone(), record, origin));
        }
    }

    fn flush(
        &mut self,
        now_ms: i64,
        end_of_input: bool,
        out: &mut Vec<(Option<usize>, Record)>,
        dead_letters: &mut Vec<DeadLetter>,
    ) {
        let started = Instant::now();
        let result = self.instance().and_then(|i| i.flush(now_ms, end_of_input));
        self.stats.busy += started.elapsed();
        let reason = match result {
            Ok(Ok(records)) => {
                self.stats.records_out += records.len() as u64;
                out.extend(records.into_iter().map(|r| (None, r)));
                return;
            }
            Ok(Err(reason)) => reason,
            Err(err) => {
                self.fail(&err);
                err.to_string()
            }
        };
        // A failed flush loses the stage's pending state; the dead letter says
        // so, with the clock, so it is never silent.
        let mut note = Record::new(Vec::new());
        note.timestamp = Some(now_ms);
        dead_letters.push(self.dead_letter(format!("flush failed: {reason}"), note, None));
    }

    fn fail(&mut self, err: &CallError) {
        self.stats.failed_calls += 1;
        tracing::warn!(
            stage = self.stage.name(),
            "call failed, instance replaced: {err}"
        );
        self.instance = None;
    }

    fn dead_letter(&self, reason: String, record: Record, input: Option<usize>) -> DeadLetter {
        DeadLetter {
            stage: self.stage.name().to_string(),
            reason,
            record,
            input,
        }
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
