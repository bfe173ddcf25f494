//! Summarises readings per device and metric over tumbling event-time
//! windows of `size_ms`, aligned to the epoch (a 60 s window starts on the
//! minute), as one [`Aggregate`] record per metric: count, min, max, mean.
//!
//! Each device has one open window. It closes when a reading of that device
//! falls into a later window, or when `flush` sees the pipeline clock pass
//! its end plus `grace_ms`, or at the end of the input, so the last window
//! of a file is not lost. A reading for a window that has closed is
//! rejected as late rather than folded silently into the wrong window.
//!
//! Aggregates go out keyed by device, stamped with the window end, with
//! header `kind = aggregate`. Records that are not readings pass untouched.

use std::collections::BTreeMap;

use reading::{
    decode_reading, derived_record, is_reading, render_topic, show_number, Aggregate,
    KIND_AGGREGATE,
};
use runnel_sdk::{bail, Error, Record, Stage};
use serde::Deserialize;

#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Window length in milliseconds.
    pub size_ms: i64,
    /// How long past its end `flush` keeps a window open for stragglers.
    pub grace_ms: i64,
    /// Metrics to aggregate; all when left out.
    pub metrics: Option<Vec<String>>,
    /// Topic of the aggregates: `{device}` and `{metric}` are filled in.
    pub topic: String,
    /// Whether readings also go on after this stage, besides the aggregates.
    pub pass_through: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            size_ms: 60_000,
            grace_ms: 0,
            metrics: None,
            topic: "aggregates/{device}".into(),
            pass_through: false,
        }
    }
}

/// Running summary of one metric in one window.
#[derive(Debug, Clone)]
struct Summary {
    count: u64,
    min: f64,
    max: f64,
    // A running mean, not a sum, cannot overflow on large values.
    mean: f64,
    unit: Option<String>,
}

impl Summary {
    fn new(value: f64, unit: Option<String>) -> Self {
        Summary {
            count: 1,
            min: value,
            max: value,
            mean: value,
            unit,
        }
    }

    fn add(&mut self, value: f64) {
        self.count += 1;
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.mean += (value - self.mean) / self.count as f64;
    }
}

#[derive(Debug)]
struct OpenWindow {
    start: i64,
    end: i64,
    metrics: BTreeMap<String, Summary>,
}

#[derive(Debug, Default)]
struct DeviceState {
    open: Option<OpenWindow>,
    /// Windows ending at or before this have been emitted.
    closed_before: Option<i64>,
}

