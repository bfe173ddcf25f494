//! Brings readings to common units and adds what the pipeline knows about
//! each device (site, room, owner) as tags, so a dashboard can compare
//! devices that report differently.
//!
//! Units it converts, by exact name:
//!
//! - temperature: `C` (`°C`), `F` (`°F`), `K`
//! - pressure: `Pa`, `hPa`, `mbar`, `kPa`, `bar`, `psi`
//! - speed: `m/s`, `km/h`, `mph`, `kn`
//!
//! A metric whose unit the reading does not give, or gives as a name not in
//! this list, is left as it is: there is nothing safe to convert it with.
//! Asking to convert between two different quantities (`C` to `bar`) is an
//! error, naming both units. Records that are not readings pass untouched.

use std::collections::BTreeMap;

use reading::{decode_reading, is_reading, render_topic, show_number};
use runnel_sdk::{bail, Error, Record, Stage};
use serde::Deserialize;

#[derive(Deserialize, Debug, Clone, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Metric name to the unit it should be in, e.g. `temperature = "C"`.
    pub convert: BTreeMap<String, String>,
    /// Device to tags added to its readings.
    pub devices: BTreeMap<String, BTreeMap<String, String>>,
    /// Tags added to every reading; a device's own tags override these.
    pub default_tags: BTreeMap<String, String>,
    /// When set, the output topic: `{device}` is filled in.
    pub topic: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Quantity {
    Temperature,
    Pressure,
    Speed,
}

impl Quantity {
    fn name(self) -> &'static str {
        match self {
            Quantity::Temperature => "temperature",
            Quantity::Pressure => "pressure",
            Quantity::Speed => "speed",
        }
    }
}

/// A unit as an affine map to its quantity's base unit (°C, Pa, m/s):
/// `base = (value + offset) * factor`.
#[derive(Clone, Copy, Debug)]
struct Unit {
    quantity: Quantity,
    offset: f64,
    factor: f64,
}

impl Unit {
    fn base_of(self, value: f64) -> f64 {
        (value + self.offset) * self.factor
    }

    fn value_of(self, base: f64) -> f64 {
        base / self.factor - self.offset
    }
}

const UNITS: &[(&str, Unit)] = &[
    ("C", temperature(0.0, 1.0)),
    ("°C", temperature(0.0, 1.0)),
    ("F", temperature(-32.0, 5.0 / 9.0)),
    ("°F", temperature(-32.0, 5.0 / 9.0)),
    ("K", temperature(-273.15, 1.0)),
    ("Pa", scaled(Quantity::Pressure, 1.0)),
    ("hPa", scaled(Quantity::Pressure, 100.0)),
    ("mbar", scaled(Quantity::Pressure, 100.0)),
    ("kPa", scaled(Quantity::Pressure, 1000.0)),
    ("bar", scaled(Quantity::Pressure, 100_000.0)),
    ("psi", scaled(Quantity::Pressure, 6_894.757_293_168)),
    ("m/s", scaled(Quantity::Speed, 1.0)),
    ("km/h", scaled(Quantity::Speed, 1.0 / 3.6)),
    ("mph", scaled(Quantity::Speed, 0.447_04)),
    ("kn", scaled(Quantity::Speed, 1852.0 / 3600.0)),
];

const fn temperature(offset: f64, factor: f64) -> Unit {
    Unit {
        quantity: Quantity::Temperature,
        offset,
        factor,
    }
}

const fn scaled(quantity: Quantity, factor: f64) -> Unit {
    Unit {
        quantity,
        offset: 0.0,
        factor,
    }
}

fn unit(name: &str) -> Option<Unit> {
    UNITS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, unit)| *unit)
}

/// Rounds to 12 significant digits: far finer than any sensor, and it
/// hides the binary noise of the arithmetic (1.0132000000000001).
fn tidy(value: f64) -> f64 {
    format!("{value:.11e}").parse().unwrap_or(value)
}

