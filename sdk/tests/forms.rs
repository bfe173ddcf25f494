//! The attribute forms, driven through the `Stage` each generates, the way
//! the host calls them.

use std::cell::RefCell;
use std::collections::BTreeMap;

use runnel_sdk::{Error, Record, Stage};
use runnel_wire::{put_u32, OutcomeHead, Reader};
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize, Debug, PartialEq)]
pub struct Reading {
    device: String,
    value: f64,
}

#[derive(Deserialize, Debug)]
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

#[runnel_sdk::map]
pub fn to_record(reading: Reading) -> Record {
    Record::new(reading.device).with_key("from-json")
}

/// Tuple keys have no JSON form, so every output fails to serialise.
#[runnel_sdk::map]
pub fn by_pair(reading: Reading) -> BTreeMap<(u8, u8), f64> {
    BTreeMap::from([((1, 2), reading.value)])
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
fn a_config_value_of_the_wrong_type_names_its_field() {
    let err = runnel_sdk::parse_config::<Limit>(r#"{"max": "5"}"#).expect_err("a string");
    assert_eq!(
        err.message(),
        r#"invalid stage config: max: invalid type: string "5", expected f64"#
    );
    let err = runnel_sdk::parse_config::<Limit>("{}").expect_err("no max");
    assert_eq!(err.message(), "invalid stage config: missing field `max`");
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

type Outcomes = Vec<Result<Vec<Record>, String>>;

/// A batch's outcomes as the host gets them (encoded, through the stage's
/// `process_encoded`), and the same records' outcomes through
/// `Stage::process` one by one.
fn both_ways<S: Stage>(config: &str, records: &[Record]) -> (Outcomes, Outcomes) {
    let slot = RefCell::new(None);
    runnel_sdk::__private::init::<S>(&slot, config.into()).expect("init");
    let mut batch = Vec::new();
    put_u32(&mut batch, records.len() as u32);
    for record in records {
        record.encode(&mut batch);
    }
    let answer = runnel_sdk::__private::process::<S>(&slot, &batch);
    let mut reader = Reader::new(&answer);
    let count = reader.count(1).expect("outcome count");
    let encoded: Outcomes = (0..count)
        .map(|_| match reader.outcome().expect("outcome") {
            OutcomeHead::Emit(n) => Ok((0..n)
                .map(|_| Record::from_wire(reader.record().expect("record")))
                .collect()),
            OutcomeHead::Reject(reason) => Err(reason.to_string()),
        })
        .collect();
    assert!(reader.is_done(), "bytes left after the outcomes");

    let mut stage = S::init(runnel_sdk::parse_config(config).expect("config")).expect("init");
    let one_by_one = records
        .iter()
        .map(|r| {
            stage
                .process(r.clone())
                .map_err(|e| e.message().to_string())
        })
        .collect();
    (encoded, one_by_one)
}

/// Readings with every kind of metadata, and payloads that are not readings.
fn mixed_batch() -> Vec<Record> {
    vec![
        reading(5.0)
            .with_timestamp(1_700_000_000_000)
            .with_header("unit", "C")
            .with_header("site", "roof"),
        reading(50.0),
        Record::new("not json").with_key("d2"),
        Record::new(vec![0xff, 0xfe]),
        Record::new(r#"{"device":"d3"}"#).with_topic("sensors/d3"),
        Record::from_json(&Reading {
            device: "d4".into(),
            value: -1.5,
        })
        .expect("json"),
    ]
}

#[test]
fn json_forms_give_the_same_outcomes_encoded_as_record_by_record() {
    let batch = mixed_batch();
    let cases: Vec<(&str, (Outcomes, Outcomes))> = vec![
        (
            "filter",
            both_ways::<BelowLimitStage>(r#"{"max": 10}"#, &batch),
        ),
        ("map", both_ways::<ScaleStage>("{}", &batch)),
        ("map to Record", both_ways::<ToRecordStage>("{}", &batch)),
        ("flat_map", both_ways::<TwiceStage>("{}", &batch)),
        (
            "map to unwritable JSON",
            both_ways::<ByPairStage>("{}", &batch),
        ),
    ];
    for (form, (encoded, one_by_one)) in cases {
        assert_eq!(encoded, one_by_one, "{form}");
        assert_eq!(encoded.len(), batch.len(), "{form}");
        assert!(
            encoded.iter().any(Result::is_err),
            "{form}: nothing rejected"
        );
    }
    let (filtered, _) = both_ways::<BelowLimitStage>(r#"{"max": 10}"#, &batch);
    assert_eq!(filtered[0], Ok(vec![batch[0].clone()]), "kept as it came");
    assert_eq!(filtered[1], Ok(vec![]), "over the limit");
    let (scaled, _) = both_ways::<ScaleStage>("{}", &batch);
    let first = &scaled[0].as_ref().expect("a reading")[0];
    assert_eq!(first.payload, br#"{"device":"d1","value":15.0}"#);
    assert_eq!(first.headers, batch[0].headers);
    assert_eq!(first.timestamp, batch[0].timestamp);
    let (unwritable, _) = both_ways::<ByPairStage>("{}", &batch);
    assert_eq!(
        unwritable[0],
        Err("cannot write JSON: key must be a string".to_string())
    );
}

#[test]
fn whole_record_forms_give_the_same_outcomes_encoded_as_record_by_record() {
    let batch = mixed_batch();
    let (encoded, one_by_one) = both_ways::<SplitCsvStage>("{}", &batch);
    assert_eq!(encoded, one_by_one);
    let (encoded, one_by_one) = both_ways::<HasKeyStage>("{}", &batch);
    assert_eq!(encoded, one_by_one);
}
