//! How batches cross between the host and a stage: one byte buffer each way
//! instead of a canonical-ABI list of records. Every string or list the
//! canonical ABI lowers costs a call into the guest's allocator; a packed
//! buffer costs one, whatever the batch holds.
//!
//! All integers are little-endian. A string is `u32` length then UTF-8.
//!
//! - record: `u8` flags (1 key, 2 topic, 4 timestamp), `u32` payload length,
//!   payload, then key, topic (strings) and timestamp (`i64`) where flagged,
//!   then `u32` header count and name/value string pairs.
//! - batch (host to stage): `u32` count, then that many records.
//! - outcomes (stage to host): `u32` count, then per input either `u8` 0,
//!   `u32` n and n records (emitted), or `u8` 1 and a string (rejected).
//! - records (a flush's output): `u32` count, then that many records.

const KEY: u8 = 1;
const TOPIC: u8 = 2;
const TIMESTAMP: u8 = 4;
const EMIT: u8 = 0;
const REJECT: u8 = 1;

/// Appends a `u32`.
pub fn put_u32(out: &mut Vec<u8>, n: u32) {
    out.extend_from_slice(&n.to_le_bytes());
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    put_u32(out, len32(s.len()));
    out.extend_from_slice(s.as_bytes());
}

// Batches are far below 4 GiB (the host caps memory per instance); saturate
// rather than wrap so a reader fails on a short buffer instead of misreading.
fn len32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Appends one record.
pub fn put_record<'a>(
    out: &mut Vec<u8>,
    payload: &[u8],
    key: Option<&str>,
    topic: Option<&str>,
    timestamp: Option<i64>,
    headers: impl ExactSizeIterator<Item = (&'a str, &'a str)>,
) {
    let written: Result<(), std::convert::Infallible> = put_record_with(
        out,
        |out| {
            out.extend_from_slice(payload);
            Ok(())
        },
        key,
        topic,
        timestamp,
        headers,
    );
    let Ok(()) = written;
}

/// Appends one record whose payload `write_payload` appends, so a payload
/// built for the record (JSON) needs no buffer of its own. On an error from
/// `write_payload`, `out` holds a partial record: the caller truncates it.
pub fn put_record_with<'a, E>(
    out: &mut Vec<u8>,
    write_payload: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    key: Option<&str>,
    topic: Option<&str>,
    timestamp: Option<i64>,
    headers: impl ExactSizeIterator<Item = (&'a str, &'a str)>,
) -> Result<(), E> {
    let flags =
        key.map_or(0, |_| KEY) | topic.map_or(0, |_| TOPIC) | timestamp.map_or(0, |_| TIMESTAMP);
    out.push(flags);
    let len_at = out.len();
    put_u32(out, 0);
    write_payload(out)?;
    let len = len32(out.len() - len_at - 4);
    out[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
    if let Some(key) = key {
        put_str(out, key);
    }
    if let Some(topic) = topic {
        put_str(out, topic);
    }
    if let Some(ts) = timestamp {
        out.extend_from_slice(&ts.to_le_bytes());
    }
    put_u32(out, len32(headers.len()));
    for (name, value) in headers {
        put_str(out, name);
        put_str(out, value);
    }
    Ok(())
}

/// Starts an emitted outcome of `n` records; the records follow.
pub fn put_emit(out: &mut Vec<u8>, n: usize) {
    out.push(EMIT);
    put_u32(out, len32(n));
}

/// Appends a rejected outcome.
pub fn put_reject(out: &mut Vec<u8>, reason: &str) {
    out.push(REJECT);
    put_str(out, reason);
}

/// A record read in place from a buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub payload: &'a [u8],
    pub key: Option<&'a str>,
    pub topic: Option<&'a str>,
    pub timestamp: Option<i64>,
    pub headers: Headers<'a>,
}

/// A record's headers, read in place as name/value pairs. They were checked
/// when the record was read, so reading them takes no allocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Headers<'a> {
    bytes: &'a [u8],
    count: usize,
}

impl<'a> Iterator for Headers<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        if self.count == 0 {
            return None;
        }
        let mut reader = Reader::new(self.bytes);
        let pair = (reader.str().ok()?, reader.str().ok()?);
        self.bytes = &self.bytes[reader.pos..];
        self.count -= 1;
        Some(pair)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.count, Some(self.count))
    }
}

impl ExactSizeIterator for Headers<'_> {}

/// One input's outcome, read in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutcomeHead<'a> {
    /// This many records follow.
    Emit(u32),
    Reject(&'a str),
}

/// Why a buffer could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError {
    pub at: usize,
    pub what: &'static str,
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad record encoding at byte {}: {}", self.at, self.what)
    }
}

impl std::error::Error for WireError {}

