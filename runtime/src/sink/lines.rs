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
    /// The file, when the sink writes one, to cut a batch that failed
    /// half-way (a full disk) back out of it.
    file: Option<std::fs::File>,
    /// Why a write failed. Every later batch is refused with it: one that
    /// fits the room the cut made would leave a gap in the file.
    failed: Option<(std::io::ErrorKind, String)>,
}

impl LinesSink {
    /// Appends to `path`, creating it and its folder when missing.
    pub async fn open_file(path: &Path, format: LineFormat) -> Result<Self, SinkError> {
        let io_err = |what: String| move |source| SinkError::Io { what, source };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(dir)
                .await
                .map_err(io_err(format!(
                    "cannot create folder {} for {}",
                    dir.display(),
                    path.display()
                )))?;
        }
        let cannot_open = || format!("cannot open {} for writing", path.display());
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err(cannot_open()))?;
        let writer = file.try_clone().map_err(io_err(cannot_open()))?;
        let mut sink = Self::new(
            Box::new(tokio::fs::File::from_std(writer)),
            path.display().to_string(),
            format,
        );
        // A line an earlier run left torn (killed, or its disk full) would
        // run on into this run's first line; it ends where it is instead.
        if ends_torn(path) {
            let ended = async {
                sink.writer.write_all(b"\n").await?;
                sink.writer.flush().await
            }
            .await;
            ended.map_err(|e| sink.io_error(e))?;
        }
        sink.file = Some(file);
        Ok(sink)
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
            file: None,
            failed: None,
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
        if let Some((kind, reason)) = &self.failed {
            let err = std::io::Error::new(*kind, format!("{reason} (an earlier batch)"));
            return Err(self.io_error(err));
        }
        self.buf.clear();
        for record in records {
            encode_line(record, self.format, &mut self.buf);
            self.buf.push(b'\n');
        }
        let start = self
            .file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| m.len());
        // One write and a flush per batch: the batch is on its way to disk
        // (or the terminal) before its inputs count as done.
        let result = async {
            self.writer.write_all(&self.buf).await?;
            self.writer.flush().await
        }
        .await;
        if let Err(err) = result {
            self.failed = Some((err.kind(), err.to_string()));
            // None of the batch counts as written, so none of it stays: the
            // file keeps whole lines, and a run after this one starts clean.
            if let (Some(file), Some(start)) = (&self.file, start) {
                if let Err(cut) = file.set_len(start) {
                    tracing::warn!(
                        file = %self.name,
                        "cannot cut a batch that failed half-way back out: {cut}"
                    );
                }
            }
            return Err(self.io_error(err));
        }
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

/// Whether a file's last byte is there and is not a newline.
fn ends_torn(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return false;
    };
    let mut last = [0u8; 1];
    file.seek(SeekFrom::End(-1)).is_ok() && file.read_exact(&mut last).is_ok() && last[0] != b'\n'
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One run of a file sink: opens `path`, writes one record, closes.
    async fn append_one(path: &Path, payload: &str) {
        let mut sink = LinesSink::open_file(path, LineFormat::Payload)
            .await
            .expect("opens");
        sink.send(&[Record::new(payload.as_bytes().to_vec())])
            .await
            .expect("writes");
        sink.close().await.expect("closes");
    }

    #[tokio::test]
    async fn a_line_left_torn_ends_before_the_next_run_writes() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("out.jsonl");
        std::fs::write(&path, "{\"payload\":1}\n{\"p").expect("write");
        append_one(&path, "2").await;
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, "{\"payload\":1}\n{\"p\n2\n");
        // A file that ends whole gets nothing added.
        append_one(&path, "3").await;
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text, "{\"payload\":1}\n{\"p\n2\n3\n");
    }
}
