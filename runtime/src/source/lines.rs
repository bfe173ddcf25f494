use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

use super::{Batch, Clock, Source, SourceError};
use crate::chain::DeadLetter;
use crate::codec::{decode_line, LineFormat};
use crate::Record;

/// Lines longer than this are cut into a dead letter instead of read whole,
/// so one runaway line cannot take the host's memory. It is a stage's
/// default memory cap: a longer record could not go through a stage anyway,
/// and an output file of records the stages made reads back.
const MAX_LINE: usize = 64 << 20;
/// How long a live source waits to fill a batch once it holds a record.
const LINGER: Duration = Duration::from_millis(5);

/// JSON lines from a file or standard input.
pub struct LinesSource {
    reader: Box<dyn AsyncBufRead + Send + Unpin>,
    name: String,
    format: LineFormat,
    clock: Clock,
    line_no: u64,
    next_id: u64,
    /// Read but not yet handed out; kept here so a cancelled call loses nothing.
    pending: Batch,
    buf: Vec<u8>,
    /// The line in `buf` was cut at `MAX_LINE`.
    truncated: bool,
    done: bool,
    /// A regular file, which a later run reads again from its start; what
    /// a pipe gave cannot be read again.
    rereadable: bool,
}

impl LinesSource {
    pub async fn open_file(path: &Path, format: LineFormat) -> Result<Self, SourceError> {
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|source| SourceError::Io {
                what: format!("cannot open source file {}", path.display()),
                source,
            })?;
        let rereadable = file.metadata().await.is_ok_and(|m| m.is_file());
        let mut source = Self::new(
            Box::new(BufReader::with_capacity(1 << 16, file)),
            path.display().to_string(),
            format,
            Clock::Event,
        );
        source.rereadable = rereadable;
        Ok(source)
    }

    pub fn stdin(format: LineFormat) -> Self {
        Self::new(
            Box::new(BufReader::new(tokio::io::stdin())),
            "stdin".into(),
            format,
            Clock::Wall,
        )
    }

    pub fn new(
        reader: Box<dyn AsyncBufRead + Send + Unpin>,
        name: String,
        format: LineFormat,
        clock: Clock,
    ) -> Self {
        LinesSource {
            reader,
            name,
            format,
            clock,
            line_no: 0,
            next_id: 0,
            pending: Batch::default(),
            buf: Vec::new(),
            truncated: false,
            done: false,
            rereadable: false,
        }
    }

    /// Reads one line into `buf`; false at the end of the input.
    async fn read_line(&mut self) -> Result<bool, SourceError> {
        loop {
            let available = self
                .reader
                .fill_buf()
                .await
                .map_err(|source| SourceError::Io {
                    what: format!("cannot read {}", self.name),
                    source,
                })?;
            if available.is_empty() {
                return Ok(!self.buf.is_empty());
            }
            let (used, found) = match available.iter().position(|&b| b == b'\n') {
                Some(nl) => (nl + 1, true),
                None => (available.len(), false),
            };
            let room = MAX_LINE.saturating_sub(self.buf.len());
            let take = used.min(room);
            self.truncated |= take < used;
            self.buf.extend_from_slice(&available[..take]);
            self.reader.consume(used);
            if found {
                return Ok(true);
            }
        }
    }

    fn take_line(&mut self) {
        self.take_line_or(None);
    }

    /// [`Self::take_line`]; with `unended`, the line is dead-lettered for
    /// that reason rather than read.
    fn take_line_or(&mut self, unended: Option<&str>) {
        self.line_no += 1;
        let mut raw = std::mem::take(&mut self.buf);
        if raw.last() == Some(&b'\n') {
            raw.pop();
        }
        if raw.last() == Some(&b'\r') {
            raw.pop();
        }
        // Editors on Windows start a UTF-8 file with a byte order mark; it
        // is no part of the first record.
        if self.line_no == 1 && raw.starts_with(b"\xef\xbb\xbf") {
            raw.drain(..3);
        }
        if raw.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        let truncated = std::mem::take(&mut self.truncated);
        let decoded = if let Some(reason) = unended {
            Err(reason.to_string())
        } else if truncated {
            Err(format!("line longer than {} MiB", MAX_LINE >> 20))
        } else {
            match std::str::from_utf8(&raw) {
                Ok(text) => decode_line(text, self.format),
                Err(err) => Err(format!("line is not UTF-8: {err}")),
            }
        };
        match decoded {
            Ok(record) => self.pending.records.push(record),
            Err(reason) => {
                raw.truncate(64 << 10);
                self.pending.unreadable.push(DeadLetter {
                    stage: "source".into(),
                    reason: format!("{} line {}: {reason}", self.name, self.line_no),
                    record: Record::new(raw),
                    input: None,
                    fault: false,
                });
            }
        }
    }
}

