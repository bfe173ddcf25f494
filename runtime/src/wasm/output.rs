//! Guest stdout and stderr, line by line into `tracing`.

use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// Longest line kept; the rest of a longer one is counted and left out, so
/// a stage that writes without newlines grows neither the host's memory
/// nor its log.
const MAX_LINE: usize = 4096;
/// How much of stderr is kept to explain a trap.
const TAIL: usize = 1024;

/// Most lines one call of a stage may log, its log calls and its stdout and
/// stderr lines together. A stage that logs in a loop would otherwise spend
/// its deadline on the host's log, pass or fail by the log level, and fill
/// a gateway's disk; lines beyond are counted, dropped and reported.
pub const MAX_LOG_LINES_PER_CALL: u32 = 10_000;

/// The log lines of the current call, shared by the log import and the
/// stdout and stderr streams.
#[derive(Clone, Default)]
pub struct LogBudget {
    counts: Arc<(AtomicU32, AtomicU32)>,
}

impl LogBudget {
    /// Whether one more line may be logged; if not, it is counted as dropped.
    pub fn take(&self) -> bool {
        let (written, dropped) = &*self.counts;
        if written.fetch_add(1, Ordering::Relaxed) < MAX_LOG_LINES_PER_CALL {
            return true;
        }
        dropped.fetch_add(1, Ordering::Relaxed);
        false
    }

    /// Starts a call afresh; returns how many lines the last one dropped.
    pub fn reset(&self) -> u32 {
        let (written, dropped) = &*self.counts;
        written.store(0, Ordering::Relaxed);
        dropped.swap(0, Ordering::Relaxed)
    }
}

#[derive(Clone)]
pub struct GuestOutput {
    inner: Arc<Mutex<Lines>>,
}

struct Lines {
    stage: Arc<str>,
    is_stderr: bool,
    partial: Vec<u8>,
    /// Bytes of the current line past `MAX_LINE`, left out.
    cut: usize,
    tail: String,
    budget: LogBudget,
}

impl GuestOutput {
    pub fn new(stage: Arc<str>, is_stderr: bool, budget: LogBudget) -> Self {
        GuestOutput {
            inner: Arc::new(Mutex::new(Lines {
                stage,
                is_stderr,
                partial: Vec::new(),
                cut: 0,
                tail: String::new(),
                budget,
            })),
        }
    }

    /// What was written since the last call, including an unfinished line.
    pub fn take_tail(&self) -> String {
        let Ok(mut lines) = self.inner.lock() else {
            return String::new();
        };
        if !lines.partial.is_empty() {
            lines.emit_partial();
        }
        std::mem::take(&mut lines.tail)
    }

    fn write(&self, bytes: &[u8]) {
        if let Ok(mut lines) = self.inner.lock() {
            lines.push(bytes);
        }
    }
}

impl Lines {
    fn push(&mut self, mut bytes: &[u8]) {
        loop {
            let (piece, rest) = match bytes.iter().position(|&b| b == b'\n') {
                Some(end) => (&bytes[..end], Some(&bytes[end + 1..])),
                None => (bytes, None),
            };
            // A line keeps its first MAX_LINE bytes; the rest is counted.
            let room = MAX_LINE.saturating_sub(self.partial.len());
            let kept = piece.len().min(room);
            self.partial.extend_from_slice(&piece[..kept]);
            self.cut += piece.len() - kept;
            match rest {
                Some(rest) => {
                    self.emit_partial();
                    bytes = rest;
                }
                None => break,
            }
        }
    }

    fn emit_partial(&mut self) {
        if self.cut > 0 {
            // A line cut at MAX_LINE may end inside a character: that part
            // counts as cut rather than showing as a replacement character.
            if let Err(err) = std::str::from_utf8(&self.partial) {
                if err.error_len().is_none() {
                    self.cut += self.partial.len() - err.valid_up_to();
                    self.partial.truncate(err.valid_up_to());
                }
            }
        }
        let mut line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        if self.cut > 0 {
            line.push_str(&format!("… ({} bytes more)", self.cut));
            self.cut = 0;
        }
        // A carriage return would let the stage overwrite the log line on a
        // terminal so that it reads as runnel's own.
        if line.contains('\r') {
            line = line.replace('\r', "\\r");
        }
        let stage = &*self.stage;
        let shown = self.budget.take();
        if self.is_stderr {
            // The tail explains a trap, so it is kept over the budget too.
            if shown {
                tracing::warn!(target: "runnel::stage", stage, stream = "stderr", "{line}");
            }
            if !self.tail.is_empty() {
                self.tail.push('\n');
            }
            self.tail.push_str(&line);
            if self.tail.len() > TAIL {
                let mut cut = self.tail.len() - TAIL;
                while !self.tail.is_char_boundary(cut) {
                    cut += 1;
                }
                self.tail.drain(..cut);
            }
        } else if shown {
            tracing::info!(target: "runnel::stage", stage, stream = "stdout", "{line}");
        }
    }
}

/// A last line the stage wrote without a newline shows when the instance
/// ends rather than being lost with it.
impl Drop for Lines {
    fn drop(&mut self) {
        if !self.partial.is_empty() {
            self.emit_partial();
        }
    }
}

impl IsTerminal for GuestOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for GuestOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for GuestOutput {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        GuestOutput::write(self, &bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(MAX_LINE)
    }
}

impl tokio::io::AsyncWrite for GuestOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        GuestOutput::write(&self, buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
