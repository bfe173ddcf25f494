//! Reads what a device sent, a JSON object or one CSV line, into a
//! [`Reading`] so the stages after it see one shape whatever the source.
//!
//! JSON (the payload's first non-space character is `{`): the device comes
//! from `device_field`, the time from `time_field`, and every other numeric
//! field is a metric, as is every number in a nested `"metrics"` object.
//! Strings, booleans, arrays and other objects are ignored, so devices can
//! send extra context without breaking the pipeline.
//!
//! CSV: one line split on commas (no quoting), cells named by `csv_columns`.
//! Empty cells are skipped; a line equal to the column names is a file's
//! header row and is dropped.
//!
//! Either way the device falls back to the record key and the time to the
//! record timestamp. A time below 10^11 is taken as seconds (10^11 ms is
//! only 1973, 10^11 s is far in the future) and made milliseconds.
//!
//! The output record carries the reading as JSON, keyed by device, stamped
//! with its time and with header `kind = reading`; its topic is kept.

use std::collections::{BTreeMap, BTreeSet};

use reading::{Reading, KIND_HEADER, KIND_READING};
use runnel_sdk::{bail, Error, Record, Stage};
use serde::Deserialize;
use serde_json::{Map, Number, Value};

/// The nested object whose numbers are all metrics.
const METRICS_OBJECT: &str = "metrics";

/// Times with a magnitude below this are seconds, not milliseconds.
const SECONDS_BELOW: i64 = 100_000_000_000;

#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// JSON field, or CSV column, holding the device id.
    pub device_field: String,
    /// JSON field, or CSV column, holding the event time.
    pub time_field: String,
    /// Names of the CSV cells, in order.
    pub csv_columns: Vec<String>,
    /// Metric name to unit, recorded on every reading that has the metric.
    pub units: BTreeMap<String, String>,
    /// Device to (metric to unit), for devices that report in units of
    /// their own; overrides `units` for that device.
    pub device_units: BTreeMap<String, BTreeMap<String, String>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            device_field: "device".into(),
            time_field: "ts".into(),
            csv_columns: ["device", "ts", "temperature", "humidity"]
                .map(String::from)
                .to_vec(),
            units: BTreeMap::new(),
            device_units: BTreeMap::new(),
        }
    }
}

pub struct Parse {
    config: Config,
}

impl Stage for Parse {
    type Config = Config;

    fn init(config: Config) -> Result<Self, Error> {
        if config.device_field.is_empty() || config.time_field.is_empty() {
            bail!("device_field and time_field must not be empty");
        }
        if config.device_field == config.time_field {
            bail!(
                "device_field and time_field are both `{}`",
                config.device_field
            );
        }
        if config.csv_columns.is_empty() {
            bail!("csv_columns must name at least one column");
        }
        let mut seen = BTreeSet::new();
        for column in &config.csv_columns {
            if column.trim().is_empty() {
                bail!("csv_columns has an empty name");
            }
            if !seen.insert(column.as_str()) {
                bail!("csv_columns names `{column}` twice");
            }
        }
        Ok(Parse { config })
    }

    fn process(&mut self, mut record: Record) -> Result<Vec<Record>, Error> {
        let Some(reading) = self.parse(&record)? else {
            return Ok(Vec::new());
        };
        record.set_json(&reading)?;
        record.key = Some(reading.device);
        record.timestamp = Some(reading.ts);
        record.set_header(KIND_HEADER, KIND_READING);
        Ok(vec![record])
    }
}

runnel_sdk::export_stage!(Parse);

/// What the payload said, before units are attached.
struct Parts {
    device: String,
    ts: i64,
    metrics: BTreeMap<String, f64>,
}

