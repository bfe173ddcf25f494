//! Where records come from. A source hands out batches and hears back when
//! each batch is settled, so one that can acknowledge (MQTT QoS 1, a queue)
//! does so only after every output and dead letter was accepted.

mod lines;
mod mqtt;

use std::path::PathBuf;

use async_trait::async_trait;
use serde::Deserialize;

use crate::chain::DeadLetter;
use crate::codec::LineFormat;
use crate::mqtt::{Connections, KeyPattern, Subscription};
use crate::Record;

pub use lines::LinesSource;
pub use mqtt::MqttSource;

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
    /// AWS Lambda invocations, served by `runnel lambda`.
    Lambda {
        #[serde(default)]
        event: crate::lambda::EventShape,
    },
    /// Messages from MQTT topic filters.
    Mqtt {
        /// The `[mqtt.NAME]` to use; may be left out when there is one.
        connection: Option<String>,
        /// Filters, wildcards and `$share/GROUP/...` allowed.
        topics: Vec<String>,
        #[serde(default = "default_qos")]
        qos: u8,
        /// Where the key is in the topic, e.g. `sensors/{key}/telemetry`.
        key: Option<String>,
    },
}

pub(crate) fn default_qos() -> u8 {
    1
}

impl SourceConfig {
    pub async fn open(
        &self,
        base_dir: &std::path::Path,
        connections: &Connections,
    ) -> Result<Box<dyn Source>, SourceError> {
        Ok(match self {
            SourceConfig::File { path, format } => {
                Box::new(LinesSource::open_file(&base_dir.join(path), *format).await?)
            }
            SourceConfig::Stdin { format } => Box::new(LinesSource::stdin(*format)),
            SourceConfig::Lambda { .. } => {
                return Err(SourceError::Lambda);
            }
            SourceConfig::Mqtt {
                connection,
                topics,
                key,
                ..
            } => {
                let name = connection.as_deref().unwrap_or_default();
                let conn = connections
                    .subscriber(name)
                    .ok_or_else(|| SourceError::Broker {
                        connection: name.to_string(),
                        reason: "not declared".into(),
                    })?;
                let key = key
                    .as_deref()
                    .map(KeyPattern::parse)
                    .transpose()
                    .map_err(|reason| SourceError::Broker {
                        connection: name.to_string(),
                        reason,
                    })?;
                Box::new(MqttSource::new(conn, topics.clone(), key)?)
            }
        })
    }

    /// The subscription an MQTT source needs made on its connection.
    pub fn mqtt_subscription(&self) -> Option<(Option<&str>, Subscription)> {
        match self {
            SourceConfig::Mqtt {
                connection,
                topics,
                qos,
                ..
            } => Some((
                connection.as_deref(),
                Subscription {
                    filters: topics.clone(),
                    qos: *qos,
                },
            )),
            _ => None,
        }
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
    #[error("a lambda source takes Lambda invocations: run it with `runnel lambda`")]
    Lambda,
    #[error("mqtt source, connection `{connection}`: {reason}")]
    Broker { connection: String, reason: String },
}

#[async_trait]
pub trait Source: Send {
    /// The next batch of at most `max` inputs; `None` once the input has
    /// ended. Must be cancel-safe: the runner races it against its timers.
    async fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, SourceError>;

    /// Every input of batch `id` ended as outputs that sinks accepted, or in the dead letter.
    async fn ack(&mut self, id: u64) -> Result<(), SourceError>;

    fn clock(&self) -> Clock;

    /// Inputs already read but not yet handed out, at most `max`, taken on
    /// a stop so the runner processes them before it exits.
    fn take_pending(&mut self, _max: usize) -> Option<Batch> {
        None
    }

    /// A stop was asked for: nothing more is read, and what was read of an
    /// input not yet whole joins the pending ones, to be accounted for.
    /// Returns where a finite input was left, when it had not ended, for the
    /// user to know what the run did not read.
    fn stop(&mut self) -> Option<String> {
        None
    }

    /// For logs: what this source reads.
    fn describe(&self) -> String;
}
