use std::path::Path;

use async_trait::async_trait;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::{Rejected, Sink, SinkError};
use crate::codec::{encode_line, LineFormat};
use crate::Record;

/// JSON lines to a file or standard output.
pub struct LinesSink {
    writer: Box<dyn AsyncWrite + Send + Unpin>,
    name: String,
    format: LineFormat,
    buf: Vec<u8>,
}

impl LinesSink {
    /// Appends to `path`, creating it and its folder when missing.
    pub async fn open_file(path: &Path, format: LineFormat) -> Result<Self, SinkError> {
        let io_err = |what: String| move |source| SinkError::Io { what, source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(io_err(format!("cannot create folder {}", dir.display())))?;
        }
        let file = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .await
            .map_err(io_err(format!(
                "cannot open {} for writing",
                path.display()
            )))?;
        Ok(Self::new(
            Box::new(file),
            path.display().to_string(),
            format,
        ))
    }

    pub fn stdout(format: LineFormat) -> Self {
        Self::new(Box::new(tokio::io::stdout()), "stdout".into(), format)
    }

    pub fn new(
        writer: Box<dyn AsyncWrite + Send + Unpin>,
        name: String,
        format: LineFormat,
    ) -> Self {
        LinesSink {
            writer,
            name,
            format,
            buf: Vec::with_capacity(1 << 16),
        }
    }

    fn io_error(&self, source: std::io::Error) -> SinkError {
        SinkError::Io {
            what: format!("cannot write to {}", self.name),
            source,
        }
    }
}

#[async_trait]
impl Sink for LinesSink {
    async fn send(&mut self, records: &[Record]) -> Result<Vec<Rejected>, SinkError> {
        self.buf.clear();
        for record in records {
            encode_line(record, self.format, &mut self.buf);
            self.buf.push(b'\n');
        }
        // One write and a flush per batch: the batch is on its way to disk
        // (or the terminal) before its inputs count as done.
        let result = async {
            self.writer.write_all(&self.buf).await?;
            self.writer.flush().await
        }
        .await;
        result.map_err(|e| self.io_error(e))?;
        Ok(Vec::new())
    }

    async fn close(&mut self) -> Result<(), SinkError> {
        let result = self.writer.flush().await;
        result.map_err(|e| self.io_error(e))
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}