pub struct Convert {
    /// Metric to its target unit's name and definition, checked at init.
    targets: Vec<(String, String, Unit)>,
    /// Per device, `default_tags` overlaid with the device's own.
    tags: BTreeMap<String, BTreeMap<String, String>>,
    default_tags: BTreeMap<String, String>,
    topic: Option<String>,
}

impl Stage for Convert {
    type Config = Config;

    fn init(config: Config) -> Result<Self, Error> {
        let mut targets = Vec::new();
        for (metric, target) in config.convert {
            let Some(unit) = unit(&target) else {
                let known: Vec<&str> = UNITS.iter().map(|(name, _)| *name).collect();
                bail!(
                    "convert.{metric}: unknown unit \"{target}\" (known: {})",
                    known.join(", ")
                );
            };
            targets.push((metric, target, unit));
        }
        let tags = config
            .devices
            .into_iter()
            .map(|(device, own)| {
                let mut tags = config.default_tags.clone();
                tags.extend(own);
                (device, tags)
            })
            .collect();
        Ok(Convert {
            targets,
            tags,
            default_tags: config.default_tags,
            topic: config.topic,
        })
    }

    fn process(&mut self, mut record: Record) -> Result<Vec<Record>, Error> {
        if !is_reading(&record) {
            return Ok(vec![record]);
        }
        let mut reading = decode_reading(&record)?;
        let device = reading.device.as_str();
        for (metric, target_name, target) in &self.targets {
            let Some(value) = reading.metrics.get_mut(metric) else {
                continue;
            };
            let Some(source_name) = reading.units.get_mut(metric) else {
                continue;
            };
            if source_name == target_name {
                continue;
            }
            let Some(source) = unit(source_name) else {
                continue;
            };
            if source.quantity != target.quantity {
                bail!(
                    "{device}: cannot convert {metric} from {source_name} ({}) to {target_name} ({})",
                    source.quantity.name(),
                    target.quantity.name()
                );
            }
            let converted = tidy(target.value_of(source.base_of(*value)));
            if !converted.is_finite() {
                bail!(
                    "{device}: {metric} {} {source_name} is too large to express in {target_name}",
                    show_number(*value)
                );
            }
            *value = converted;
            *source_name = target_name.clone();
        }

        // Tags the reading already carries were set closer to the device,
        // so they win over the pipeline's defaults.
        let tags = self.tags.get(device).unwrap_or(&self.default_tags);
        for (name, value) in tags {
            reading
                .tags
                .entry(name.clone())
                .or_insert_with(|| value.clone());
        }
        if let Some(template) = &self.topic {
            record.topic = Some(render_topic(template, device, ""));
        }
        record.set_json(&reading)?;
        Ok(vec![record])
    }
}

runnel_sdk::export_stage!(Convert);

#[cfg(test)]
mod tests {
    use super::*;
    use reading::{Reading, KIND_ALERT, KIND_HEADER, KIND_READING};

    fn reading(device: &str, metrics: &[(&str, f64, &str)]) -> Reading {
        Reading {
            device: device.into(),
            ts: 1_767_225_600_000,
            metrics: metrics
                .iter()
                .map(|(m, v, _)| (m.to_string(), *v))
                .collect(),
            units: metrics
                .iter()
                .filter(|(_, _, u)| !u.is_empty())
                .map(|(m, _, u)| (m.to_string(), u.to_string()))
                .collect(),
            tags: BTreeMap::new(),
        }
    }

    fn record(reading: &Reading) -> Record {
        Record::from_json(reading)
            .expect("serialisable")
            .with_key(reading.device.clone())
            .with_topic("sensors/in")
            .with_header(KIND_HEADER, KIND_READING)
    }

    fn stage(json: &str) -> Convert {
        Convert::init(runnel_sdk::parse_config(json).expect("valid config")).expect("init")
    }

    fn run(stage: &mut Convert, input: &Reading) -> (Record, Reading) {
        let out = stage.process(record(input)).expect("converts");
        assert_eq!(out.len(), 1);
        let reading = out[0].json().expect("a reading");
        (out[0].clone(), reading)
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
    }

