//! The attribute forms, driven through the `Stage` each generates, the way
//! the host calls them.

use runnel_sdk::{Error, Record, Stage};
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Debug, PartialEq)]
pub struct Reading {
    device: String,
    value: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limit {
    max: f64,
}

#[runnel_sdk::filter]
pub fn below_limit(reading: &Reading, limit: &Limit) -> bool {
    reading.value <= limit.max
}

#[runnel_sdk::filter]
pub fn has_key(record: &Record) -> bool {
    record.key.is_some()
}

#[runnel_sdk::flat_map]
pub fn split_csv(record: Record) -> Result<Vec<Record>, Error> {
    let text = record.text()?;
    Ok(text
        .split(',')
        .map(|part| Record::new(part.trim()))
        .collect())
}

#[derive(Serialize)]
pub struct Doubled {
    value: f64,
}

#[runnel_sdk::flat_map]
pub fn twice(reading: Reading) -> Vec<Doubled> {
    vec![
        Doubled {
            value: reading.value,
        },
        Doubled {
            value: reading.value * 2.0,
        },
    ]
}

#[runnel_sdk::map]
pub fn scale(reading: Reading) -> Result<Reading, std::num::ParseIntError> {
    let factor: i32 = "3".parse()?;
    Ok(Reading {
        value: reading.value * f64::from(factor),
        ..reading
    })
}

fn reading(value: f64) -> Record {
    Record::from_json(&Reading {
        device: "d1".into(),
        value,
    })
    .expect("json")
    .with_key("d1")
    .with_topic("sensors/d1")
}

fn config<C: serde::de::DeserializeOwned>(json: &str) -> C {
    runnel_sdk::parse_config(json).expect("config")
}

#[test]
fn filter_keeps_what_passes_and_drops_the_rest() {
    let mut stage = BelowLimitStage::init(config(r#"{"max": 10}"#)).expect("init");
    assert_eq!(stage.process(reading(5.0)).expect("ok"), vec![reading(5.0)]);
    assert!(stage.process(reading(50.0)).expect("ok").is_empty());
}

#[test]
fn filter_on_a_bad_payload_is_an_error_naming_the_type() {
    let mut stage = BelowLimitStage::init(config(r#"{"max": 10}"#)).expect("init");
    let err = stage.process(Record::new("nope")).expect_err("not JSON");
    assert!(
        err.message().starts_with("payload is not a valid Reading"),
        "{err}"
    );
}

#[test]
fn filter_on_whole_records_needs_no_config() {
    let mut stage = HasKeyStage::init(config("{}")).expect("init");
    assert_eq!(stage.process(reading(1.0)).expect("ok").len(), 1);
    assert!(stage.process(Record::new("x")).expect("ok").is_empty());
}

#[test]
fn a_stage_without_config_rejects_config_keys() {
    let err = runnel_sdk::parse_config::<runnel_sdk::NoConfig>(r#"{"max": 1}"#)
        .expect_err("no keys allowed");
    assert_eq!(
        err.message(),
        "invalid stage config: unknown field `max`, there are no fields"
    );
}

#[test]
fn flat_map_of_records_emits_each() {
    let mut stage = SplitCsvStage::init(config("{}")).expect("init");
    let out = stage.process(Record::new("a, b,c")).expect("ok");
    let payloads: Vec<_> = out.iter().map(|r| r.payload.clone()).collect();
    assert_eq!(payloads, vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]);
    let err = stage
        .process(Record::new(vec![0xff]))
        .expect_err("not text");
    assert!(
        err.message().starts_with("payload is not UTF-8 text"),
        "{err}"
    );
}

#[test]
fn flat_map_of_json_keeps_the_input_metadata_on_each_output() {
    let mut stage = TwiceStage::init(config("{}")).expect("init");
    let out = stage.process(reading(2.0)).expect("ok");
    assert_eq!(out.len(), 2);
    assert_eq!(out[1].payload, br#"{"value":4.0}"#);
    assert!(out
        .iter()
        .all(|r| r.key.as_deref() == Some("d1") && r.topic.as_deref() == Some("sensors/d1")));
}

#[test]
fn map_with_a_std_error_type_converts_it() {
    let mut stage = ScaleStage::init(config("{}")).expect("init");
    let out = stage.process(reading(2.0)).expect("ok");
    assert_eq!(out[0].json::<Reading>().expect("reading").value, 6.0);
    assert_eq!(out[0].key.as_deref(), Some("d1"));
}