impl DeviceState {
    /// Readings starting before this belong to a window that will not be emitted again.
    fn earliest_open(&self) -> Option<i64> {
        match (self.open.as_ref().map(|w| w.start), self.closed_before) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

pub struct Window {
    config: Config,
    /// By device name, so `flush` emits in a fixed order.
    devices: BTreeMap<String, DeviceState>,
}

impl Stage for Window {
    type Config = Config;

    fn init(config: Config) -> Result<Self, Error> {
        if config.size_ms <= 0 {
            bail!("size_ms must be positive, not {}", config.size_ms);
        }
        if config.grace_ms < 0 {
            bail!("grace_ms must not be negative, not {}", config.grace_ms);
        }
        if config.metrics.as_ref().is_some_and(Vec::is_empty) {
            bail!("metrics is empty; leave it out to aggregate every metric");
        }
        if config.topic.is_empty() {
            bail!("topic must not be empty");
        }
        Ok(Window {
            config,
            devices: BTreeMap::new(),
        })
    }

    fn process(&mut self, record: Record) -> Result<Vec<Record>, Error> {
        if !is_reading(&record) {
            return Ok(vec![record]);
        }
        let reading = decode_reading(&record)?;
        let device = &reading.device;
        let values: Vec<(&String, f64)> = reading
            .metrics
            .iter()
            .filter(|(metric, _)| self.selected(metric))
            .map(|(metric, value)| (metric, *value))
            .collect();
        if let Some((metric, value)) = values.iter().find(|(_, value)| !value.is_finite()) {
            bail!(
                "{device}: {metric} {} is not a finite number",
                show_number(*value)
            );
        }
        let mut out = Vec::new();
        if !values.is_empty() {
            let size = self.config.size_ms;
            let start = reading.ts - reading.ts.rem_euclid(size);
            let Some(end) = start.checked_add(size) else {
                bail!(
                    "{device}: reading at {} is too far in the future to window",
                    reading.ts
                );
            };
            let state = self.devices.entry(device.clone()).or_default();
            if state
                .earliest_open()
                .is_some_and(|earliest| start < earliest)
            {
                bail!(
                    "{device}: reading at {} is late: its window {start}..{end} already closed",
                    reading.ts
                );
            }
            // Check units before changing anything, so a rejected reading leaves no trace.
            if let Some(open) = state.open.as_ref().filter(|w| w.start == start) {
                for (metric, _) in &values {
                    let unit = reading.units.get(*metric);
                    if let Some(summary) = open.metrics.get(*metric) {
                        if summary.unit.as_ref() != unit {
                            bail!(
                                "{device}: {metric} is in {}, but its window {start}..{end} so far is in {}",
                                unit.map_or("no unit", String::as_str),
                                summary.unit.as_deref().unwrap_or("no unit")
                            );
                        }
                    }
                }
            }
            if state.open.as_ref().is_some_and(|w| w.start < start) {
                if let Some(closed) = state.open.take() {
                    state.closed_before = Some(closed.end);
                    out.extend(aggregates(&self.config.topic, device, closed)?);
                }
            }
            let open = state.open.get_or_insert_with(|| OpenWindow {
                start,
                end,
                metrics: BTreeMap::new(),
            });
            for (metric, value) in values {
                match open.metrics.get_mut(metric) {
                    Some(summary) => summary.add(value),
                    None => {
                        let unit = reading.units.get(metric).cloned();
                        open.metrics
                            .insert(metric.clone(), Summary::new(value, unit));
                    }
                }
            }
        }
        if self.config.pass_through {
            out.push(record);
        }
        Ok(out)
    }

    fn flush(&mut self, now_ms: i64, end_of_input: bool) -> Result<Vec<Record>, Error> {
        let grace = self.config.grace_ms;
        let mut out = Vec::new();
        for (device, state) in &mut self.devices {
            let due = state
                .open
                .as_ref()
                .is_some_and(|w| end_of_input || w.end.saturating_add(grace) <= now_ms);
            if !due {
                continue;
            }
            if let Some(closed) = state.open.take() {
                state.closed_before = Some(closed.end);
                out.extend(aggregates(&self.config.topic, device, closed)?);
            }
        }
        Ok(out)
    }
}

impl Window {
    fn selected(&self, metric: &str) -> bool {
        self.config
            .metrics
            .as_ref()
            .is_none_or(|wanted| wanted.iter().any(|m| m == metric))
    }
}

/// One record per metric of a closed window, in metric-name order.
fn aggregates(topic: &str, device: &str, window: OpenWindow) -> Result<Vec<Record>, Error> {
    window
        .metrics
        .into_iter()
        .map(|(metric, summary)| {
            let topic = render_topic(topic, device, &metric);
            let aggregate = Aggregate {
                device: device.to_string(),
                metric,
                window_start: window.start,
                window_end: window.end,
                count: summary.count,
                min: summary.min,
                max: summary.max,
                mean: summary.mean,
                unit: summary.unit,
            };
            derived_record(KIND_AGGREGATE, &aggregate, device, window.end, topic)
        })
        .collect()
}

runnel_sdk::export_stage!(Window);

#[cfg(test)]
mod tests {
    use super::*;
    use reading::{Reading, KIND_ALERT, KIND_HEADER, KIND_READING};

    const T0: i64 = 1_767_225_600_000;

    fn reading(device: &str, ts: i64, metrics: &[(&str, f64)]) -> Record {
        let reading = Reading {
            device: device.into(),
            ts,
            metrics: metrics.iter().map(|(m, v)| (m.to_string(), *v)).collect(),
            units: BTreeMap::from([("temperature".to_string(), "C".to_string())]),
            tags: BTreeMap::new(),
        };
        Record::from_json(&reading)
            .expect("serialisable")
            .with_key(device)
            .with_timestamp(ts)
            .with_header(KIND_HEADER, KIND_READING)
    }

    fn stage(json: &str) -> Window {
        Window::init(runnel_sdk::parse_config(json).expect("valid config")).expect("init")
    }

    fn aggregate(record: &Record) -> Aggregate {
        assert_eq!(record.header(KIND_HEADER), Some(KIND_AGGREGATE));
        record.json().expect("an aggregate")
    }

    fn feed(stage: &mut Window, records: Vec<Record>) -> Vec<Record> {
        records
            .into_iter()
            .flat_map(|r| stage.process(r).expect("accepted"))
            .collect()
    }

    #[test]
    fn empty_config_table_gives_the_defaults() {
        let config: Config = runnel_sdk::parse_config("{}").expect("empty table");
        assert_eq!(config, Config::default());
        assert_eq!(config.size_ms, 60_000);
        assert_eq!(config.topic, "aggregates/{device}");
    }

    #[test]
    fn bad_configs_fail_init() {
        for (json, expected) in [
            (r#"{"size_ms": 0}"#, "size_ms must be positive, not 0"),
            (
                r#"{"grace_ms": -1}"#,
                "grace_ms must not be negative, not -1",
            ),
            (
                r#"{"metrics": []}"#,
                "metrics is empty; leave it out to aggregate every metric",
            ),
            (r#"{"topic": ""}"#, "topic must not be empty"),
        ] {
            let config = runnel_sdk::parse_config(json).expect("well formed");
            let err = Window::init(config).err().expect("init must fail");
            assert_eq!(err.message(), expected);
        }
        let err = runnel_sdk::parse_config::<Config>(r#"{"size": 5}"#).expect_err("typo");
        assert!(err.message().contains("unknown field `size`"), "{err}");
    }

    #[test]
    fn a_later_window_closes_the_open_one() {
        let mut stage = stage("{}");
        let out = feed(
            &mut stage,
            vec![
                reading("dev-1", T0, &[("temperature", 20.0), ("humidity", 40.0)]),
                reading("dev-1", T0 + 5_000, &[("temperature", 22.0)]),
                reading(
                    "dev-1",
                    T0 + 59_999,
                    &[("temperature", 24.0), ("humidity", 42.0)],
                ),
            ],
        );
        assert!(out.is_empty(), "window still open");

        let out = stage
            .process(reading("dev-1", T0 + 60_000, &[("temperature", 30.0)]))
            .expect("accepted");
        assert_eq!(out.len(), 2, "one aggregate per metric");
        // Sorted by metric name.
        let humidity = aggregate(&out[0]);
        let temperature = aggregate(&out[1]);
        assert_eq!(
            temperature,
            Aggregate {
                device: "dev-1".into(),
                metric: "temperature".into(),
                window_start: T0,
                window_end: T0 + 60_000,
                count: 3,
                min: 20.0,
                max: 24.0,
                mean: 22.0,
                unit: Some("C".into()),
            }
        );
        assert_eq!(humidity.metric, "humidity");
        assert_eq!((humidity.count, humidity.mean), (2, 41.0));
        assert_eq!(humidity.unit, None);
        assert_eq!(out[1].key.as_deref(), Some("dev-1"));
        assert_eq!(out[1].timestamp, Some(T0 + 60_000));
        assert_eq!(out[1].topic.as_deref(), Some("aggregates/dev-1"));
    }

    #[test]
    fn devices_have_their_own_windows() {
        let mut stage = stage("{}");
        let out = feed(
            &mut stage,
            vec![
                reading("dev-1", T0, &[("temperature", 1.0)]),
                reading("dev-2", T0 + 70_000, &[("temperature", 2.0)]),
                reading("dev-1", T0 + 10_000, &[("temperature", 3.0)]),
            ],
        );
        assert!(
            out.is_empty(),
            "dev-2 moving on does not close dev-1's window"
        );
    }

    #[test]
    fn flush_emits_windows_past_their_end_plus_grace() {
        let mut stage = stage(r#"{"grace_ms": 5000}"#);
        feed(
            &mut stage,
            vec![
                reading("dev-2", T0, &[("temperature", 1.0)]),
                reading("dev-1", T0 + 1_000, &[("temperature", 2.0)]),
                reading("dev-3", T0 + 60_000, &[("temperature", 3.0)]),
            ],
        );
        assert!(stage.flush(T0 + 64_999, false).expect("flush").is_empty());
        let out = stage.flush(T0 + 65_000, false).expect("flush");
        let devices: Vec<String> = out.iter().map(|r| aggregate(r).device).collect();
        assert_eq!(
            devices,
            ["dev-1", "dev-2"],
            "by device name; dev-3 still open"
        );
        assert!(
            stage.flush(T0 + 65_000, false).expect("flush").is_empty(),
            "once only"
        );
    }

    #[test]
    fn end_of_input_emits_every_open_window() {
        let mut stage = stage(r#"{"grace_ms": 1000000}"#);
        feed(
            &mut stage,
            vec![
                reading("dev-1", T0, &[("temperature", 1.0)]),
                reading("dev-2", T0, &[("temperature", 2.0)]),
            ],
        );
        let out = stage.flush(T0, true).expect("flush");
        assert_eq!(out.len(), 2);
        assert!(stage.flush(T0, true).expect("flush").is_empty());
    }

    #[test]
    fn late_readings_are_rejected() {
        let mut stage = stage("{}");
        feed(
            &mut stage,
            vec![
                reading("dev-1", T0 + 5_000, &[("temperature", 1.0)]),
                reading("dev-1", T0 + 65_000, &[("temperature", 2.0)]),
            ],
        );
        let err = stage
            .process(reading("dev-1", T0 + 10_000, &[("temperature", 3.0)]))
            .expect_err("late");
        assert_eq!(
            err.message(),
            format!(
                "dev-1: reading at {} is late: its window {T0}..{} already closed",
                T0 + 10_000,
                T0 + 60_000
            )
        );

        // After a flush too: the flushed window does not reopen.
        stage.flush(T0 + 120_000, false).expect("flush");
        let err = stage
            .process(reading("dev-1", T0 + 61_000, &[("temperature", 3.0)]))
            .expect_err("late");
        assert!(err.message().contains("is late"), "{err}");
        // A later window is fine.
        assert!(stage
            .process(reading("dev-1", T0 + 120_000, &[("temperature", 3.0)]))
            .is_ok());
    }

    #[test]
    fn a_skipped_window_cannot_be_filled_afterwards() {
        let mut stage = stage("{}");
        feed(
            &mut stage,
            vec![
                reading("dev-1", T0, &[("temperature", 1.0)]),
                reading("dev-1", T0 + 120_000, &[("temperature", 2.0)]),
            ],
        );
        let err = stage
            .process(reading("dev-1", T0 + 60_000, &[("temperature", 3.0)]))
            .expect_err("late");
        assert!(err.message().contains("is late"), "{err}");
    }

    #[test]
    fn a_unit_change_inside_a_window_is_rejected_and_leaves_no_trace() {
        let mut stage = stage("{}");
        stage
            .process(reading("dev-1", T0, &[("temperature", 20.0)]))
            .expect("accepted");
        let mut other = Reading {
            device: "dev-1".into(),
            ts: T0 + 1,
            metrics: BTreeMap::from([("temperature".to_string(), 70.0)]),
            units: BTreeMap::from([("temperature".to_string(), "F".to_string())]),
            tags: BTreeMap::new(),
        };
        let record = Record::from_json(&other)
            .expect("serialisable")
            .with_header(KIND_HEADER, KIND_READING);
        let err = stage.process(record).expect_err("mixed units");
        assert_eq!(
            err.message(),
            format!(
                "dev-1: temperature is in F, but its window {T0}..{} so far is in C",
                T0 + 60_000
            )
        );
        other.units.clear();
        let record = Record::from_json(&other)
            .expect("serialisable")
            .with_header(KIND_HEADER, KIND_READING);
        let err = stage.process(record).expect_err("mixed units");
        assert!(err.message().contains("is in no unit"), "{err}");

        let out = stage.flush(0, true).expect("flush");
        assert_eq!(aggregate(&out[0]).count, 1);
    }

    #[test]
    fn windows_align_to_the_epoch_also_before_it() {
        let mut stage = stage(r#"{"size_ms": 1000}"#);
        feed(&mut stage, vec![reading("d", -1, &[("t", 1.0)])]);
        let out = stage.flush(0, true).expect("flush");
        let got = aggregate(&out[0]);
        assert_eq!((got.window_start, got.window_end), (-1000, 0));
    }

    #[test]
    fn the_last_window_of_time_is_an_error_not_a_panic() {
        let mut stage = stage("{}");
        let err = stage
            .process(reading("d", i64::MAX - 1, &[("t", 1.0)]))
            .expect_err("overflow");
        assert!(err.message().starts_with("d: reading at"), "{err}");
    }

    #[test]
    fn only_the_chosen_metrics_and_topic_template() {
        let mut stage = stage(
            r#"{"metrics": ["temperature"], "topic": "agg/{device}/{metric}", "pass_through": true}"#,
        );
        let input = reading("dev-1", T0, &[("temperature", 20.0), ("humidity", 40.0)]);
        let out = stage.process(input.clone()).expect("accepted");
        assert_eq!(out, vec![input], "the reading goes on");
        // A reading with none of the chosen metrics neither opens nor closes a window.
        let other = reading("dev-1", T0 + 60_000, &[("humidity", 41.0)]);
        assert_eq!(stage.process(other.clone()).expect("accepted"), vec![other]);
        let out = stage.flush(T0, true).expect("flush");
        assert_eq!(out.len(), 1);
        assert_eq!(aggregate(&out[0]).metric, "temperature");
        assert_eq!(out[0].topic.as_deref(), Some("agg/dev-1/temperature"));
    }

    #[test]
    fn pass_through_puts_the_reading_after_the_aggregates() {
        let mut stage = stage(r#"{"pass_through": true}"#);
        stage
            .process(reading("d", T0, &[("t", 1.0)]))
            .expect("accepted");
        let next = reading("d", T0 + 60_000, &[("t", 2.0)]);
        let out = stage.process(next.clone()).expect("accepted");
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].header(KIND_HEADER), Some(KIND_AGGREGATE));
        assert_eq!(out[1], next);
    }

    #[test]
    fn other_records_pass_untouched() {
        let mut stage = stage("{}");
        let alert = Record::new("{}").with_header(KIND_HEADER, KIND_ALERT);
        assert_eq!(stage.process(alert.clone()).expect("passes"), vec![alert]);
        let broken = Record::new("nope")
            .with_key("dev-1")
            .with_header(KIND_HEADER, KIND_READING);
        let err = stage.process(broken).expect_err("not a reading");
        assert!(
            err.message()
                .starts_with("dev-1: payload is not a valid Reading"),
            "{err}"
        );
    }
}
