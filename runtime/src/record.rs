//! The record as the host holds it, and its crossing into and out of a stage.

use std::ops::Range;

use runnel_wire::{put_u32, OutcomeHead, Reader, WireError, MIN_RECORD};

/// One message: payload bytes plus key, topic, timestamp and headers. The
/// host holds the very type stages are written against.
pub use runnel_sdk::Record;

/// What a stage made of one input record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Zero or more records go on; zero means filtered out.
    Emit(Vec<Record>),
    /// To the dead letter, with this reason.
    Reject(String),
}

/// Records in their encoded form, as they pass from stage to stage: the host
/// copies byte ranges rather than building and re-encoding each record.
#[derive(Debug, Default)]
pub(crate) struct Encoded {
    /// A batch as a stage reads it: count, then the records.
    pub buf: Vec<u8>,
    /// Where each record sits in `buf`.
    pub ranges: Vec<Range<usize>>,
    /// The input each record came from; `None` for timer output.
    pub origins: Vec<Option<usize>>,
}

impl Encoded {
    pub fn with_capacity(bytes: usize, records: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes + 4);
        put_u32(&mut buf, 0);
        Encoded {
            buf,
            ranges: Vec::with_capacity(records),
            origins: Vec::with_capacity(records),
        }
    }

    /// Encodes records, each its own origin.
    pub fn from_records(records: &[Record], origins: impl Iterator<Item = Option<usize>>) -> Self {
        let bytes = records.iter().map(|r| r.payload.len() + 32).sum();
        let mut encoded = Encoded::with_capacity(bytes, records.len());
        for (r, origin) in records.iter().zip(origins) {
            let start = encoded.buf.len();
            r.encode(&mut encoded.buf);
            encoded.ranges.push(start..encoded.buf.len());
            encoded.origins.push(origin);
        }
        encoded.seal();
        encoded
    }

    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Appends a record already encoded in `from`.
    pub fn push_raw(&mut self, from: &[u8], origin: Option<usize>) {
        let start = self.buf.len();
        self.buf.extend_from_slice(from);
        self.ranges.push(start..self.buf.len());
        self.origins.push(origin);
    }

    /// Drops every record pushed after the first `len`.
    pub fn truncate(&mut self, len: usize) {
        if let Some(range) = self.ranges.get(len) {
            self.buf.truncate(range.start);
        }
        self.ranges.truncate(len);
        self.origins.truncate(len);
    }

    /// Writes the count in front; call after the last push.
    pub fn seal(&mut self) {
        let n = (self.ranges.len() as u32).to_le_bytes();
        self.buf[..4].copy_from_slice(&n);
    }

    /// Record `i` as an owned record.
    pub fn record(&self, i: usize) -> Record {
        // Every range was checked when it was added.
        read_checked(&self.buf[self.ranges[i].clone()])
    }

    /// Record `i` alone, as a batch of one.
    pub fn single(&self, i: usize) -> Encoded {
        let mut one = Encoded::with_capacity(self.ranges[i].len(), 1);
        one.push_raw(&self.buf[self.ranges[i].clone()], self.origins[i]);
        one.seal();
        one
    }

    /// The records in runs of consecutive ones, at most `max_records` of
    /// them whose bytes add up to at most `max_bytes`, each run at least one
    /// record; the batch itself when it fits.
    pub fn split(self, max_bytes: usize, max_records: usize) -> Vec<Encoded> {
        if self.buf.len() <= max_bytes && self.len() <= max_records {
            return vec![self];
        }
        let mut parts = Vec::new();
        let mut part = Encoded::with_capacity(max_bytes.min(self.buf.len()), 0);
        for i in 0..self.len() {
            let range = self.ranges[i].clone();
            let full = part.buf.len() + range.len() > max_bytes || part.len() >= max_records;
            if !part.is_empty() && full {
                part.seal();
                parts.push(std::mem::replace(
                    &mut part,
                    Encoded::with_capacity(max_bytes.min(self.buf.len()), 0),
                ));
            }
            part.push_raw(&self.buf[range], self.origins[i]);
        }
        part.seal();
        parts.push(part);
        parts
    }

    /// Every record, owned, with its origin.
    pub fn into_records(self) -> Vec<(Option<usize>, Record)> {
        (0..self.len())
            .map(|i| (self.origins[i], self.record(i)))
            .collect()
    }

    /// Reads records a flush returned (count, then records), checking each.
    pub fn parse_records(buf: Vec<u8>) -> Result<Self, WireError> {
        let mut reader = Reader::new(&buf);
        let n = reader.count(MIN_RECORD)?;
        let mut ranges = Vec::with_capacity(n);
        for _ in 0..n {
            let start = reader.pos();
            reader.record()?;
            ranges.push(start..reader.pos());
        }
        finish(&reader)?;
        Ok(Encoded {
            origins: vec![None; n],
            ranges,
            buf,
        })
    }
}

