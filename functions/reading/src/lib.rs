//! The payloads the example stages pass each other, as JSON.

use std::collections::BTreeMap;

use runnel_sdk::{Error, Record};
use serde::{Deserialize, Serialize};

/// Header naming what a record's payload is: one of the `KIND_*` values.
pub const KIND_HEADER: &str = "kind";
pub const KIND_READING: &str = "reading";
pub const KIND_AGGREGATE: &str = "aggregate";
pub const KIND_ALERT: &str = "alert";

/// One device's measurements at one instant, whatever format it came in.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Reading {
    pub device: String,
    /// Event time, milliseconds since the Unix epoch.
    pub ts: i64,
    /// Metric name to value, e.g. `temperature` to `21.5`.
    pub metrics: BTreeMap<String, f64>,
    /// Metric name to unit, for the metrics whose unit is known.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub units: BTreeMap<String, String>,
    /// Metadata about the device, e.g. `site`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

/// Summary of one metric of one device over one tumbling window.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Aggregate {
    pub device: String,
    pub metric: String,
    /// Window start, inclusive, ms since the Unix epoch.
    pub window_start: i64,
    /// Window end, exclusive.
    pub window_end: i64,
    pub count: u64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
}

/// A value far from what a device usually reports.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Alert {
    pub device: String,
    pub metric: String,
    pub ts: i64,
    pub value: f64,
    /// The running mean before this value.
    pub expected: f64,
    /// How many standard deviations the value is from the mean.
    pub score: f64,
    pub threshold: f64,
}

/// Fills `{device}` and `{metric}` in a topic template.
pub fn render_topic(template: &str, device: &str, metric: &str) -> String {
    template
        .replace("{device}", device)
        .replace("{metric}", metric)
}

/// Whether the record's `kind` header says its payload is a [`Reading`].
/// Stages that work on readings pass every other record on untouched.
pub fn is_reading(record: &Record) -> bool {
    record.header(KIND_HEADER) == Some(KIND_READING)
}

/// The record's [`Reading`]. The payload could not be read, so the device
/// is unknown; the error names the record's key instead, when it has one.
pub fn decode_reading(record: &Record) -> Result<Reading, Error> {
    record.json::<Reading>().map_err(|err| match &record.key {
        Some(key) => err.context(key),
        None => err,
    })
}

/// A record carrying `payload` as JSON, keyed by `device`, with the `kind` header set.
pub fn derived_record<T: Serialize>(
    kind: &str,
    payload: &T,
    device: &str,
    timestamp: i64,
    topic: String,
) -> Result<Record, Error> {
    Ok(Record::from_json(payload)?
        .with_key(device)
        .with_timestamp(timestamp)
        .with_topic(topic)
        .with_header(KIND_HEADER, kind))
}

/// A value for a dead-letter reason: `900` and `21.5` as written, but
/// `1e305` rather than three hundred digits.
pub fn show_number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude != 0.0 && !(1e-6..1e16).contains(&magnitude) {
        format!("{value:e}")
    } else {
        value.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_stay_short() {
        assert_eq!(show_number(900.0), "900");
        assert_eq!(show_number(-21.5), "-21.5");
        assert_eq!(show_number(0.0), "0");
        assert_eq!(show_number(1e305), "1e305");
        assert_eq!(show_number(-2.5e-9), "-2.5e-9");
        assert_eq!(show_number(f64::NAN), "NaN");
        assert_eq!(show_number(f64::NEG_INFINITY), "-inf");
    }

    #[test]
    fn only_the_reading_kind_is_a_reading() {
        assert!(is_reading(
            &Record::new("{}").with_header(KIND_HEADER, KIND_READING)
        ));
        assert!(!is_reading(
            &Record::new("{}").with_header(KIND_HEADER, KIND_ALERT)
        ));
        assert!(!is_reading(&Record::new("{}")));
    }

    #[test]
    fn undecodable_reading_names_the_key() {
        let err = decode_reading(&Record::new("{}").with_key("dev-1")).expect_err("no fields");
        assert!(
            err.message()
                .starts_with("dev-1: payload is not a valid Reading"),
            "{err}"
        );
    }

    #[test]
    fn topic_template_fills_both_places() {
        assert_eq!(
            render_topic("alerts/{device}/{metric}", "d1", "temperature"),
            "alerts/d1/temperature"
        );
    }

    #[test]
    fn reading_json_leaves_out_empty_maps() {
        let reading = Reading {
            device: "d1".into(),
            ts: 5,
            metrics: BTreeMap::from([("t".to_string(), 1.0)]),
            units: BTreeMap::new(),
            tags: BTreeMap::new(),
        };
        let json = serde_json::to_string(&reading).expect("serialisable");
        assert_eq!(json, r#"{"device":"d1","ts":5,"metrics":{"t":1.0}}"#);
    }
}
