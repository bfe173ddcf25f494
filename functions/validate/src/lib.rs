//! Sends a reading to the dead letter when it cannot be trusted: a device
//! not on the allowed list, a required metric missing, a value that is not
//! finite or lies outside its configured range. The reason lists every
//! problem found, not only the first, so one look at the dead letter is
//! enough to fix the device.
//!
//! Readings that pass go on unchanged, byte for byte; records whose `kind`
//! header is not `reading` (aggregates, alerts, anything unparsed) pass too.

use std::collections::BTreeMap;

use reading::{decode_reading, is_reading, show_number, Reading};
use runnel_sdk::{Error, Record};
use serde::Deserialize;

#[derive(Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Metrics every reading must have.
    pub required: Vec<String>,
    /// Metric to the range its values must lie in, bounds inclusive.
    pub ranges: BTreeMap<String, Range>,
    /// When set, readings from any other device are rejected.
    pub allowed_devices: Option<Vec<String>>,
}

/// Inclusive bounds; a missing bound does not limit that side.
#[derive(Deserialize, Debug, Clone, Copy, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Range {
    pub min: Option<f64>,
    pub max: Option<f64>,
}

/// The whole check as one plain function, so the host gets it as a stage
/// (`ValidateStage`) and tests call it directly.
#[runnel_sdk::map]
pub fn validate(record: Record, config: &Config) -> Result<Record, Error> {
    if !is_reading(&record) {
        return Ok(record);
    }
    let reading = decode_reading(&record)?;
    let problems = problems(&reading, config);
    if problems.is_empty() {
        Ok(record)
    } else {
        Err(Error::msg(format!(
            "{}: {}",
            reading.device,
            problems.join("; ")
        )))
    }
}