impl Parse {
    /// The record's reading, or `None` for a CSV header row.
    pub fn parse(&self, record: &Record) -> Result<Option<Reading>, Error> {
        let text = record.text().map_err(|err| name_key(err, record))?;
        let text = text.trim();
        if text.is_empty() {
            return Err(name_key(Error::msg("payload is empty"), record));
        }
        let parts = if text.starts_with('{') {
            self.read_json(text, record)?
        } else {
            match self.read_csv(text, record)? {
                Some(parts) => parts,
                None => return Ok(None),
            }
        };
        if parts.metrics.is_empty() {
            bail!(
                "{}: no metrics: no numeric field besides `{}` and `{}`",
                parts.device,
                self.config.device_field,
                self.config.time_field
            );
        }
        let device_units = self.config.device_units.get(&parts.device);
        let units = parts
            .metrics
            .keys()
            .filter_map(|metric| {
                device_units
                    .and_then(|units| units.get(metric))
                    .or_else(|| self.config.units.get(metric))
                    .map(|unit| (metric.clone(), unit.clone()))
            })
            .collect();
        Ok(Some(Reading {
            device: parts.device,
            ts: parts.ts,
            metrics: parts.metrics,
            units,
            tags: BTreeMap::new(),
        }))
    }

    fn read_json(&self, text: &str, record: &Record) -> Result<Parts, Error> {
        let object: Map<String, Value> = match serde_json::from_str(text) {
            Ok(Value::Object(object)) => object,
            Ok(_) => {
                return Err(name_key(
                    Error::msg("payload is JSON but not an object"),
                    record,
                ))
            }
            Err(err) => {
                return Err(name_key(
                    Error::msg(format!("payload is not valid JSON: {err}")),
                    record,
                ))
            }
        };
        let device_field = &self.config.device_field;
        let device = match object.get(device_field) {
            None | Some(Value::Null) => self.key_device(record)?,
            Some(Value::String(device)) if !device.trim().is_empty() => device.trim().to_string(),
            Some(Value::String(_)) => {
                return Err(name_key(
                    Error::msg(format!("field `{device_field}` is empty")),
                    record,
                ))
            }
            Some(other) => {
                return Err(name_key(
                    Error::msg(format!(
                        "field `{device_field}` is {}, not a string",
                        show(other)
                    )),
                    record,
                ))
            }
        };
        let time_field = &self.config.time_field;
        let ts = match object.get(time_field) {
            None | Some(Value::Null) => self.record_time(&device, record)?,
            Some(Value::Number(n)) => number_time(n).ok_or_else(|| {
                Error::msg(format!(
                    "{device}: field `{time_field}` is {n}, not a time in milliseconds or seconds since 1970"
                ))
            })?,
            Some(other) => bail!(
                "{device}: field `{time_field}` is {}, not a number",
                show(other)
            ),
        };

        let mut metrics = BTreeMap::new();
        for (name, value) in &object {
            if name == device_field || name == time_field {
                continue;
            }
            match value {
                Value::Object(nested) if name == METRICS_OBJECT => {
                    for (metric, value) in nested {
                        let number = match value {
                            Value::Null => continue,
                            Value::Number(n) => n.as_f64(),
                            _ => None,
                        };
                        let Some(number) = number else {
                            bail!(
                                "{device}: {METRICS_OBJECT}.{metric} is {}, not a number",
                                show(value)
                            );
                        };
                        if metrics.insert(metric.clone(), number).is_some() {
                            bail!("{device}: metric `{metric}` is given both on its own and in `{METRICS_OBJECT}`");
                        }
                    }
                }
                Value::Number(n) => {
                    if let Some(value) = n.as_f64() {
                        if metrics.insert(name.clone(), value).is_some() {
                            bail!("{device}: metric `{name}` is given both on its own and in `{METRICS_OBJECT}`");
                        }
                    }
                }
                // Context a device adds (firmware version, flags) is not a metric.
                _ => {}
            }
        }
        Ok(Parts {
            device,
            ts,
            metrics,
        })
    }

