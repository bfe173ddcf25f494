//! Where outputs and dead letters go. `send` returns once the records are
//! accepted (written, or acknowledged by a broker), which is what lets the
//! runner acknowledge the inputs they came from.

mod lines;

use std::path::PathBuf;

use async_trait::async_trait;
use serde::Deserialize;

use crate::codec::LineFormat;
use crate::Record;

pub use lines::LinesSink;

/// The `[sink]` table.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum SinkConfig {
    /// JSON lines on standard output.
    Stdout { format: Option<LineFormat> },
    /// JSON lines appended to a file, relative to the pipeline file.
    File {
        path: PathBuf,
        format: Option<LineFormat>,
    },
}

impl SinkConfig {
    /// Opens the sink. `default_format` is the role's: whole records for
    /// outputs, the entry's own JSON for dead letters.
    pub async fn open(
        &self,
        base_dir: &std::path::Path,
        default_format: LineFormat,
    ) -> Result<Box<dyn Sink>, SinkError> {
        Ok(match self {
            SinkConfig::Stdout { format } => {
                Box::new(LinesSink::stdout(format.unwrap_or(default_format)))
            }
            SinkConfig::File { path, format } => Box::new(
                LinesSink::open_file(&base_dir.join(path), format.unwrap_or(default_format))
                    .await?,
            ),
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

#[async_trait]
pub trait Sink: Send {
    /// Takes records in order; returns once they are accepted.
    async fn send(&mut self, records: &[Record]) -> Result<(), SinkError>;

    /// Flushes and closes; called once at the end of a run.
    async fn close(&mut self) -> Result<(), SinkError>;

    /// For logs: where this sink writes.
    fn describe(&self) -> String;
}