#[async_trait]
impl Source for LinesSource {
    async fn next_batch(&mut self, max: usize) -> Result<Option<Batch>, SourceError> {
        while !self.done && self.pending.inputs() < max {
            // On a live pipe, hand out what is here rather than wait for a
            // full batch. `read_line` keeps its progress in `self`, so the
            // timeout (like the runner's own select) loses nothing.
            let more = if self.clock == Clock::Wall && self.pending.inputs() > 0 {
                match tokio::time::timeout(LINGER, self.read_line()).await {
                    Ok(more) => more?,
                    Err(_) => break,
                }
            } else {
                self.read_line().await?
            };
            if more {
                self.take_line();
            } else {
                self.done = true;
            }
        }
        Ok(self.take_pending(max))
    }

    fn stop(&mut self) -> Option<String> {
        if self.done {
            return None;
        }
        self.done = true;
        // Bytes of a line whose end had not come: read from a pipe, they
        // could not be read again, so they go to the dead letter. Of a
        // regular file, the line is whole on disk and not yet an input.
        if !self.buf.is_empty() && !self.rereadable {
            self.take_line_or(Some("the run stopped before this line ended"));
        }
        Some(format!(
            "{} was read up to line {}, not to its end",
            self.name, self.line_no
        ))
    }

    /// What was read is at most a batch already.
    fn take_pending(&mut self, _max: usize) -> Option<Batch> {
        if self.pending.inputs() == 0 {
            return None;
        }
        let mut batch = std::mem::take(&mut self.pending);
        batch.id = self.next_id;
        self.next_id += 1;
        Some(batch)
    }

    async fn ack(&mut self, _id: u64) -> Result<(), SourceError> {
        // A file is read again from the start; nothing to acknowledge.
        Ok(())
    }

    fn clock(&self) -> Clock {
        self.clock
    }

    fn describe(&self) -> String {
        self.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(text: &'static str, format: LineFormat) -> LinesSource {
        LinesSource::new(
            Box::new(text.as_bytes()),
            "test.jsonl".into(),
            format,
            Clock::Event,
        )
    }

    #[tokio::test]
    async fn batches_hold_at_most_max_and_skip_blank_lines() {
        let mut src = source("a\n\nb\nc\r\nd", LineFormat::Payload);
        let first = src.next_batch(3).await.expect("reads").expect("batch");
        let payloads: Vec<_> = first.records.iter().map(|r| r.payload.clone()).collect();
        assert_eq!(payloads, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
        let second = src.next_batch(3).await.expect("reads").expect("batch");
        assert_eq!(second.records[0].payload, b"d");
        assert!(src.next_batch(3).await.expect("reads").is_none());
    }

    #[tokio::test]
    async fn a_byte_order_mark_is_no_part_of_the_first_record() {
        let mut src = source(
            "\u{feff}{\"text\":\"a\"}\n\u{feff}{\"text\":\"b\"}\n",
            LineFormat::Record,
        );
        let batch = src.next_batch(10).await.expect("reads").expect("batch");
        assert_eq!(batch.records.len(), 1, "{:?}", batch.unreadable);
        assert_eq!(batch.records[0].payload, b"a");
        // Only the file's start holds one; elsewhere it is the line's own.
        assert_eq!(batch.unreadable.len(), 1);
    }

    #[tokio::test]
    async fn bad_lines_become_dead_letters_that_name_the_line() {
        let mut src = source("{\"text\":\"ok\"}\n{oops\n", LineFormat::Record);
        let batch = src.next_batch(10).await.expect("reads").expect("batch");
        assert_eq!(batch.records.len(), 1);
        assert_eq!(batch.unreadable.len(), 1);
        assert!(batch.unreadable[0]
            .reason
            .starts_with("test.jsonl line 2: not a record object"));
        assert_eq!(batch.unreadable[0].record.payload, b"{oops");
    }
}
