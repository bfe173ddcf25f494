//! Dead-letter entries as records, so any sink can carry them.

use serde::Serialize;
use serde_json::value::RawValue;

use crate::chain::DeadLetter;
use crate::codec::record_json;
use crate::Record;

#[derive(Serialize)]
struct Entry<'a> {
    pipeline: &'a str,
    stage: &'a str,
    reason: &'a str,
    /// When it was dead-lettered, ms since the Unix epoch.
    at: i64,
    /// The record as it reached the stage, in the JSON-lines record format.
    record: Box<RawValue>,
}

/// The record a dead-letter sink writes: its payload is one JSON object with
/// the pipeline, the stage, the reason and the record itself.
pub fn to_record(pipeline: &str, dead: &DeadLetter, now_ms: i64) -> Record {
    let entry = Entry {
        pipeline,
        stage: &dead.stage,
        reason: &dead.reason,
        at: now_ms,
        record: record_json(&dead.record),
    };
    let payload = serde_json::to_vec(&entry).unwrap_or_else(|_| b"{}".to_vec());
    let mut record = Record::new(payload);
    record.key = dead.record.key.clone();
    record.timestamp = Some(now_ms);
    record
        .headers
        .push(("runnel-dead-letter-stage".into(), dead.stage.clone()));
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_pipeline_stage_reason_and_record() {
        let dead = DeadLetter {
            stage: "validate".into(),
            reason: "dev-3: temperature 900 above maximum 125".into(),
            record: Record::new(br#"{"t":900}"#.to_vec()),
            input: Some(0),
        };
        let record = to_record("sensors", &dead, 7);
        let json: serde_json::Value = serde_json::from_slice(&record.payload).expect("json");
        assert_eq!(json["pipeline"], "sensors");
        assert_eq!(json["stage"], "validate");
        assert_eq!(json["reason"], "dev-3: temperature 900 above maximum 125");
        assert_eq!(json["record"]["payload"]["t"], 900);
        assert_eq!(json["at"], 7);
    }
}
