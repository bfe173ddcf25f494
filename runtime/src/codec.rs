//! Records as JSON lines, the format of file and stdin sources and of file
//! and stdout sinks.
//!
//! A line is an object with the payload in one of three fields: `payload`
//! (any JSON value, kept as its JSON text), `text` (a string, kept as is) or
//! `base64` (bytes). `key`, `topic`, `timestamp` (ms) and `headers` (an
//! object of strings, or `[name, value]` pairs when a name repeats) are
//! optional. Output picks `payload` when the bytes
//! are JSON, `text` when they are UTF-8, else `base64`, so a sink's output
//! reads back as the same records.

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::Record;

/// How a line maps to a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LineFormat {
    /// The whole line is the payload.
    #[default]
    Payload,
    /// The line is a JSON record object, as above.
    Record,
}

/// What a record line is, for errors about one that is not.
const RECORD_OBJECT: &str = r#"a record object, such as {"payload": {...}, "key": "dev-1"}"#;

#[derive(Deserialize)]
#[serde(
    deny_unknown_fields,
    expecting = "a record object, such as {\"payload\": {...}, \"key\": \"dev-1\"}"
)]
struct LineIn<'a> {
    #[serde(borrow, default, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    text: Option<String>,
    base64: Option<String>,
    key: Option<String>,
    topic: Option<String>,
    timestamp: Option<i64>,
    #[serde(default, deserialize_with = "headers_in")]
    headers: Vec<(String, String)>,
}

/// Headers as an object (`{"site": "a"}`), or as `[name, value]` pairs,
/// which a sink writes when a name repeats. Every one is kept, in order.
fn headers_in<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
    struct Headers;
    impl<'de> serde::de::Visitor<'de> for Headers {
        type Value = Vec<(String, String)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("an object of strings, or a list of [name, value] pairs")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            let mut headers = Vec::new();
            while let Some(pair) = map.next_entry()? {
                headers.push(pair);
            }
            Ok(headers)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let mut headers = Vec::new();
            while let Some(pair) = seq.next_element()? {
                headers.push(pair);
            }
            Ok(headers)
        }
    }
    d.deserialize_any(Headers)
}

/// `payload: null` is the JSON value null, which a sink writes for a
/// payload of `null`; only a missing field is no payload.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(d).map(Some)
}

#[derive(Serialize)]
struct LineOut<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    topic: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    key: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<i64>,
    #[serde(skip_serializing_if = "Vec::is_empty", serialize_with = "as_map")]
    headers: &'a Vec<(String, String)>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    base64: Option<String>,
}

/// An object, unless a name repeats: JSON readers keep one value per name,
/// so then `[name, value]` pairs, which read back whole.
fn as_map<S: serde::Serializer>(headers: &&Vec<(String, String)>, s: S) -> Result<S::Ok, S::Error> {
    let mut names: Vec<&str> = headers.iter().map(|(k, _)| k.as_str()).collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        s.collect_seq(headers.iter().map(|(k, v)| [k, v]))
    } else {
        s.collect_map(headers.iter().map(|(k, v)| (k, v)))
    }
}

/// Reads one line of `format` into a record. The error says what is wrong
/// with the line; the caller adds where it is.
pub fn decode_line(line: &str, format: LineFormat) -> Result<Record, String> {
    match format {
        LineFormat::Payload => Ok(Record::new(line.as_bytes().to_vec())),
        LineFormat::Record => decode_record(line),
    }
}

fn decode_record(line: &str) -> Result<Record, String> {
    // serde would also fill the record from an array's elements in order.
    if !line.trim_start().starts_with('{') {
        return Err(format!("not a record object: expected {RECORD_OBJECT}"));
    }
    let parsed: LineIn<'_> =
        serde_json::from_str(line).map_err(|e| format!("not a record object: {e}"))?;
    let payload = match (parsed.payload, parsed.text, parsed.base64) {
        (Some(json), None, None) => json.get().as_bytes().to_vec(),
        (None, Some(text), None) => text.into_bytes(),
        (None, None, Some(b64)) => base64::engine::general_purpose::STANDARD
            .decode(b64.as_bytes())
            .map_err(|e| format!("field `base64` is not valid base64: {e}"))?,
        (None, None, None) => {
            return Err("no payload: give one of `payload`, `text` or `base64`".into())
        }
        _ => return Err("give only one of `payload`, `text` and `base64`".into()),
    };
    Ok(Record {
        payload,
        key: parsed.key,
        topic: parsed.topic,
        timestamp: parsed.timestamp,
        headers: parsed.headers,
    })
}

/// Writes a record as one line of `format`, without the newline.
pub fn encode_line(record: &Record, format: LineFormat, out: &mut Vec<u8>) {
    match format {
        LineFormat::Payload => out.extend_from_slice(&record.payload),
        LineFormat::Record => encode_record(record, out),
    }
}

