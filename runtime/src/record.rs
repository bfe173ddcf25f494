//! The record as the host holds it, and its crossing into and out of a stage.

use runnel_wire::{put_record, put_u32, OutcomeHead, Reader, RecordRef, WireError, MIN_RECORD};

/// One message: payload bytes plus key, topic, timestamp and headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Record {
    pub payload: Vec<u8>,
    /// A partition key such as a device id. Order is kept per key.
    pub key: Option<String>,
    /// MQTT topic in; on output, the topic a sink publishes to.
    pub topic: Option<String>,
    /// Event time in milliseconds since the Unix epoch, where known.
    pub timestamp: Option<i64>,
    /// String pairs: MQTT 5 user properties, SQS message attributes.
    pub headers: Vec<(String, String)>,
}

impl Record {
    /// A record with this payload and nothing else set.
    pub fn new(payload: impl Into<Vec<u8>>) -> Self {
        Record {
            payload: payload.into(),
            ..Record::default()
        }
    }

    fn from_wire(r: RecordRef<'_>) -> Self {
        Record {
            payload: r.payload.to_vec(),
            key: r.key.map(str::to_string),
            topic: r.topic.map(str::to_string),
            timestamp: r.timestamp,
            headers: r
                .headers
                .into_iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }
}

/// What a stage made of one input record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Zero or more records go on; zero means filtered out.
    Emit(Vec<Record>),
    /// To the dead letter, with this reason.
    Reject(String),
}

/// A batch as the stage reads it.
pub(crate) fn encode_batch(records: &[Record], out: &mut Vec<u8>) {
    out.clear();
    put_u32(out, records.len() as u32);
    for r in records {
        put_record(
            out,
            &r.payload,
            r.key.as_deref(),
            r.topic.as_deref(),
            r.timestamp,
            r.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        );
    }
}

pub(crate) fn decode_outcomes(buf: &[u8]) -> Result<Vec<Outcome>, WireError> {
    let mut reader = Reader::new(buf);
    let n = reader.count(5)?;
    let mut outcomes = Vec::with_capacity(n);
    for _ in 0..n {
        outcomes.push(match reader.outcome()? {
            OutcomeHead::Emit(count) => {
                let mut records = Vec::with_capacity(count.min(1024) as usize);
                for _ in 0..count {
                    records.push(Record::from_wire(reader.record()?));
                }
                Outcome::Emit(records)
            }
            OutcomeHead::Reject(reason) => Outcome::Reject(reason.to_string()),
        });
    }
    finish(&reader)?;
    Ok(outcomes)
}

pub(crate) fn decode_records(buf: &[u8]) -> Result<Vec<Record>, WireError> {
    let mut reader = Reader::new(buf);
    let n = reader.count(MIN_RECORD)?;
    let mut records = Vec::with_capacity(n);
    for _ in 0..n {
        records.push(Record::from_wire(reader.record()?));
    }
    finish(&reader)?;
    Ok(records)
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