/// What is wrong with a reading, in a fixed order: device, required
/// metrics, then each metric by name.
pub fn problems(reading: &Reading, config: &Config) -> Vec<String> {
    let mut problems = Vec::new();
    if let Some(allowed) = &config.allowed_devices {
        if !allowed.contains(&reading.device) {
            problems.push("device is not in allowed_devices".to_string());
        }
    }
    for metric in &config.required {
        if !reading.metrics.contains_key(metric) {
            problems.push(format!("required metric {metric} is missing"));
        }
    }
    for (metric, &value) in &reading.metrics {
        if !value.is_finite() {
            problems.push(format!(
                "{metric} {} is not a finite number",
                show_number(value)
            ));
            continue;
        }
        let Some(range) = config.ranges.get(metric) else {
            continue;
        };
        let unit = reading
            .units
            .get(metric)
            .map(|unit| format!(" {unit}"))
            .unwrap_or_default();
        if let Some(min) = range.min {
            if value < min {
                problems.push(format!(
                    "{metric} {}{unit} below minimum {}",
                    show_number(value),
                    show_number(min)
                ));
            }
        }
        if let Some(max) = range.max {
            if value > max {
                problems.push(format!(
                    "{metric} {}{unit} above maximum {}",
                    show_number(value),
                    show_number(max)
                ));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use reading::{KIND_AGGREGATE, KIND_HEADER, KIND_READING};
    use runnel_sdk::Stage;

    fn reading(device: &str, metrics: &[(&str, f64)]) -> Reading {
        Reading {
            device: device.into(),
            ts: 1_767_225_600_000,
            metrics: metrics.iter().map(|(m, v)| (m.to_string(), *v)).collect(),
            units: BTreeMap::new(),
            tags: BTreeMap::new(),
        }
    }

    fn record(reading: &Reading) -> Record {
        Record::from_json(reading)
            .expect("serialisable")
            .with_key(reading.device.clone())
            .with_header(KIND_HEADER, KIND_READING)
    }

    fn config() -> Config {
        runnel_sdk::parse_config(
            r#"{
                "required": ["temperature"],
                "ranges": {
                    "temperature": {"min": -40, "max": 125},
                    "humidity": {"min": 0, "max": 100}
                }
            }"#,
        )
        .expect("valid config")
    }

    #[test]
    fn empty_config_table_accepts_everything() {
        let config: Config = runnel_sdk::parse_config("{}").expect("empty table");
        assert_eq!(config, Config::default());
        let input = record(&reading("dev-1", &[("temperature", 1e9)]));
        assert_eq!(validate(input.clone(), &config).expect("passes"), input);
    }

    #[test]
    fn unknown_config_keys_are_errors() {
        let err = runnel_sdk::parse_config::<Config>(r#"{"max_future_ms": 1000}"#)
            .expect_err("not a field");
        assert!(
            err.message().contains("unknown field `max_future_ms`"),
            "{err}"
        );
        let err = runnel_sdk::parse_config::<Config>(r#"{"ranges": {"t": {"maximum": 1}}}"#)
            .expect_err("not a bound");
        assert!(err.message().contains("unknown field `maximum`"), "{err}");
    }

    #[test]
    fn a_good_reading_passes_unchanged() {
        let input = record(&reading(
            "dev-1",
            &[("temperature", 21.5), ("humidity", 40.0)],
        ))
        .with_topic("sensors/dev-1");
        assert_eq!(validate(input.clone(), &config()).expect("passes"), input);
    }

    #[test]
    fn bounds_are_inclusive() {
        let input = record(&reading(
            "dev-1",
            &[("temperature", 125.0), ("humidity", 0.0)],
        ));
        assert!(validate(input, &config()).is_ok());
    }

    #[test]
    fn out_of_range_names_device_metric_value_and_bound() {
        let input = record(&reading("dev-3", &[("temperature", 900.0)]));
        let err = validate(input, &config()).expect_err("too hot");
        assert_eq!(err.message(), "dev-3: temperature 900 above maximum 125");

        let input = record(&reading("dev-3", &[("temperature", -50.5)]));
        let err = validate(input, &config()).expect_err("too cold");
        assert_eq!(err.message(), "dev-3: temperature -50.5 below minimum -40");
    }

    #[test]
    fn the_unit_is_shown_when_known() {
        let mut r = reading("dev-3", &[("temperature", 900.0)]);
        r.units.insert("temperature".into(), "C".into());
        let err = validate(record(&r), &config()).expect_err("too hot");
        assert_eq!(err.message(), "dev-3: temperature 900 C above maximum 125");
    }

    #[test]
    fn every_problem_is_listed() {
        let input = record(&reading("dev-2", &[("humidity", 130.0)]));
        let err = validate(input, &config()).expect_err("two problems");
        assert_eq!(
            err.message(),
            "dev-2: required metric temperature is missing; humidity 130 above maximum 100"
        );
    }

    #[test]
    fn huge_values_are_written_short() {
        let input = record(&reading("dev-3", &[("temperature", 1e300)]));
        let err = validate(input, &config()).expect_err("too hot");
        assert_eq!(err.message(), "dev-3: temperature 1e300 above maximum 125");
    }

    #[test]
    fn non_finite_values_are_rejected() {
        // JSON cannot carry NaN, so check the function on the reading itself.
        let r = reading(
            "dev-1",
            &[("temperature", f64::NAN), ("wind", f64::INFINITY)],
        );
        assert_eq!(
            problems(&r, &Config::default()),
            [
                "temperature NaN is not a finite number",
                "wind inf is not a finite number"
            ]
        );
    }

    #[test]
    fn devices_off_the_list_are_rejected() {
        let config = Config {
            allowed_devices: Some(vec!["dev-1".into(), "dev-2".into()]),
            ..Config::default()
        };
        assert!(validate(record(&reading("dev-2", &[("t", 1.0)])), &config).is_ok());
        let err = validate(record(&reading("dev-9", &[("t", 1.0)])), &config)
            .expect_err("unknown device");
        assert_eq!(err.message(), "dev-9: device is not in allowed_devices");
    }

    #[test]
    fn other_kinds_and_unmarked_records_pass_untouched() {
        let aggregate = Record::new("not a reading").with_header(KIND_HEADER, KIND_AGGREGATE);
        assert_eq!(
            validate(aggregate.clone(), &config()).expect("passes"),
            aggregate
        );
        let raw = Record::new("dev-1,1,2,3");
        assert_eq!(validate(raw.clone(), &config()).expect("passes"), raw);
    }

    #[test]
    fn a_broken_reading_is_rejected_with_its_key() {
        let input = Record::new(r#"{"device":"dev-1"}"#)
            .with_key("dev-1")
            .with_header(KIND_HEADER, KIND_READING);
        let err = validate(input, &config()).expect_err("no ts");
        assert!(
            err.message()
                .starts_with("dev-1: payload is not a valid Reading: missing field `ts`"),
            "{err}"
        );
    }

    #[test]
    fn the_generated_stage_behaves_like_the_function() {
        let mut stage = ValidateStage::init(config()).expect("init");
        let good = record(&reading("dev-1", &[("temperature", 20.0)]));
        assert_eq!(stage.process(good.clone()).expect("passes"), vec![good]);
        let bad = record(&reading("dev-1", &[("temperature", 200.0)]));
        assert_eq!(
            stage.process(bad).expect_err("too hot").message(),
            "dev-1: temperature 200 above maximum 125"
        );
    }
}
