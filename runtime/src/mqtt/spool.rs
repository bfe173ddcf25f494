//! Store-and-forward: messages for a broker that cannot be reached wait on
//! disk, in order, and survive a restart.
//!
//! The spool is a folder with `spool.jsonl` (one message a line, appended
//! and synced before the inputs behind them are acknowledged) and
//! `spool.pos` (how far replay has got). A line torn by a crash is dropped
//! on open; a message replayed but not yet recorded in `spool.pos` is sent
//! again, which at-least-once allows. `spool.lock` is locked for as long as
//! a process uses the spool: two appending to one file would interleave
//! their messages and each replay the other's.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::link::Outbound;

/// What to do when the spool is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum WhenFull {
    /// Drop the oldest messages to make room, and log how many.
    DropOldest,
    /// Take nothing more: the pipeline stops acknowledging its inputs, so
    /// they stay with their own broker until the spool drains.
    RefuseNew,
}

/// The `[mqtt.NAME.spool]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// A folder, relative to the pipeline file.
    pub path: PathBuf,
    /// The most the spool holds, in MiB.
    #[serde(default = "default_max_mb")]
    pub max_mb: u64,
    pub when_full: WhenFull,
}

fn default_max_mb() -> u64 {
    64
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("spool {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "spool {path} is in use by another process (it holds {path}/spool.lock): \
         give each pipeline a spool folder of its own"
    )]
    InUse { path: PathBuf },
    #[error("spool is full ({max_mb} MiB) and set to refuse new messages")]
    Full { max_mb: u64 },
    #[error("spool {path}: {source}")]
    NoSpace {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl SpoolError {
    /// The spool takes nothing more for now, but nothing is broken: new
    /// messages wait, their inputs unacknowledged, until it drains.
    pub fn is_full(&self) -> bool {
        matches!(self, SpoolError::Full { .. } | SpoolError::NoSpace { .. })
    }
}

/// Whether a write failed for want of room on the disk, which delivering
/// what is spooled will make.
fn out_of_room(err: &std::io::Error) -> bool {
    matches!(
        err.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// The file in a spool's folder that holds the messages.
pub const SPOOL_FILE: &str = "spool.jsonl";

/// Takes the lock of a spool's folder, or says who holds it.
fn lock_folder(dir: &Path) -> Result<File, SpoolError> {
    let path = dir.join("spool.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| SpoolError::Io {
            path: dir.to_owned(),
            source,
        })?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(SpoolError::InUse {
            path: dir.to_owned(),
        }),
        Err(std::fs::TryLockError::Error(source)) => Err(SpoolError::Io {
            path: dir.to_owned(),
            source,
        }),
    }
}

pub struct Spool {
    dir: PathBuf,
    file: File,
    /// Holds the folder's lock; released when the spool is dropped.
    _lock: File,
    /// Bytes in `spool.jsonl`.
    len: u64,
    /// Where the first message not yet replayed starts.
    pos: u64,
    /// Messages between `pos` and `len`.
    count: u64,
    max_bytes: u64,
    when_full: WhenFull,
    /// Messages dropped to make room, over the spool's life in this process.
    pub dropped: u64,
    /// Where the run being replayed ends: its messages are with the broker,
    /// so a drop passes over them without calling them dropped, and the
    /// file is not compacted under their offsets until they are committed.
    in_flight_end: Option<u64>,
    /// Messages of the run being replayed that a drop passed over already.
    passed_in_flight: u64,
}

/// A run of spooled messages, and where the spool stands once they are sent.
pub struct Peeked {
    pub messages: Vec<Outbound>,
    pub end: u64,
}

impl Spool {
    pub fn open(dir: &Path, max_mb: u64, when_full: WhenFull) -> Result<Self, SpoolError> {
        let io = |source| SpoolError::Io {
            path: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let lock = lock_folder(dir)?;
        let data = dir.join(SPOOL_FILE);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&data)
            .map_err(io)?;
        let pos = std::fs::read_to_string(dir.join("spool.pos"))
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .unwrap_or(0);
        // Count what is left, and cut a line a crash tore.
        let mut reader = BufReader::new(File::open(&data).map_err(io)?);
        let mut good = 0u64;
        let mut count = 0u64;
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).map_err(io)? as u64;
            if n == 0 || line.last() != Some(&b'\n') {
                break;
            }
            if good >= pos {
                count += 1;
            }
            good += n;
        }
        let len = file.seek(SeekFrom::End(0)).map_err(io)?;
        // Everything was delivered, but the run that did it could not empty
        // the file (a full disk, a crash): it is emptied now.
        let good = if count == 0 { 0 } else { good };
        if len != good {
            file.set_len(good).map_err(io)?;
        }
        let pos = pos.min(good);
        Ok(Spool {
            dir: dir.to_owned(),
            file,
            _lock: lock,
            len: good,
            pos,
            count,
            max_bytes: max_mb << 20,
            when_full,
            dropped: 0,
            in_flight_end: None,
            passed_in_flight: 0,
        })
    }

    /// A run from [`Self::peek`] is being replayed, up to `end`; `None` when
    /// that replay was given up (it is peeked again later).
    pub fn replaying(&mut self, end: Option<u64>) {
        self.in_flight_end = end;
        self.passed_in_flight = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Messages waiting.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Bytes waiting.
    pub fn bytes(&self) -> u64 {
        self.len - self.pos
    }

    pub fn max_mb(&self) -> u64 {
        self.max_bytes >> 20
    }

    /// The error for a failed read or write of the spool's files: out of
    /// room on the disk, whichever file it was, is a full spool.
    fn io(&self, source: std::io::Error) -> SpoolError {
        let path = self.dir.clone();
        if out_of_room(&source) {
            SpoolError::NoSpace { path, source }
        } else {
            SpoolError::Io { path, source }
        }
    }

    /// Appends `messages` in order and syncs them to disk. When they do not
    /// fit, drops the oldest or refuses all of them, as configured.
    pub fn append(&mut self, messages: &[Outbound]) -> Result<(), SpoolError> {
        let mut text = Vec::new();
        for message in messages {
            serde_json::to_writer(&mut text, message)
                .map_err(|e| self.io(std::io::Error::other(e)))?;
            text.push(b'\n');
        }
        let needed = text.len() as u64;
        if self.bytes() + needed > self.max_bytes {
            match self.when_full {
                WhenFull::RefuseNew => {
                    return Err(SpoolError::Full {
                        max_mb: self.max_mb(),
                    })
                }
                WhenFull::DropOldest => self.drop_oldest(needed)?,
            }
        }
        let written = self
            .file
            .write_all(&text)
            .and_then(|()| self.file.sync_data());
        if let Err(err) = written {
            // Cut what part of the messages did reach the file: the next
            // append would otherwise follow a torn line, and the message
            // after it would be lost when the file is read back. Through a
            // handle of its own, should this one be what failed.
            let _ = OpenOptions::new()
                .write(true)
                .open(self.dir.join(SPOOL_FILE))
                .and_then(|file| file.set_len(self.len));
            return Err(self.io(err));
        }
        self.len += needed;
        self.count += messages.len() as u64;
        Ok(())
    }

    /// Skips the oldest messages until `needed` more bytes fit.
    fn drop_oldest(&mut self, needed: u64) -> Result<(), SpoolError> {
        let mut reader = self.reader_at(self.pos)?;
        let mut line = Vec::new();
        while self.bytes() + needed > self.max_bytes && self.count > 0 {
            let n = self.next_line(&mut reader, &mut line)?;
            if n == 0 {
                break;
            }
            self.pos += n;
            self.count -= 1;
            match self.in_flight_end {
                Some(end) if self.pos <= end => self.passed_in_flight += 1,
                _ => self.dropped += 1,
            }
        }
        self.save_pos()?;
        if self.in_flight_end.is_some() {
            return Ok(());
        }
        self.compact()
    }

    /// Reads the next line into `line`; its length in bytes, 0 at the end.
    fn next_line(
        &self,
        reader: &mut BufReader<File>,
        line: &mut Vec<u8>,
    ) -> Result<u64, SpoolError> {
        line.clear();
        let n = reader.read_until(b'\n', line).map_err(|e| self.io(e))?;
        Ok(n as u64)
    }

    fn reader_at(&self, offset: u64) -> Result<BufReader<File>, SpoolError> {
        let mut file = File::open(self.dir.join("spool.jsonl")).map_err(|e| self.io(e))?;
        file.seek(SeekFrom::Start(offset)).map_err(|e| self.io(e))?;
        Ok(BufReader::new(file))
    }

    /// Up to `max` messages from the oldest on, without removing them.
    pub fn peek(&self, max: usize) -> Result<Peeked, SpoolError> {
        let mut reader = self.reader_at(self.pos)?;
        let mut end = self.pos;
        let mut messages = Vec::new();
        let mut line = Vec::new();
        while messages.len() < max && end < self.len {
            let n = self.next_line(&mut reader, &mut line)?;
            if n == 0 {
                break;
            }
            end += n;
            match serde_json::from_slice::<Outbound>(&line) {
                Ok(message) => messages.push(message),
                Err(err) => tracing::error!(
                    spool = %self.dir.display(),
                    offset = end - n,
                    "skipping a spooled message that cannot be read: {err}"
                ),
            }
        }
        Ok(Peeked { messages, end })
    }

    /// Everything before `end` was delivered.
    pub fn commit(&mut self, end: u64, delivered: u64) -> Result<(), SpoolError> {
        let passed = self.passed_in_flight;
        self.replaying(None);
        if end <= self.pos {
            return Ok(());
        }
        self.pos = end.min(self.len);
        self.count = self.count.saturating_sub(delivered.saturating_sub(passed));
        if self.pos == self.len {
            return self.empty();
        }
        self.save_pos()?;
        self.compact()
    }

    /// Everything was delivered: the file is emptied before the position is
    /// written, as emptying it takes no room on the disk and writing does,
    /// and a spool that filled the disk would never be emptied otherwise.
    /// A crash in between finds a position past the file's end: nothing
    /// waits, which is so.
    fn empty(&mut self) -> Result<(), SpoolError> {
        self.file.set_len(0).map_err(|e| self.io(e))?;
        self.len = 0;
        self.pos = 0;
        self.count = 0;
        self.save_pos()
    }

    fn save_pos(&self) -> Result<(), SpoolError> {
        let tmp = self.dir.join("spool.pos.tmp");
        let saved = std::fs::write(&tmp, self.pos.to_string())
            .and_then(|()| std::fs::rename(&tmp, self.dir.join("spool.pos")));
        saved.map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            self.io(e)
        })
    }

    /// Drops delivered bytes from the file once they outweigh what waits, so
    /// the file stays near the size the spool is allowed.
    fn compact(&mut self) -> Result<(), SpoolError> {
        if self.pos == 0 || (self.pos < self.max_bytes / 2 && self.pos < self.len) {
            return Ok(());
        }
        let data = self.dir.join("spool.jsonl");
        let tmp = self.dir.join("spool.jsonl.tmp");
        let copied = self.reader_at(self.pos).and_then(|mut reader| {
            let mut out = File::create(&tmp).map_err(|e| self.io(e))?;
            std::io::copy(&mut reader, &mut out).map_err(|e| self.io(e))?;
            out.sync_data().map_err(|e| self.io(e))
        });
        if let Err(err) = copied {
            // On a full disk a partial copy would only take more of it; the
            // file is compacted on a later commit instead.
            let _ = std::fs::remove_file(&tmp);
            return Err(err);
        }
        // The new file holds no delivered bytes, so `pos` must read 0 before
        // the rename; a crash in between replays, never skips.
        let old_pos = self.pos;
        self.pos = 0;
        self.save_pos()?;
        std::fs::rename(&tmp, &data).map_err(|e| self.io(e))?;
        self.file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&data)
            .map_err(|e| self.io(e))?;
        self.len -= old_pos;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(i: usize) -> Outbound {
        Outbound {
            topic: format!("t/{i}"),
            payload: vec![b'x'; 100],
            qos: 1,
            retain: false,
            properties: Vec::new(),
        }
    }

    #[test]
    fn a_failed_append_leaves_no_torn_line_behind() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut spool = Spool::open(dir.path(), 1, WhenFull::RefuseNew).expect("open");
        spool.append(&[msg(0)]).expect("append");
        let good = spool.len;
        // Part of a message reached the disk before it failed...
        let mut data = OpenOptions::new()
            .append(true)
            .open(dir.path().join(SPOOL_FILE))
            .expect("spool file");
        data.write_all(br#"{"topic":"t/1","payl"#)
            .expect("a torn part");
        // ...and the write fails (a handle that cannot write stands in).
        let writable = std::mem::replace(
            &mut spool.file,
            File::open(dir.path().join(SPOOL_FILE)).expect("read-only handle"),
        );
        assert!(spool.append(&[msg(1)]).is_err());
        spool.file = writable;
        let on_disk = std::fs::metadata(dir.path().join(SPOOL_FILE))
            .expect("size")
            .len();
        assert_eq!(on_disk, good, "the torn part is cut");
        assert_eq!(spool.len, good);
        assert_eq!(spool.count(), 1);
        spool.append(&[msg(2)]).expect("append after the failure");
        drop(spool);
        let reopened = Spool::open(dir.path(), 1, WhenFull::RefuseNew).expect("reopen");
        assert_eq!(topics(&reopened.peek(10).expect("peek")), ["t/0", "t/2"]);
    }

    #[test]
    fn one_process_at_a_time_uses_a_spool() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = Spool::open(dir.path(), 1, WhenFull::RefuseNew).expect("open");
        // A lock of another open file description, as another process has.
        let second = Spool::open(dir.path(), 1, WhenFull::RefuseNew).err();
        let said = second.map(|e| e.to_string()).unwrap_or_default();
        assert!(said.contains("is in use by another process"), "{said}");
        drop(first);
        Spool::open(dir.path(), 1, WhenFull::RefuseNew).expect("free again");
    }

    #[test]
    fn a_spool_delivered_to_its_end_is_emptied_on_disk() {
        let dir = tempfile::tempdir().expect("temp dir");
        let size = || {
            std::fs::metadata(dir.path().join(SPOOL_FILE))
                .expect("size")
                .len()
        };
        let mut spool = Spool::open(dir.path(), 1, WhenFull::RefuseNew).expect("open");
        spool.append(&[msg(0), msg(1), msg(2)]).expect("append");
        let peeked = spool.peek(10).expect("peek");
        spool.commit(peeked.end, 3).expect("commit");
        assert!(spool.is_empty());
        assert_eq!(size(), 0, "the delivered messages take no room");
        spool.append(&[msg(3)]).expect("append");
        assert_eq!(topics(&spool.peek(10).expect("peek")), ["t/3"]);

        // A run that could not empty the file (here, the file put back as
        // it was) leaves it to the next open.
        let peeked = spool.peek(10).expect("peek");
        spool.commit(peeked.end, 1).expect("commit");
        drop(spool);
        let mut line = serde_json::to_vec(&msg(3)).expect("json");
        line.push(b'\n');
        std::fs::write(dir.path().join(SPOOL_FILE), &line).expect("write");
        std::fs::write(dir.path().join("spool.pos"), line.len().to_string()).expect("pos");
        let reopened = Spool::open(dir.path(), 1, WhenFull::RefuseNew).expect("reopen");
        assert!(reopened.is_empty());
        assert_eq!(size(), 0);
    }

    #[test]
    fn a_full_disk_counts_as_a_full_spool() {
        assert!(out_of_room(&std::io::Error::from(
            std::io::ErrorKind::StorageFull
        )));
        assert!(out_of_room(&std::io::Error::from_raw_os_error(28)));
        assert!(!out_of_room(&std::io::Error::from(
            std::io::ErrorKind::PermissionDenied
        )));
        let no_space = SpoolError::NoSpace {
            path: PathBuf::from("spool"),
            source: std::io::Error::from_raw_os_error(28),
        };
        assert!(no_space.is_full());
        assert!(SpoolError::Full { max_mb: 1 }.is_full());
    }

    fn topics(p: &Peeked) -> Vec<String> {
        p.messages.iter().map(|m| m.topic.clone()).collect()
    }

    #[test]
    fn messages_come_back_in_order_across_a_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        let mut spool = Spool::open(dir.path(), 1, WhenFull::RefuseNew).expect("open");
        spool.append(&[msg(0), msg(1), msg(2)]).expect("append");
        let first = spool.peek(2).expect("peek");
        assert_eq!(topics(&first), ["t/0", "t/1"]);
        spool.commit(first.end, 2).expect("commit");
        drop(spool);
        let mut spool = Spool::open(dir.path(), 1, WhenFull::RefuseNew).expect("reopen");
        assert_eq!(spool.count(), 1);
        let rest = spool.peek(10).expect("peek");
        assert_eq!(topics(&rest), ["t/2"]);
        spool.commit(rest.end, 1).expect("commit");
        assert!(spool.is_empty());
        assert_eq!(spool.bytes(), 0);
    }

    #[test]
    fn a_torn_last_line_is_dropped_on_open() {
        let dir = tempfile::tempdir().expect("dir");
        let mut spool = Spool::open(dir.path(), 1, WhenFull::RefuseNew).expect("open");
        spool.append(&[msg(0)]).expect("append");
        drop(spool);
        let mut f = OpenOptions::new()
            .append(true)
            .open(dir.path().join("spool.jsonl"))
            .expect("file");
        f.write_all(b"{\"topic\":\"t/1\",\"pay").expect("tear");
        let spool = Spool::open(dir.path(), 1, WhenFull::RefuseNew).expect("reopen");
        assert_eq!(spool.count(), 1);
        assert_eq!(topics(&spool.peek(10).expect("peek")), ["t/0"]);
    }

    #[test]
    fn full_spool_refuses_or_drops_the_oldest() {
        let dir = tempfile::tempdir().expect("dir");
        let mut spool = Spool::open(dir.path(), 0, WhenFull::RefuseNew).expect("open");
        spool.max_bytes = 1000;
        let batch: Vec<Outbound> = (0..5).map(msg).collect();
        spool.append(&batch).expect("fits");
        assert!(matches!(spool.append(&batch), Err(SpoolError::Full { .. })));
        assert_eq!(spool.count(), 5);

        let dir = tempfile::tempdir().expect("dir");
        let mut spool = Spool::open(dir.path(), 0, WhenFull::DropOldest).expect("open");
        spool.max_bytes = 1000;
        for i in 0..12 {
            spool.append(&[msg(i)]).expect("append");
        }
        assert!(spool.bytes() <= 1000);
        assert!(spool.dropped > 0);
        let left = spool.peek(100).expect("peek");
        assert_eq!(left.messages.len() as u64, spool.count());
        assert_eq!(left.messages.last().map(|m| m.topic.as_str()), Some("t/11"));
        assert_eq!(spool.count() + spool.dropped, 12);
    }

    /// A drop while a run is being replayed: the run's messages are with the
    /// broker, so they are not counted as dropped, and the offsets the run
    /// commits stay good (no compaction under them).
    #[test]
    fn a_drop_during_a_replay_neither_counts_nor_skips_the_run() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut spool = Spool::open(dir.path(), 0, WhenFull::DropOldest).expect("open");
        spool.max_bytes = 1000;
        for i in 0..4 {
            spool.append(&[msg(i)]).expect("append");
        }
        assert_eq!(spool.dropped, 0, "the test wants room for four");
        let run = spool.peek(3).expect("peek");
        assert_eq!(topics(&run), ["t/0", "t/1", "t/2"]);
        spool.replaying(Some(run.end));
        for i in 4..12 {
            spool.append(&[msg(i)]).expect("append");
        }
        spool.commit(run.end, 3).expect("commit");
        let left = spool.peek(100).expect("peek");
        let left = topics(&left);
        assert_eq!(left.last().map(String::as_str), Some("t/11"));
        // 12 appended: 3 delivered, the rest kept or counted dropped.
        assert_eq!(left.len() as u64, spool.count());
        assert_eq!(3 + spool.count() + spool.dropped, 12, "{left:?}");
        assert!(!left.contains(&"t/0".to_string()), "{left:?}");
    }
}