fn encode_record(record: &Record, out: &mut Vec<u8>) {
    let text = std::str::from_utf8(&record.payload).ok();
    // Only a payload that is exactly one JSON text goes in `payload`; one with
    // whitespace around it goes in `text`, so it reads back byte for byte.
    let json: Option<&RawValue> = text
        .and_then(|t| serde_json::from_str::<&RawValue>(t).ok())
        .filter(|raw| text.is_some_and(|t| raw.get().len() == t.len()));
    let line = LineOut {
        topic: record.topic.as_deref(),
        key: record.key.as_deref(),
        timestamp: record.timestamp,
        headers: &record.headers,
        payload: json,
        text: if json.is_none() { text } else { None },
        base64: if text.is_none() {
            Some(base64::engine::general_purpose::STANDARD.encode(&record.payload))
        } else {
            None
        },
    };
    // Strings and numbers only: serialising cannot fail.
    if serde_json::to_writer(&mut *out, &line).is_err() {
        out.extend_from_slice(b"{}");
    }
}

/// A record as a JSON value, for dead-letter entries.
pub fn record_json(record: &Record) -> Box<RawValue> {
    let mut buf = Vec::new();
    encode_record(record, &mut buf);
    String::from_utf8(buf)
        .ok()
        .and_then(|s| RawValue::from_string(s).ok())
        .unwrap_or_else(|| RawValue::from_string("{}".into()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(record: &Record) -> Record {
        let mut line = Vec::new();
        encode_line(record, LineFormat::Record, &mut line);
        let text = String::from_utf8(line).expect("utf-8");
        decode_line(&text, LineFormat::Record).expect("reads back")
    }

    #[test]
    fn json_text_and_binary_payloads_read_back_the_same() {
        let mut json = Record::new(br#"{"t":1}"#.to_vec());
        json.key = Some("d1".into());
        json.headers = vec![("a".into(), "b".into())];
        assert_eq!(round_trip(&json), json);
        let text = Record::new(b"dev-1,5,20.5".to_vec());
        assert_eq!(round_trip(&text), text);
        let padded = Record::new(b" {\"t\":1}\n".to_vec());
        assert_eq!(round_trip(&padded), padded);
        let binary = Record::new(vec![0xff, 0x00, 0x10]);
        assert_eq!(round_trip(&binary), binary);
        let null = Record::new(b"null".to_vec());
        assert_eq!(round_trip(&null), null);
        let written = decode_line(r#"{"payload": null}"#, LineFormat::Record).expect("null");
        assert_eq!(written.payload, b"null");
    }

    #[test]
    fn record_lines_say_what_is_wrong() {
        let err = |line| decode_line(line, LineFormat::Record).expect_err("bad line");
        assert!(
            err("{").starts_with("not a record object: EOF"),
            "{}",
            err("{")
        );
        assert!(err(r#"{"paylod": 1}"#).contains("unknown field `paylod`"));
        assert_eq!(
            err(r#"{"key": "a"}"#),
            "no payload: give one of `payload`, `text` or `base64`"
        );
        assert_eq!(
            err(r#"{"payload": 1, "text": "x"}"#),
            "give only one of `payload`, `text` and `base64`"
        );
        assert!(err(r#"{"base64": "!!"}"#).starts_with("field `base64` is not valid base64"));
        for array in [
            r#"[{"a":1},null,null,null,null,null,{}]"#,
            r#"[1,"k","t",5]"#,
        ] {
            assert!(
                err(array).contains("expected a record object, such as"),
                "{array}: {}",
                err(array)
            );
        }
    }

    #[test]
    fn repeated_header_names_read_back_whole_and_in_order() {
        let mut record = Record::new(b"x".to_vec());
        record.headers = vec![
            ("a".into(), "1".into()),
            ("b".into(), "2".into()),
            ("a".into(), "3".into()),
        ];
        let mut line = Vec::new();
        encode_line(&record, LineFormat::Record, &mut line);
        assert!(
            String::from_utf8_lossy(&line).contains(r#""headers":[["a","1"],["b","2"],["a","3"]]"#),
            "{}",
            String::from_utf8_lossy(&line)
        );
        assert_eq!(round_trip(&record), record);
        let object = decode_line(
            r#"{"text":"x","headers":{"z":"1","a":"2"}}"#,
            LineFormat::Record,
        )
        .expect("object headers");
        assert_eq!(
            object.headers,
            [("z".to_string(), "1".to_string()), ("a".into(), "2".into())]
        );
    }

    #[test]
    fn a_line_that_is_no_object_says_what_a_record_is() {
        let err = decode_line(r#""just a string""#, LineFormat::Record).expect_err("a string");
        assert!(err.contains("expected a record object, such as"), "{err}");
        assert!(!err.contains("LineIn"), "{err}");
    }

    #[test]
    fn payload_lines_are_taken_as_they_are() {
        let record = decode_line("not json, fine", LineFormat::Payload).expect("any line");
        assert_eq!(record.payload, b"not json, fine");
    }
}
