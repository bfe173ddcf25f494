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
    /// Why the record's payload is left out, when it is.
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_omitted: Option<String>,
}

/// The record a dead-letter sink writes: its payload is one JSON object with
/// the pipeline, the stage, the reason and the record itself.
pub fn to_record(pipeline: &str, dead: &DeadLetter, now_ms: i64) -> Record {
    let record = if dead.record.headers.iter().any(|(name, _)| is_secret(name)) {
        record_json(&redacted(dead.record.clone()))
    } else {
        record_json(&dead.record)
    };
    entry_record(pipeline, dead, now_ms, record, None)
}

/// Headers that carry credentials (an HTTP request's, or an MQTT user
/// property named like one): dead letters go to logs and topics that more
/// people read than the stage's inputs.
const SECRET_HEADERS: [&str; 6] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "set-cookie",
    "x-api-key",
    "x-amz-security-token",
];

/// What a dead letter shows instead of a credential.
pub const REDACTED: &str = "(redacted)";

fn is_secret(header: &str) -> bool {
    SECRET_HEADERS
        .iter()
        .any(|secret| header.eq_ignore_ascii_case(secret))
}

fn redacted(mut record: Record) -> Record {
    for (name, value) in &mut record.headers {
        if is_secret(name) {
            *value = REDACTED.into();
        }
    }
    record
}

/// [`to_record`] with the record's payload left out and the reason why, for
/// a dead-letter sink that refused the whole entry (an MQTT connection's
/// packet limit): the stage, the reason, key, topic and headers still get
/// there.
pub fn to_record_without_payload(
    pipeline: &str,
    dead: &DeadLetter,
    now_ms: i64,
    refusal: &str,
) -> Record {
    let mut record = redacted(dead.record.clone());
    let bytes = std::mem::take(&mut record.payload).len();
    let why = format!("{bytes} bytes; the dead-letter sink refused the whole entry: {refusal}");
    entry_record(pipeline, dead, now_ms, record_json(&record), Some(why))
}

fn entry_record(
    pipeline: &str,
    dead: &DeadLetter,
    now_ms: i64,
    record: Box<RawValue>,
    payload_omitted: Option<String>,
) -> Record {
    let entry = Entry {
        pipeline,
        stage: &dead.stage,
        reason: &dead.reason,
        at: now_ms,
        record,
        payload_omitted,
    };
    let payload = serde_json::to_vec(&entry).unwrap_or_else(|_| b"{}".to_vec());
    let mut record = Record::new(payload);
    // Key and topic as the record's, for an MQTT dead-letter topic's
    // `{key}` and `{topic}`.
    record.key = dead.record.key.clone();
    record.topic = dead.record.topic.clone();
    record.timestamp = Some(now_ms);
    record
        .headers
        .push(("runnel-dead-letter-stage".into(), dead.stage.clone()));
    record
}

/// How many dead letters the log shows one by one in a window; past that it
/// counts them, and says how many it left out when the window ends. A
/// source of bad records would otherwise fill the journal with what the
/// dead letter holds anyway.
const LOG_BURST: u32 = 100;
const LOG_WINDOW: std::time::Duration = std::time::Duration::from_secs(10);

/// The log's view of the dead letters: each one, up to a budget.
pub struct DeadLetterLog {
    window_start: std::time::Instant,
    logged: u32,
    left_out: u64,
}

impl Default for DeadLetterLog {
    fn default() -> Self {
        DeadLetterLog {
            window_start: std::time::Instant::now(),
            logged: 0,
            left_out: 0,
        }
    }
}

impl DeadLetterLog {
    /// Logs as many of `dead_letters` as the budget allows, from the
    /// first; returns how many.
    pub fn log(&mut self, dead_letters: &[DeadLetter]) -> usize {
        if self.window_start.elapsed() >= LOG_WINDOW {
            self.end_window();
        }
        let room = LOG_BURST.saturating_sub(self.logged) as usize;
        let shown = dead_letters.len().min(room);
        dead_letters[..shown].iter().for_each(log_one);
        self.logged += shown as u32;
        self.left_out += (dead_letters.len() - shown) as u64;
        shown
    }

    /// Says how many dead letters were not logged one by one, if any.
    pub fn end_window(&mut self) {
        if self.left_out > 0 {
            tracing::warn!(
                not_logged = self.left_out,
                "more dead letters than the log shows one by one ({LOG_BURST} in {} s); \
                 the dead letter holds them all",
                LOG_WINDOW.as_secs()
            );
        }
        self.window_start = std::time::Instant::now();
        self.logged = 0;
        self.left_out = 0;
    }
}

/// Logs one dead letter, with the record's key and topic when it has them.
pub fn log_one(dead: &DeadLetter) {
    let record = &dead.record;
    tracing::warn!(
        stage = %dead.stage,
        key = record.key.as_deref().map(display),
        topic = record.topic.as_deref().map(display),
        reason = %dead.reason,
        "dead letter"
    );
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
            fault: false,
        };
        let record = to_record("sensors", &dead, 7);
        let json: serde_json::Value = serde_json::from_slice(&record.payload).expect("json");
        assert_eq!(json["pipeline"], "sensors");
        assert_eq!(json["stage"], "validate");
        assert_eq!(json["reason"], "dev-3: temperature 900 above maximum 125");
        assert_eq!(json["record"]["payload"]["t"], 900);
        assert_eq!(json["at"], 7);
        assert!(json.get("payload_omitted").is_none());
        let mut from_topic = dead.clone();
        from_topic.record.topic = Some("sensors/dev-3/telemetry".into());
        from_topic.record.key = Some("dev-3".into());
        let entry = to_record("sensors", &from_topic, 7);
        assert_eq!(entry.topic.as_deref(), Some("sensors/dev-3/telemetry"));
        assert_eq!(entry.key.as_deref(), Some("dev-3"));

        let mut request = dead.clone();
        request.record.headers = vec![
            ("Authorization".into(), "Bearer eyJsecret".into()),
            ("cookie".into(), "session=s3cret".into()),
            ("x-tenant".into(), "t1".into()),
        ];
        for record in [
            to_record("api", &request, 7),
            to_record_without_payload("api", &request, 7, "too big"),
        ] {
            let text = String::from_utf8(record.payload).expect("utf-8");
            assert!(!text.contains("s3cret") && !text.contains("eyJ"), "{text}");
            let json: serde_json::Value = serde_json::from_str(&text).expect("json");
            assert_eq!(json["record"]["headers"]["Authorization"], REDACTED);
            assert_eq!(json["record"]["headers"]["x-tenant"], "t1");
        }

        let trimmed = to_record_without_payload("sensors", &dead, 7, "over max_packet_kb");
        let json: serde_json::Value = serde_json::from_slice(&trimmed.payload).expect("json");
        assert_eq!(json["stage"], "validate");
        assert_eq!(json["record"]["text"], "");
        assert_eq!(
            json["payload_omitted"],
            "9 bytes; the dead-letter sink refused the whole entry: over max_packet_kb"
        );
    }
}