    fn read_csv(&self, line: &str, record: &Record) -> Result<Option<Parts>, Error> {
        let columns = &self.config.csv_columns;
        if line.contains('\n') {
            return Err(name_key(
                Error::msg("payload holds more than one CSV line; send one reading per record"),
                record,
            ));
        }
        let cells: Vec<&str> = line.split(',').map(str::trim).collect();
        if cells.len() != columns.len() {
            return Err(name_key(
                Error::msg(format!(
                    "payload is not a JSON object, and as a CSV line it has {} column{} where {} are expected ({})",
                    cells.len(),
                    if cells.len() == 1 { "" } else { "s" },
                    columns.len(),
                    columns.join(",")
                )),
                record,
            ));
        }
        if cells
            .iter()
            .zip(columns)
            .all(|(cell, column)| cell == column)
        {
            return Ok(None);
        }
        let cell = |name: &str| {
            columns
                .iter()
                .position(|column| column == name)
                .and_then(|i| cells.get(i).copied())
                .filter(|cell| !cell.is_empty())
        };
        let device = match cell(&self.config.device_field) {
            Some(device) => device.to_string(),
            None => self.key_device(record)?,
        };
        let time_field = &self.config.time_field;
        let ts = match cell(time_field) {
            Some(text) => text_time(text).ok_or_else(|| {
                Error::msg(format!(
                    "{device}: column `{time_field}` is \"{text}\", not a time in milliseconds or seconds since 1970"
                ))
            })?,
            None => self.record_time(&device, record)?,
        };
        let mut metrics = BTreeMap::new();
        for (column, text) in columns.iter().zip(&cells) {
            if *column == self.config.device_field || column == time_field || text.is_empty() {
                continue;
            }
            match text.parse::<f64>() {
                Ok(value) if value.is_finite() => {
                    metrics.insert(column.clone(), value);
                }
                _ => bail!("{device}: column `{column}` is \"{text}\", not a number"),
            }
        }
        Ok(Some(Parts {
            device,
            ts,
            metrics,
        }))
    }

    fn key_device(&self, record: &Record) -> Result<String, Error> {
        match record.key.as_deref().map(str::trim) {
            Some(key) if !key.is_empty() => Ok(key.to_string()),
            _ => bail!(
                "no device: neither field `{}` nor the record key",
                self.config.device_field
            ),
        }
    }

    fn record_time(&self, device: &str, record: &Record) -> Result<i64, Error> {
        record.timestamp.ok_or_else(|| {
            Error::msg(format!(
                "{device}: no time: neither field `{}` nor the record timestamp",
                self.config.time_field
            ))
        })
    }
}

/// Before the device is known, the record key is the best name for the sender.
fn name_key(err: Error, record: &Record) -> Error {
    match record.key.as_deref() {
        Some(key) if !key.is_empty() => err.context(key),
        _ => err,
    }
}

fn number_time(n: &Number) -> Option<i64> {
    match n.as_i64() {
        Some(int) => int_time(int),
        // A u64 beyond i64 is no time at all; a float may be fractional seconds.
        None if n.is_u64() => None,
        None => float_time(n.as_f64()?),
    }
}

fn text_time(text: &str) -> Option<i64> {
    match text.parse::<i64>() {
        Ok(int) => int_time(int),
        Err(_) => float_time(text.parse::<f64>().ok()?),
    }
}

fn int_time(int: i64) -> Option<i64> {
    if int.unsigned_abs() < SECONDS_BELOW.unsigned_abs() {
        int.checked_mul(1000)
    } else {
        Some(int)
    }
}

fn float_time(float: f64) -> Option<i64> {
    if !float.is_finite() {
        return None;
    }
    let ms = if float.abs() < SECONDS_BELOW as f64 {
        (float * 1000.0).round()
    } else {
        float.round()
    };
    // i64::MAX as f64 rounds up to 2^63, which no longer fits.
    (ms >= i64::MIN as f64 && ms < i64::MAX as f64).then_some(ms as i64)
}