/// A piece of a stage's answer, still encoded in it.
pub(crate) enum Part<'a> {
    /// Input `i` emitted this many records; they follow as `Output`s.
    Emit(u32),
    Output(&'a [u8]),
    Reject(&'a str),
}

/// Reads a stage's answer front to back, calling `each(input, part)` for
/// every piece, every output checked; returns how many outcomes it held.
/// On an error `each` may have seen a prefix of the answer.
pub(crate) fn read_outcomes<'a>(
    buf: &'a [u8],
    mut each: impl FnMut(usize, Part<'a>),
) -> Result<usize, WireError> {
    let mut reader = Reader::new(buf);
    let n = reader.count(5)?;
    for i in 0..n {
        match reader.outcome()? {
            OutcomeHead::Emit(count) => {
                each(i, Part::Emit(count));
                for _ in 0..count {
                    let start = reader.pos();
                    reader.record()?;
                    each(i, Part::Output(&buf[start..reader.pos()]));
                }
            }
            OutcomeHead::Reject(reason) => each(i, Part::Reject(reason)),
        }
    }
    finish(&reader)?;
    Ok(n)
}

/// A batch as the stage reads it.
pub(crate) fn encode_batch(records: &[Record], out: &mut Vec<u8>) {
    out.clear();
    put_u32(out, records.len() as u32);
    for r in records {
        r.encode(out);
    }
}

/// A stage's answer as owned records, for callers outside the chain.
pub(crate) fn decode_outcomes(buf: &[u8]) -> Result<Vec<Outcome>, WireError> {
    let mut outcomes = Vec::new();
    read_outcomes(buf, |_, part| match part {
        Part::Emit(count) => {
            outcomes.push(Outcome::Emit(Vec::with_capacity(count.min(1024) as usize)))
        }
        Part::Output(bytes) => {
            if let Some(Outcome::Emit(outputs)) = outcomes.last_mut() {
                outputs.push(read_checked(bytes));
            }
        }
        Part::Reject(reason) => outcomes.push(Outcome::Reject(reason.to_string())),
    })?;
    Ok(outcomes)
}

/// A flush's records, owned.
pub(crate) fn decode_records(buf: &[u8]) -> Result<Vec<Record>, WireError> {
    let encoded = Encoded::parse_records(buf.to_vec())?;
    Ok(encoded.into_records().into_iter().map(|(_, r)| r).collect())
}

/// A record from bytes a parser above has already checked.
fn read_checked(bytes: &[u8]) -> Record {
    Reader::new(bytes)
        .record()
        .map(Record::from_wire)
        .unwrap_or_default()
}

fn finish(reader: &Reader<'_>) -> Result<(), WireError> {
    if reader.is_done() {
        Ok(())
    } else {
        Err(WireError {
            at: 0,
            what: "bytes left over after the last item",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use runnel_wire::{put_emit, put_reject};

    #[test]
    fn a_batch_splits_into_runs_that_fit_keeping_order_and_origins() {
        let records: Vec<Record> = ["a".repeat(40), "b".repeat(40), "c".repeat(200), "d".into()]
            .into_iter()
            .map(Record::new)
            .collect();
        let batch = Encoded::from_records(&records, (0..4).map(Some));
        let whole = batch.buf.len();
        let parts = Encoded::from_records(&records, (0..4).map(Some)).split(120, 64);
        let shapes: Vec<Vec<Option<usize>>> = parts.iter().map(|p| p.origins.clone()).collect();
        // The long one goes alone, over the limit, rather than not at all.
        assert_eq!(
            shapes,
            [vec![Some(0), Some(1)], vec![Some(2)], vec![Some(3)]]
        );
        let again: Vec<Record> = parts
            .into_iter()
            .flat_map(|p| p.into_records())
            .map(|(_, r)| r)
            .collect();
        assert_eq!(again, records);
        let by_count: Vec<Vec<Option<usize>>> = Encoded::from_records(&records, (0..4).map(Some))
            .split(whole, 3)
            .iter()
            .map(|p| p.origins.clone())
            .collect();
        assert_eq!(by_count, [vec![Some(0), Some(1), Some(2)], vec![Some(3)]]);
        assert_eq!(batch.split(whole, 4).len(), 1);
    }

    fn answer() -> Vec<u8> {
        let mut buf = Vec::new();
        put_u32(&mut buf, 3);
        put_emit(&mut buf, 2);
        Record::new("a").with_key("k").encode(&mut buf);
        Record::new("b").with_header("h", "v").encode(&mut buf);
        put_reject(&mut buf, "too hot");
        put_emit(&mut buf, 0);
        buf
    }

    #[test]
    fn an_answer_reads_back_as_one_outcome_per_input() {
        let outcomes = decode_outcomes(&answer()).expect("answer");
        assert_eq!(
            outcomes,
            vec![
                Outcome::Emit(vec![
                    Record::new("a").with_key("k"),
                    Record::new("b").with_header("h", "v")
                ]),
                Outcome::Reject("too hot".into()),
                Outcome::Emit(vec![]),
            ]
        );
    }

    #[test]
    fn a_cut_answer_is_an_error_wherever_it_is_cut() {
        let buf = answer();
        for cut in 0..buf.len() {
            assert!(decode_outcomes(&buf[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = buf.clone();
        longer.push(0);
        assert!(decode_outcomes(&longer).is_err(), "a byte left over");
    }

    #[test]
    fn truncate_drops_the_records_pushed_after_a_mark() {
        let records = [Record::new("one"), Record::new("two")];
        let mut encoded = Encoded::from_records(&records, [Some(0), Some(1)].into_iter());
        let kept = encoded.len();
        let bytes = encoded.buf.len();
        encoded.push_raw(&encoded.buf.clone()[encoded.ranges[0].clone()], Some(2));
        encoded.truncate(kept);
        encoded.seal();
        assert_eq!(encoded.buf.len(), bytes);
        let back: Vec<_> = encoded.into_records();
        assert_eq!(
            back,
            vec![(Some(0), records[0].clone()), (Some(1), records[1].clone())]
        );
    }
}
