use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::Error;

/// One message flowing through a pipeline.
///
/// Fields are public so a stage can move the payload out without a copy; the
/// helpers below cover the common cases of typed JSON payloads.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// The message body.
    pub payload: Vec<u8>,
    /// Partition key, such as a device id. Order is kept per key.
    pub key: Option<String>,
    /// MQTT topic in; on output, where a sink publishes the record.
    pub topic: Option<String>,
    /// Event time, milliseconds since the Unix epoch.
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

    /// A record whose payload is `value` as JSON.
    pub fn from_json<T: Serialize + ?Sized>(value: &T) -> Result<Self, Error> {
        Ok(Record::new(to_json(value)?))
    }

    /// Reads the payload as JSON into `T`.
    ///
    /// The error says what was wrong and where ("missing field `device` at
    /// line 1 column 20"), which is what a dead-letter reader needs.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        json_from(&self.payload)
    }

    /// Replaces the payload with `value` as JSON, keeping key, topic, timestamp and headers.
    pub fn set_json<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), Error> {
        self.payload = to_json(value)?;
        Ok(())
    }

    /// The payload as UTF-8 text.
    pub fn text(&self) -> Result<&str, Error> {
        std::str::from_utf8(&self.payload)
            .map_err(|err| Error::msg(format!("payload is not UTF-8 text: {err}")))
    }

    /// A copy of everything but the payload, for records derived from this one.
    pub fn meta(&self) -> Record {
        Record {
            payload: Vec::new(),
            key: self.key.clone(),
            topic: self.topic.clone(),
            timestamp: self.timestamp,
            headers: self.headers.clone(),
        }
    }

    /// The first header with this name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// Sets a header, replacing any with the same name.
    pub fn set_header(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let name = name.into();
        self.headers.retain(|(n, _)| *n != name);
        self.headers.push((name, value.into()));
    }

    /// Builder: sets the key.
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Builder: sets the topic.
    pub fn with_topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = Some(topic.into());
        self
    }

    /// Builder: sets the event time, in milliseconds since the Unix epoch.
    pub fn with_timestamp(mut self, timestamp: i64) -> Self {
        self.timestamp = Some(timestamp);
        self
    }

    /// Builder: sets a header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.set_header(name, value);
        self
    }
}

// The packed encoding batches cross in (see `runnel-wire`); shared with the
// host, which holds records of this same type.
impl Record {
    #[doc(hidden)]
    pub fn from_wire(r: runnel_wire::RecordRef<'_>) -> Self {
        Record {
            payload: r.payload.to_vec(),
            key: r.key.map(str::to_string),
            topic: r.topic.map(str::to_string),
            timestamp: r.timestamp,
            headers: r
                .headers
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[doc(hidden)]
    pub fn encode(&self, out: &mut Vec<u8>) {
        runnel_wire::put_record(
            out,
            &self.payload,
            self.key.as_deref(),
            self.topic.as_deref(),
            self.timestamp,
            self.headers.iter().map(|(n, v)| (n.as_str(), v.as_str())),
        );
    }
}

pub(crate) fn json_from<T: DeserializeOwned>(payload: &[u8]) -> Result<T, Error> {
    serde_json::from_slice(payload).map_err(|err| {
        Error::msg(format!(
            "payload is not a valid {}: {err}",
            short_type_name::<T>()
        ))
    })
}

fn to_json<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(value).map_err(json_write_error)
}

pub(crate) fn json_write_error(err: serde_json::Error) -> Error {
    Error::msg(format!("cannot write JSON: {err}"))
}

/// `Vec<Reading>` for `alloc::vec::Vec<my_stage::Reading>`: the type as
/// the stage's author wrote it, without module paths.
fn short_type_name<T: ?Sized>() -> String {
    let full = std::any::type_name::<T>();
    let mut short = String::with_capacity(full.len());
    let mut path = String::new();
    for c in full.chars().chain(std::iter::once('\0')) {
        if c.is_alphanumeric() || c == '_' || c == ':' {
            path.push(c);
            continue;
        }
        short.push_str(path.rsplit("::").next().unwrap_or(&path));
        path.clear();
        if c != '\0' {
            short.push(c);
        }
    }
    short
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, serde::Serialize, Debug, PartialEq)]
    struct Reading {
        device: String,
        value: f64,
    }

    #[test]
    fn type_names_in_errors_are_as_written() {
        assert_eq!(short_type_name::<Reading>(), "Reading");
        assert_eq!(short_type_name::<Vec<Reading>>(), "Vec<Reading>");
        assert_eq!(
            short_type_name::<std::collections::HashMap<String, Option<u8>>>(),
            "HashMap<String, Option<u8>>"
        );
        let err = json_from::<Vec<Reading>>(br#"{"device":"d1"}"#).expect_err("not a list");
        assert!(
            err.message()
                .starts_with("payload is not a valid Vec<Reading>: "),
            "{}",
            err.message()
        );
    }

    #[test]
    fn json_round_trip_keeps_metadata() {
        let mut record = Record::new(br#"{"device":"d1","value":1.5}"#.to_vec())
            .with_key("d1")
            .with_topic("sensors/d1")
            .with_header("unit", "C");
        let mut reading: Reading = record.json().expect("valid reading");
        reading.value = 2.5;
        record.set_json(&reading).expect("serialisable");
        assert_eq!(record.key.as_deref(), Some("d1"));
        assert_eq!(record.header("unit"), Some("C"));
        assert_eq!(record.payload, br#"{"device":"d1","value":2.5}"#);
    }

    #[test]
    fn bad_json_names_the_type_and_the_place() {
        let err = Record::new(b"{\"device\":\"d1\"}".to_vec())
            .json::<Reading>()
            .expect_err("value is missing");
        assert_eq!(
            err.message(),
            "payload is not a valid Reading: missing field `value` at line 1 column 15"
        );
    }

    #[test]
    fn set_header_replaces() {
        let record = Record::new("x").with_header("a", "1").with_header("a", "2");
        assert_eq!(record.headers, vec![("a".to_string(), "2".to_string())]);
    }
}
