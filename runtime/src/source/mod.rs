//! Where records come from. A source hands out batches and hears back when
//! each batch is settled, so one that can acknowledge (MQTT QoS 1, a queue)
//! does so only after every output and dead letter was accepted.

mod lines;

use std::path::PathBuf;

use async_trait::async_trait;
use serde::Deserialize;

use crate::chain::DeadLetter;
use crate::codec::LineFormat;
use crate::Record;

pub use lines::LinesSource;

/// The `[source]` table.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// JSON lines from a file, read to its end.
    File {
        path: PathBuf,
        #[serde(default)]
        format: LineFormat,
    },
    /// JSON lines from standard input, until it closes.
    Stdin {
        #[serde(default)]
        format: LineFormat,
    },
}

impl SourceConfig {
    pub async fn open(&self, base_dir: &std::path::Path) -> Result<Box<dyn Source>, SourceError> {
        Ok(match self {
            SourceConfig::File { path, format } => {
                Box::new(LinesSource::open_file(&base_dir.join(path), *format).await?)
            }
            SourceConfig::Stdin { format } => Box::new(LinesSource::stdin(*format)),
        })
    }
}

/// What time means to the pipeline's timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Clock {
    /// Wall-clock time: timers fire as time passes (live inputs).
    Wall,
    /// The newest record timestamp seen: replaying a file closes windows as
    /// its own time passes, however fast it is read.
    Event,
}

/// A batch as a source delivers it.
#[derive(Debug, Default)]
pub struct Batch {
    /// Passed to [`Source::ack`] once the batch is settled.
    pub id: u64,
    pub records: Vec<Record>,
    /// Input the source could not make a record of, already dead-lettered.
    pub unreadable: Vec<DeadLetter>,
}

impl Batch {
    /// Every input the batch accounts for.
    pub fn inputs(&self) -> usize {
        self.records.len() + self.unreadable.len()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

#[async_trait]
pub trait Source: Send {
    /// The next batch of at most `max` inputs; `None` once the input has
    /// ended. Must be cancel-safe: the runner races it against its timers.
    async fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, SourceError>;

    /// Every input of batch `id` ended as outputs that sinks accepted, or in the dead letter.
    async fn ack(&mut self, id: u64) -> Result<(), SourceError>;

    fn clock(&self) -> Clock;

    /// Inputs already read but not yet handed out, taken on a stop so the
    /// runner processes them before it exits.
    fn take_pending(&mut self) -> Option<Batch> {
        None
    }

    /// For logs: what this source reads.
    fn describe(&self) -> String;
}