/// Reads records and outcomes from a buffer, front to back.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// How far the reader is into the buffer.
    pub fn pos(&self) -> usize {
        self.pos
    }

    /// Whether everything was read.
    pub fn is_done(&self) -> bool {
        self.pos == self.buf.len()
    }

    fn fail<T>(&self, what: &'static str) -> Result<T, WireError> {
        Err(WireError { at: self.pos, what })
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        match self.buf.get(self.pos..self.pos.saturating_add(n)) {
            Some(bytes) => {
                self.pos += n;
                Ok(bytes)
            }
            None => self.fail("the buffer ends early"),
        }
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    pub fn u32(&mut self) -> Result<u32, WireError> {
        let bytes = self.take(4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    fn i64(&mut self) -> Result<i64, WireError> {
        let bytes = self.take(8)?;
        let mut raw = [0u8; 8];
        raw.copy_from_slice(bytes);
        Ok(i64::from_le_bytes(raw))
    }

    fn str(&mut self) -> Result<&'a str, WireError> {
        let len = self.u32()? as usize;
        let at = self.pos;
        let bytes = self.take(len)?;
        std::str::from_utf8(bytes).map_err(|_| WireError {
            at,
            what: "a string is not UTF-8",
        })
    }

    /// A count that must fit in what is left, at `min_each` bytes per item,
    /// so a corrupt count cannot make the reader reserve gigabytes.
    pub fn count(&mut self, min_each: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_each) > self.buf.len() - self.pos {
            return self.fail("a count is larger than the buffer");
        }
        Ok(n)
    }

    pub fn record(&mut self) -> Result<RecordRef<'a>, WireError> {
        let flags = self.u8()?;
        if flags & !(KEY | TOPIC | TIMESTAMP) != 0 {
            return self.fail("unknown record flags");
        }
        let len = self.u32()? as usize;
        let payload = self.take(len)?;
        let key = if flags & KEY != 0 {
            Some(self.str()?)
        } else {
            None
        };
        let topic = if flags & TOPIC != 0 {
            Some(self.str()?)
        } else {
            None
        };
        let timestamp = if flags & TIMESTAMP != 0 {
            Some(self.i64()?)
        } else {
            None
        };
        let n = self.count(8)?;
        let start = self.pos;
        for _ in 0..n {
            self.str()?;
            self.str()?;
        }
        Ok(RecordRef {
            payload,
            key,
            topic,
            timestamp,
            headers: Headers {
                bytes: &self.buf[start..self.pos],
                count: n,
            },
        })
    }

    pub fn outcome(&mut self) -> Result<OutcomeHead<'a>, WireError> {
        match self.u8()? {
            EMIT => Ok(OutcomeHead::Emit(self.u32()?)),
            REJECT => Ok(OutcomeHead::Reject(self.str()?)),
            _ => self.fail("unknown outcome tag"),
        }
    }
}

/// Smallest encoded record: flags, payload length, header count.
pub const MIN_RECORD: usize = 9;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_and_outcomes_read_back() {
        let mut buf = Vec::new();
        put_u32(&mut buf, 2);
        put_emit(&mut buf, 1);
        let headers = [("unit", "C")];
        put_record(
            &mut buf,
            b"{\"t\":1}",
            Some("d1"),
            None,
            Some(-5),
            headers.iter().copied(),
        );
        put_reject(&mut buf, "too hot");

        let mut r = Reader::new(&buf);
        assert_eq!(r.count(1), Ok(2));
        assert_eq!(r.outcome(), Ok(OutcomeHead::Emit(1)));
        let rec = r.record().expect("record");
        assert_eq!(rec.payload, b"{\"t\":1}");
        assert_eq!(rec.key, Some("d1"));
        assert_eq!(rec.topic, None);
        assert_eq!(rec.timestamp, Some(-5));
        assert_eq!(rec.headers.len(), 1);
        assert_eq!(rec.headers.collect::<Vec<_>>(), vec![("unit", "C")]);
        assert_eq!(r.outcome(), Ok(OutcomeHead::Reject("too hot")));
        assert!(r.is_done());
    }

    #[test]
    fn corrupt_buffers_fail_instead_of_misreading() {
        let mut buf = Vec::new();
        put_record(&mut buf, b"abc", Some("k"), None, None, std::iter::empty());
        for cut in 0..buf.len() {
            assert!(Reader::new(&buf[..cut]).record().is_err(), "cut at {cut}");
        }
        let huge_count = [0xff, 0xff, 0xff, 0xff];
        assert_eq!(
            Reader::new(&huge_count).count(1).map_err(|e| e.what),
            Err("a count is larger than the buffer")
        );
        assert!(
            Reader::new(&[9, 0, 0, 0, 0]).record().is_err(),
            "unknown flags"
        );
    }
}
