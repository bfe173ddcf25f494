//! The glue between the WIT world and [`Stage`]; used by `export_stage!`
//! and not meant to be called by hand.

use std::cell::RefCell;

use runnel_wire::{put_emit, put_record_with, put_reject, put_u32, Reader, MIN_RECORD};
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use runnel_wire::RecordRef;

use crate::{parse_config, Error, Record, Stage};

#[cfg(target_family = "wasm")]
pub mod bindings {
    wit_bindgen::generate!({
        world: "stage",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "export_world",
        default_bindings_module: "runnel_sdk::__private::bindings",
    });
}

/// Marks panic messages so the host can name them in the dead letter: with
/// `panic = "abort"` the trap itself says only "unreachable".
pub const PANIC_PREFIX: &str = "panicked at ";

fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_else(|| "unknown place".to_string());
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".to_string());
        crate::log::log(
            crate::log::Level::Error,
            &format!("{PANIC_PREFIX}{location}: {payload}"),
        );
    }));
}

const NOT_STARTED: &str = "stage called before init";

pub fn init<S: Stage>(slot: &RefCell<Option<S>>, config: String) -> Result<(), String> {
    install_panic_hook();
    let config = parse_config::<S::Config>(&config).map_err(|e| e.to_string())?;
    let stage = S::init(config).map_err(|e| e.to_string())?;
    *slot.borrow_mut() = Some(stage);
    Ok(())
}

/// Runs an encoded batch and encodes one outcome per input.
pub fn process<S: Stage>(slot: &RefCell<Option<S>>, batch: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(batch.len() + 64);
    let mut slot = slot.borrow_mut();
    match slot.as_mut() {
        Some(stage) => stage.process_encoded(batch, &mut out),
        None => {
            let n = Reader::new(batch).count(MIN_RECORD).unwrap_or(0);
            put_u32(&mut out, n as u32);
            for _ in 0..n {
                put_reject(&mut out, NOT_STARTED);
            }
        }
    }
    out
}

/// [`Stage::process_encoded`] for any stage: the batch decoded into owned
/// records, [`Stage::process_batch`], and its outcomes encoded.
pub fn process_owned<S: Stage>(stage: &mut S, batch: &[u8], out: &mut Vec<u8>) {
    let Ok(records) = decode_records(batch) else {
        // Only a host bug gets here; an empty answer makes the host say so.
        return;
    };
    // The count written is what the stage returned, so a `process_batch`
    // that miscounts gets the host's "N outcomes for M records", not a
    // garbled buffer.
    let outcomes = stage.process_batch(records);
    put_u32(out, outcomes.len() as u32);
    for outcome in outcomes {
        match outcome {
            Ok(outputs) => emit_records(out, &outputs),
            Err(err) => reject(out, &err),
        }
    }
}

/// Runs `each` on every record of an encoded batch, read in place: the
/// function forms with a JSON input parse its payload straight from the
/// batch and copy its metadata as bytes, with no owned record in between.
/// `each` gets the record and its encoded bytes, and writes one outcome.
pub fn each_in_place(
    batch: &[u8],
    out: &mut Vec<u8>,
    mut each: impl FnMut(&RecordRef<'_>, &[u8], &mut Vec<u8>),
) {
    let mut reader = Reader::new(batch);
    let Ok(n) = reader.count(MIN_RECORD) else {
        return;
    };
    put_u32(out, n as u32);
    for _ in 0..n {
        let start = reader.pos();
        let Ok(record) = reader.record() else {
            // As in `process_owned`: the host says what an empty answer means.
            out.clear();
            return;
        };
        each(&record, &batch[start..reader.pos()], out);
    }
}

/// The payload of a record read in place, as JSON; the error reads as
/// [`Record::json`]'s does.
pub fn parse_json<T: DeserializeOwned>(record: &RecordRef<'_>) -> Result<T, Error> {
    crate::record::json_from(record.payload)
}

/// An outcome of one record per value: the value as JSON with `input`'s key,
/// topic, timestamp and headers. A value that cannot be written as JSON
/// rejects the input instead.
pub fn emit_json<'v, T: Serialize + 'v>(
    out: &mut Vec<u8>,
    input: &RecordRef<'_>,
    values: impl ExactSizeIterator<Item = &'v T>,
) {
    let start = out.len();
    put_emit(out, values.len());
    for value in values {
        let written = put_record_with(
            out,
            |payload| serde_json::to_writer(payload, value),
            input.key,
            input.topic,
            input.timestamp,
            input.headers.clone(),
        );
        if let Err(err) = written {
            out.truncate(start);
            put_reject(out, crate::record::json_write_error(err).message());
            return;
        }
    }
}

/// An outcome of these whole records.
pub fn emit_records(out: &mut Vec<u8>, records: &[Record]) {
    put_emit(out, records.len());
    for record in records {
        record.encode(out);
    }
}

/// An outcome of the input itself, unchanged: its bytes as they came.
pub fn emit_input(out: &mut Vec<u8>, encoded: &[u8]) {
    put_emit(out, 1);
    out.extend_from_slice(encoded);
}

/// An outcome of no records: the input is filtered out.
pub fn emit_nothing(out: &mut Vec<u8>) {
    put_emit(out, 0);
}

/// An outcome that sends the input to the dead letter.
pub fn reject(out: &mut Vec<u8>, err: &Error) {
    put_reject(out, err.message());
}

pub fn flush<S: Stage>(
    slot: &RefCell<Option<S>>,
    now_ms: i64,
    end_of_input: bool,
) -> Result<Vec<u8>, String> {
    let mut slot = slot.borrow_mut();
    let stage = slot.as_mut().ok_or_else(|| NOT_STARTED.to_string())?;
    let records = stage
        .flush(now_ms, end_of_input)
        .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    put_u32(&mut out, records.len() as u32);
    for record in &records {
        record.encode(&mut out);
    }
    Ok(out)
}

fn decode_records(buf: &[u8]) -> Result<Vec<Record>, runnel_wire::WireError> {
    let mut reader = Reader::new(buf);
    let n = reader.count(MIN_RECORD)?;
    let mut records = Vec::with_capacity(n);
    for _ in 0..n {
        records.push(Record::from_wire(reader.record()?));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Upper;

    impl Stage for Upper {
        type Config = crate::NoConfig;
        fn init(_: crate::NoConfig) -> Result<Self, Error> {
            Ok(Upper)
        }
        fn process(&mut self, mut record: Record) -> Result<Vec<Record>, Error> {
            if record.payload.is_empty() {
                return Err(Error::msg("empty"));
            }
            record.payload.make_ascii_uppercase();
            Ok(vec![record])
        }
    }

    #[test]
    fn a_batch_round_trips_through_the_encoding() {
        let slot = RefCell::new(None);
        init::<Upper>(&slot, "{}".into()).expect("init");
        let mut batch = Vec::new();
        put_u32(&mut batch, 2);
        Record::new("abc")
            .with_key("k")
            .with_header("h", "v")
            .encode(&mut batch);
        Record::new("").encode(&mut batch);
        let out = process::<Upper>(&slot, &batch);
        let mut r = Reader::new(&out);
        assert_eq!(r.count(1), Ok(2));
        assert_eq!(r.outcome(), Ok(runnel_wire::OutcomeHead::Emit(1)));
        let rec = Record::from_wire(r.record().expect("record"));
        assert_eq!(rec, Record::new("ABC").with_key("k").with_header("h", "v"));
        assert_eq!(r.outcome(), Ok(runnel_wire::OutcomeHead::Reject("empty")));
        assert!(r.is_done());
    }
}