    #[test]
    fn empty_config_table_changes_nothing_but_keeps_the_record() {
        let mut stage = stage("{}");
        let input = reading("dev-1", &[("temperature", 70.0, "F")]);
        let (out, got) = run(&mut stage, &input);
        assert_eq!(got, input);
        assert_eq!(out.topic.as_deref(), Some("sensors/in"));
        assert_eq!(out.header(KIND_HEADER), Some(KIND_READING));
    }

    #[test]
    fn unknown_config_key_is_an_error() {
        let err = runnel_sdk::parse_config::<Config>(r#"{"units": {}}"#).expect_err("typo");
        assert!(err.message().contains("unknown field `units`"), "{err}");
    }

    #[test]
    fn unknown_target_unit_fails_init() {
        let config = runnel_sdk::parse_config(r#"{"convert": {"temperature": "celsius"}}"#)
            .expect("well formed");
        let err = Convert::init(config).err().expect("unknown unit");
        assert!(
            err.message()
                .starts_with("convert.temperature: unknown unit \"celsius\" (known: C, °C, F"),
            "{err}"
        );
    }

    #[test]
    fn fahrenheit_to_celsius() {
        let mut stage = stage(r#"{"convert": {"temperature": "C"}}"#);
        let (_, got) = run(
            &mut stage,
            &reading(
                "dev-2",
                &[("temperature", 212.0, "F"), ("humidity", 38.0, "%")],
            ),
        );
        assert_eq!(got.metrics["temperature"], 100.0);
        assert_eq!(got.units["temperature"], "C");
        assert_eq!(got.metrics["humidity"], 38.0);
        assert_eq!(got.units["humidity"], "%");
    }

    #[test]
    fn every_temperature_pair() {
        // 20 °C = 68 °F = 293.15 K
        let values = [
            ("C", 20.0),
            ("°C", 20.0),
            ("F", 68.0),
            ("°F", 68.0),
            ("K", 293.15),
        ];
        for (from, value) in values {
            for (to, expected) in values {
                let mut stage = stage(&format!(r#"{{"convert": {{"t": "{to}"}}}}"#));
                let (_, got) = run(&mut stage, &reading("d", &[("t", value, from)]));
                assert!(
                    close(got.metrics["t"], expected),
                    "{value} {from} to {to}: {} not {expected}",
                    got.metrics["t"]
                );
                assert_eq!(got.units["t"], to);
            }
        }
    }

    #[test]
    fn pressure_and_speed() {
        let pressure = [
            ("Pa", 101_325.0),
            ("hPa", 1013.25),
            ("mbar", 1013.25),
            ("kPa", 101.325),
            ("bar", 1.01325),
            ("psi", 14.695_948_775_5),
        ];
        let speed = [
            ("m/s", 10.0),
            ("km/h", 36.0),
            ("mph", 22.369_362_920_5),
            ("kn", 19.438_444_924_4),
        ];
        for table in [&pressure[..], &speed[..]] {
            for (from, value) in table {
                for (to, expected) in table {
                    let mut stage = stage(&format!(r#"{{"convert": {{"m": "{to}"}}}}"#));
                    let (_, got) = run(&mut stage, &reading("d", &[("m", *value, from)]));
                    let got = got.metrics["m"];
                    assert!(
                        (got - expected).abs() < 1e-6 * expected,
                        "{value} {from} to {to}: {got}"
                    );
                }
            }
        }
    }

    #[test]
    fn results_carry_no_binary_noise() {
        let mut stage = stage(r#"{"convert": {"pressure": "bar"}}"#);
        let (out, _) = run(&mut stage, &reading("d", &[("pressure", 1013.2, "hPa")]));
        let text = String::from_utf8(out.payload).expect("utf-8");
        assert!(text.contains(r#""pressure":1.0132"#), "{text}");
        assert!(!text.contains("1.01320000"), "{text}");
    }

    #[test]
    fn unknown_or_missing_source_units_are_left_alone() {
        let mut stage = stage(r#"{"convert": {"temperature": "C", "speed": "m/s"}}"#);
        let input = reading(
            "dev-1",
            &[
                ("temperature", 21.0, ""),
                ("speed", 3.0, "furlongs/fortnight"),
            ],
        );
        let (_, got) = run(&mut stage, &input);
        assert_eq!(got, input);
    }

    #[test]
    fn incompatible_units_name_both() {
        let mut stage = stage(r#"{"convert": {"temperature": "bar"}}"#);
        let err = stage
            .process(record(&reading("dev-2", &[("temperature", 21.0, "C")])))
            .expect_err("not a pressure");
        assert_eq!(
            err.message(),
            "dev-2: cannot convert temperature from C (temperature) to bar (pressure)"
        );
    }

    #[test]
    fn overflow_is_an_error_not_infinity() {
        let mut stage = stage(r#"{"convert": {"pressure": "Pa"}}"#);
        let err = stage
            .process(record(&reading("dev-2", &[("pressure", 1e305, "bar")])))
            .expect_err("too large");
        assert_eq!(
            err.message(),
            "dev-2: pressure 1e305 bar is too large to express in Pa"
        );
    }

    #[test]
    fn tags_layer_defaults_device_and_reading() {
        let mut stage = stage(
            r#"{
                "default_tags": {"site": "plant-a", "tier": "std"},
                "devices": {"dev-1": {"room": "boiler", "tier": "gold"}}
            }"#,
        );
        let mut input = reading("dev-1", &[("t", 1.0, "")]);
        input.tags.insert("site".into(), "from-device".into());
        let (_, got) = run(&mut stage, &input);
        assert_eq!(
            got.tags,
            BTreeMap::from([
                ("room".to_string(), "boiler".to_string()),
                ("site".to_string(), "from-device".to_string()),
                ("tier".to_string(), "gold".to_string()),
            ])
        );
        let (_, got) = run(&mut stage, &reading("dev-7", &[("t", 1.0, "")]));
        assert_eq!(
            got.tags,
            BTreeMap::from([
                ("site".to_string(), "plant-a".to_string()),
                ("tier".to_string(), "std".to_string()),
            ])
        );
    }

    #[test]
    fn topic_template_is_rendered() {
        let mut stage = stage(r#"{"topic": "readings/{device}"}"#);
        let (out, _) = run(&mut stage, &reading("dev-3", &[("t", 1.0, "")]));
        assert_eq!(out.topic.as_deref(), Some("readings/dev-3"));
        assert_eq!(out.key.as_deref(), Some("dev-3"));
    }

    #[test]
    fn other_records_pass_untouched() {
        let mut stage = stage(r#"{"convert": {"temperature": "C"}, "topic": "x/{device}"}"#);
        let alert = Record::new("{}")
            .with_header(KIND_HEADER, KIND_ALERT)
            .with_topic("a");
        assert_eq!(stage.process(alert.clone()).expect("passes"), vec![alert]);
        let raw = Record::new("garbage");
        assert_eq!(stage.process(raw.clone()).expect("passes"), vec![raw]);
    }

    #[test]
    fn a_broken_reading_is_rejected_with_its_key() {
        let mut stage = stage("{}");
        let input = Record::new("[1]")
            .with_key("dev-5")
            .with_header(KIND_HEADER, KIND_READING);
        let err = stage.process(input).expect_err("not a reading");
        assert!(
            err.message()
                .starts_with("dev-5: payload is not a valid Reading"),
            "{err}"
        );
    }

    #[test]
    fn tidy_keeps_ordinary_values() {
        assert_eq!(tidy(21.5), 21.5);
        assert_eq!(tidy(0.1 + 0.2), 0.3);
        assert_eq!(tidy(-0.0), 0.0);
        assert_eq!(tidy(1e-300), 1e-300);
    }
}