/// A JSON value for an error message, cut short so a large one does not
/// swamp the reason.
fn show(value: &Value) -> String {
    const MAX: usize = 40;
    let text = value.to_string();
    match text.char_indices().nth(MAX) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_767_225_600_000;

    fn stage() -> Parse {
        Parse::init(Config::default()).expect("default config is valid")
    }

    fn stage_with(config: Config) -> Parse {
        Parse::init(config).expect("config is valid")
    }

    fn reading(out: &[Record]) -> Reading {
        assert_eq!(out.len(), 1, "one record out");
        out[0].json().expect("a reading")
    }

    fn reject(stage: &mut Parse, record: Record) -> String {
        stage
            .process(record)
            .expect_err("must be rejected")
            .message()
            .to_string()
    }

    #[test]
    fn empty_config_table_gives_the_defaults() {
        let config: Config = runnel_sdk::parse_config("{}").expect("empty table");
        assert_eq!(config, Config::default());
        assert_eq!(
            config.csv_columns,
            ["device", "ts", "temperature", "humidity"]
        );
    }

    #[test]
    fn unknown_config_key_is_an_error() {
        let err = runnel_sdk::parse_config::<Config>(r#"{"devce_field":"id"}"#).expect_err("typo");
        assert!(
            err.message().contains("unknown field `devce_field`"),
            "{err}"
        );
    }

    #[test]
    fn bad_configs_fail_init() {
        for (config, expected) in [
            (
                Config {
                    csv_columns: vec![],
                    ..Config::default()
                },
                "csv_columns must name at least one column",
            ),
            (
                Config {
                    csv_columns: vec!["a".into(), "b".into(), "a".into()],
                    ..Config::default()
                },
                "csv_columns names `a` twice",
            ),
            (
                Config {
                    csv_columns: vec!["a".into(), " ".into()],
                    ..Config::default()
                },
                "csv_columns has an empty name",
            ),
            (
                Config {
                    time_field: "device".into(),
                    ..Config::default()
                },
                "device_field and time_field are both `device`",
            ),
        ] {
            let err = Parse::init(config).err().expect("init must fail");
            assert_eq!(err.message(), expected);
        }
    }

    #[test]
    fn json_object_becomes_a_reading_record() {
        let input = Record::new(format!(
            r#"{{"device":"dev-1","ts":{T0},"temperature":21.5,"humidity":40}}"#
        ))
        .with_topic("sensors/dev-1/telemetry")
        .with_header("source", "mqtt");
        let out = stage().process(input).expect("parses");
        let record = &out[0];
        assert_eq!(record.key.as_deref(), Some("dev-1"));
        assert_eq!(record.timestamp, Some(T0));
        assert_eq!(record.topic.as_deref(), Some("sensors/dev-1/telemetry"));
        assert_eq!(record.header(KIND_HEADER), Some(KIND_READING));
        assert_eq!(record.header("source"), Some("mqtt"));
        assert_eq!(
            reading(&out),
            Reading {
                device: "dev-1".into(),
                ts: T0,
                metrics: BTreeMap::from([
                    ("humidity".to_string(), 40.0),
                    ("temperature".to_string(), 21.5)
                ]),
                units: BTreeMap::new(),
                tags: BTreeMap::new(),
            }
        );
    }

    #[test]
    fn json_ignores_non_numeric_fields_and_reads_nested_metrics() {
        let input = Record::new(format!(
            r#"  {{"device":"dev-3","ts":{T0},"fw":"1.2","ok":true,"pos":[1,2],"metrics":{{"pressure":1013.2,"wind":null}},"battery":3.7}}"#
        ));
        let got = reading(&stage().process(input).expect("parses"));
        assert_eq!(
            got.metrics,
            BTreeMap::from([
                ("battery".to_string(), 3.7),
                ("pressure".to_string(), 1013.2)
            ])
        );
    }

    #[test]
    fn json_device_and_time_fall_back_to_the_record() {
        let input = Record::new(r#"{"temperature":20}"#)
            .with_key("dev-9")
            .with_timestamp(T0);
        let got = reading(&stage().process(input).expect("parses"));
        assert_eq!((got.device.as_str(), got.ts), ("dev-9", T0));
    }

    #[test]
    fn seconds_become_milliseconds() {
        let mut stage = stage();
        for (ts, expected) in [
            ("1767225600", T0),
            ("1767225600.25", T0 + 250),
            ("1767225600000", T0),
            ("1767225600000.0", T0),
        ] {
            let input = Record::new(format!(r#"{{"device":"d","ts":{ts},"t":1}}"#));
            assert_eq!(
                reading(&stage.process(input).expect("parses")).ts,
                expected,
                "{ts}"
            );
            let input = Record::new(format!("d,{ts},1,"));
            assert_eq!(
                reading(&stage.process(input).expect("parses")).ts,
                expected,
                "csv {ts}"
            );
        }
    }

    #[test]
    fn configured_field_names_and_units() {
        let config = Config {
            device_field: "id".into(),
            time_field: "time".into(),
            units: BTreeMap::from([
                ("temperature".to_string(), "C".to_string()),
                ("pressure".to_string(), "hPa".to_string()),
            ]),
            device_units: BTreeMap::from([(
                "dev-2".to_string(),
                BTreeMap::from([("temperature".to_string(), "F".to_string())]),
            )]),
            ..Config::default()
        };
        let mut stage = stage_with(config);
        let got = reading(
            &stage
                .process(Record::new(format!(
                    r#"{{"id":"dev-1","time":{T0},"temperature":21}}"#
                )))
                .expect("parses"),
        );
        // Only the units of metrics the reading has.
        assert_eq!(
            got.units,
            BTreeMap::from([("temperature".to_string(), "C".to_string())])
        );
        let got = reading(
            &stage
                .process(Record::new(format!(
                    r#"{{"id":"dev-2","time":{T0},"temperature":70,"pressure":1000}}"#
                )))
                .expect("parses"),
        );
        assert_eq!(
            got.units,
            BTreeMap::from([
                ("pressure".to_string(), "hPa".to_string()),
                ("temperature".to_string(), "F".to_string())
            ])
        );
    }

    #[test]
    fn csv_line_becomes_a_reading() {
        let input = Record::new(format!(" dev-2 , {},70.1, 38.0 \r\n", T0 + 5000))
            .with_topic("sensors/dev-2/csv");
        let out = stage().process(input).expect("parses");
        assert_eq!(out[0].key.as_deref(), Some("dev-2"));
        assert_eq!(out[0].timestamp, Some(T0 + 5000));
        let got = reading(&out);
        assert_eq!(
            got.metrics,
            BTreeMap::from([
                ("humidity".to_string(), 38.0),
                ("temperature".to_string(), 70.1)
            ])
        );
    }

    #[test]
    fn csv_skips_empty_cells_and_falls_back_to_key_and_timestamp() {
        let input = Record::new(",,21.5,").with_key("dev-4").with_timestamp(T0);
        let got = reading(&stage().process(input).expect("parses"));
        assert_eq!(got.device, "dev-4");
        assert_eq!(got.ts, T0);
        assert_eq!(
            got.metrics,
            BTreeMap::from([("temperature".to_string(), 21.5)])
        );
    }

    #[test]
    fn csv_header_row_is_dropped() {
        let out = stage()
            .process(Record::new("device,ts,temperature,humidity"))
            .expect("header row");
        assert!(out.is_empty());
    }

    #[test]
    fn csv_non_number_names_the_column() {
        let message = reject(&mut stage(), Record::new(format!("dev-2,{T0},abc,38.0")));
        assert_eq!(
            message,
            "dev-2: column `temperature` is \"abc\", not a number"
        );
        let message = reject(&mut stage(), Record::new(format!("dev-2,{T0},NaN,38.0")));
        assert_eq!(
            message,
            "dev-2: column `temperature` is \"NaN\", not a number"
        );
        let message = reject(&mut stage(), Record::new("dev-2,noon,20,38.0"));
        assert_eq!(
            message,
            "dev-2: column `ts` is \"noon\", not a time in milliseconds or seconds since 1970"
        );
    }

    #[test]
    fn csv_with_wrong_column_count_says_what_was_expected() {
        let message = reject(&mut stage(), Record::new("dev-2,1,2").with_key("dev-2"));
        assert_eq!(
            message,
            "dev-2: payload is not a JSON object, and as a CSV line it has 3 columns where 4 are expected (device,ts,temperature,humidity)"
        );
        let message = reject(&mut stage(), Record::new("hello"));
        assert!(message.contains("it has 1 column where 4"), "{message}");
        let message = reject(&mut stage(), Record::new("d,1,2,3\nd,2,3,4"));
        assert!(message.contains("more than one CSV line"), "{message}");
    }

    #[test]
    fn no_device_anywhere() {
        let message = reject(&mut stage(), Record::new(format!(r#"{{"ts":{T0},"t":1}}"#)));
        assert_eq!(
            message,
            "no device: neither field `device` nor the record key"
        );
        let message = reject(&mut stage(), Record::new(format!(",{T0},1,2")));
        assert_eq!(
            message,
            "no device: neither field `device` nor the record key"
        );
    }

    #[test]
    fn no_time_anywhere() {
        let message = reject(&mut stage(), Record::new(r#"{"device":"dev-1","t":1}"#));
        assert_eq!(
            message,
            "dev-1: no time: neither field `ts` nor the record timestamp"
        );
    }

    #[test]
    fn no_metrics() {
        let message = reject(
            &mut stage(),
            Record::new(format!(r#"{{"device":"dev-1","ts":{T0},"status":"ok"}}"#)),
        );
        assert_eq!(
            message,
            "dev-1: no metrics: no numeric field besides `device` and `ts`"
        );
        let message = reject(&mut stage(), Record::new(format!("dev-1,{T0},,")));
        assert!(message.starts_with("dev-1: no metrics"), "{message}");
    }

    #[test]
    fn bad_json_is_named() {
        let message = reject(
            &mut stage(),
            Record::new(r#"{"device":"dev-3","temperature":22.1,"#).with_key("dev-3"),
        );
        assert!(
            message.starts_with("dev-3: payload is not valid JSON: EOF while parsing"),
            "{message}"
        );
    }

    #[test]
    fn wrong_json_types_are_named() {
        let mut stage = stage();
        let message = reject(&mut stage, Record::new(r#"{"device":42,"t":1}"#));
        assert_eq!(message, "field `device` is 42, not a string");
        let message = reject(&mut stage, Record::new(r#"{"device":" ","t":1}"#));
        assert_eq!(message, "field `device` is empty");
        let message = reject(
            &mut stage,
            Record::new(r#"{"device":"d","ts":"noon","t":1}"#),
        );
        assert_eq!(message, "d: field `ts` is \"noon\", not a number");
        let message = reject(
            &mut stage,
            Record::new(r#"{"device":"d","ts":99999999999999999999,"t":1}"#),
        );
        assert!(message.starts_with("d: field `ts` is "), "{message}");
        let message = reject(
            &mut stage,
            Record::new(format!(
                r#"{{"device":"d","ts":{T0},"metrics":{{"t":"hot"}}}}"#
            )),
        );
        assert_eq!(message, "d: metrics.t is \"hot\", not a number");
        let message = reject(
            &mut stage,
            Record::new(format!(
                r#"{{"device":"d","ts":{T0},"t":1,"metrics":{{"t":2}}}}"#
            )),
        );
        assert_eq!(
            message,
            "d: metric `t` is given both on its own and in `metrics`"
        );
    }

    #[test]
    fn long_values_are_cut_short_in_reasons() {
        let long = "x".repeat(200);
        let message = reject(
            &mut stage(),
            Record::new(format!(r#"{{"device":["{long}"]}}"#)),
        );
        assert!(message.len() < 100, "{message}");
        assert!(message.contains('…'), "{message}");
    }

    #[test]
    fn not_text_or_empty() {
        let message = reject(
            &mut stage(),
            Record::new(vec![0xff, 0xfe]).with_key("dev-1"),
        );
        assert!(
            message.starts_with("dev-1: payload is not UTF-8 text"),
            "{message}"
        );
        let message = reject(&mut stage(), Record::new("  \n"));
        assert_eq!(message, "payload is empty");
    }

    #[test]
    fn time_helpers_stay_in_range() {
        assert_eq!(int_time(i64::MAX), Some(i64::MAX));
        assert_eq!(int_time(-5), Some(-5000));
        assert_eq!(float_time(f64::INFINITY), None);
        assert_eq!(float_time(1e30), None);
        assert_eq!(text_time("1.5"), Some(1500));
        assert_eq!(text_time("x"), None);
    }
}
