//! Where outputs and dead letters go. `send` returns once the records are
//! accepted (written, or acknowledged by a broker), which is what lets the
//! runner acknowledge the inputs they came from.

mod http;
mod lines;
mod mqtt;

use std::path::PathBuf;

use async_trait::async_trait;
use serde::Deserialize;

use crate::codec::LineFormat;
use crate::mqtt::{Connections, TopicTemplate};
use crate::Record;

pub use http::HttpSink;
pub use lines::LinesSink;
pub use mqtt::MqttSink;

/// The `[sink]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    /// JSON lines on standard output.
    Stdout { format: Option<LineFormat> },
    /// JSON lines appended to a file, relative to the pipeline file.
    File {
        path: PathBuf,
        format: Option<LineFormat>,
    },
    /// Outputs go nowhere but a Lambda answer.
    None {},
    /// Each record's payload POSTed to a URL.
    Http {
        url: String,
        /// Extra request headers, e.g. an API key.
        #[serde(default)]
        headers: std::collections::BTreeMap<String, String>,
    },
    /// Each record's payload published over MQTT.
    Mqtt {
        /// The `[mqtt.NAME]` to use; may be left out when there is one.
        connection: Option<String>,
        /// `{key}` and `{topic}` are the record's; the record's own topic
        /// when not set.
        topic: Option<String>,
        #[serde(default = "crate::source::default_qos")]
        qos: u8,
        #[serde(default)]
        retain: bool,
    },
}

/// The topic template of an MQTT sink, whose default is the record's topic.
pub(crate) fn topic_template(topic: Option<&str>) -> Result<TopicTemplate, String> {
    TopicTemplate::parse(topic.unwrap_or("{topic}"))
}

/// What a sink carries, which sets its defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkRole {
    /// The chain's outputs, written as whole records.
    Outputs,
    /// Dead-letter entries, written as the entry's own JSON. An MQTT topic
    /// template's `{key}` or `{topic}` that an entry lacks (an entry about
    /// the stage, or a keyless input) becomes `_`, so none is refused.
    DeadLetters,
}

/// What a dead-letter topic gets for a key or topic its entry lacks.
pub const MISSING_IN_DEAD_LETTER_TOPIC: &str = "_";

impl SinkConfig {
    /// Opens the sink for `role`.
    pub async fn open(
        &self,
        base_dir: &std::path::Path,
        role: SinkRole,
        connections: &Connections,
    ) -> Result<Box<dyn Sink>, SinkError> {
        let default_format = match role {
            SinkRole::Outputs => LineFormat::Record,
            SinkRole::DeadLetters => LineFormat::Payload,
        };
        Ok(match self {
            SinkConfig::Stdout { format } => {
                Box::new(LinesSink::stdout(format.unwrap_or(default_format)))
            }
            SinkConfig::File { path, format } => Box::new(
                LinesSink::open_file(&base_dir.join(path), format.unwrap_or(default_format))
                    .await?,
            ),
            SinkConfig::None {} => Box::new(NoSink),
            SinkConfig::Http { url, headers } => Box::new(
                HttpSink::new(
                    url,
                    headers
                        .iter()
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                )
                .map_err(|reason| SinkError::Http {
                    url: url.clone(),
                    reason,
                    accepted: 0,
                })?,
            ),
            SinkConfig::Mqtt {
                connection,
                topic,
                qos,
                retain,
            } => {
                let name = connection.as_deref().unwrap_or_default();
                let broker = |reason: String| SinkError::Broker {
                    connection: name.to_string(),
                    reason,
                };
                let conn = connections
                    .publisher(name)
                    .ok_or_else(|| broker("not declared".into()))?;
                let template = topic_template(topic.as_deref()).map_err(broker)?;
                let fill = (role == SinkRole::DeadLetters).then_some(MISSING_IN_DEAD_LETTER_TOPIC);
                Box::new(MqttSink::new(conn, template, *qos, *retain, fill))
            }
        })
    }

    /// The connection an MQTT sink names, if this is one.
    pub fn mqtt_connection(&self) -> Option<Option<&str>> {
        match self {
            SinkConfig::Mqtt { connection, .. } => Some(connection.as_deref()),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("http sink {url}: {reason}")]
    Http {
        url: String,
        reason: String,
        /// Outputs of the same `send` the endpoint took before it failed.
        accepted: usize,
    },
    #[error("mqtt sink, connection `{connection}`: {reason}")]
    Broker { connection: String, reason: String },
}

impl SinkError {
    /// Outputs of the failed `send` that were taken before it failed.
    pub fn accepted_before(&self) -> usize {
        match self {
            SinkError::Http { accepted, .. } => *accepted,
            _ => 0,
        }
    }
}

/// A record a sink would not take, and why; the runner dead-letters it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejected {
    /// Its place in the slice given to `send`.
    pub index: usize,
    pub reason: String,
}

/// What `send` would return, still to come.
pub type Sending =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Vec<Rejected>, SinkError>> + Send>>;

#[async_trait]
pub trait Sink: Send {
    /// Takes records in order; returns once they are accepted, with those
    /// refused one by one (a topic that cannot be made, a broker's no).
    async fn send(&mut self, records: &[Record]) -> Result<Vec<Rejected>, SinkError>;

    /// Hands records over, in order after those handed over before, and
    /// returns their acceptance still to come, so that the caller can go on
    /// while a broker acknowledges them. By default it is `send`, done now.
    async fn start_send(&mut self, records: &[Record]) -> Sending {
        let accepted = self.send(records).await;
        Box::pin(std::future::ready(accepted))
    }

    /// Flushes and closes; called once at the end of a run.
    async fn close(&mut self) -> Result<(), SinkError>;

    /// For logs: where this sink writes.
    fn describe(&self) -> String;
}

/// Takes records and keeps none: for a Lambda whose outputs are its answer.
struct NoSink;

#[async_trait]
impl Sink for NoSink {
    async fn send(&mut self, _records: &[Record]) -> Result<Vec<Rejected>, SinkError> {
        Ok(Vec::new())
    }

    async fn close(&mut self) -> Result<(), SinkError> {
        Ok(())
    }

    fn describe(&self) -> String {
        "none".into()
    }
}
