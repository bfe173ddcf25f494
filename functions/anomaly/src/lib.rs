//! Raises an [`Alert`] when a value lies far from what its device usually
//! reports for that metric.
//!
//! "Usually" is an exponentially weighted mean and variance per device and
//! metric: recent values count most, with weight `alpha`. Once a series has
//! `warmup` values, a value more than `threshold` standard deviations from
//! the mean gives an alert record, emitted after the reading itself; the
//! reading always goes on.
//!
//! The anomalous value then updates the mean and variance like any other.
//! A one-off spike widens the variance for a while and barely moves the
//! mean; a real level shift (a heater switched on) alerts at least once,
//! and as the variance widens it becomes the new normal instead of alerting
//! forever. A series that has been flat (a constant, or a sensor that
//! reports whole numbers) alerts on its first step away; a value too large
//! for the statistics alerts but is left out of them. Leaving
//! anomalies out of the statistics would make a shift alert on every reading.
//!
//! Records that are not readings pass untouched.

use std::collections::HashMap;

use reading::{decode_reading, derived_record, is_reading, render_topic, Alert, KIND_ALERT};
use runnel_sdk::{bail, Error, Record, Stage};
use serde::Deserialize;

#[derive(Deserialize, Debug, Clone, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Weight of the newest value in the mean and variance, in (0, 1].
    pub alpha: f64,
    /// Standard deviations from the mean beyond which a value is anomalous.
    pub threshold: f64,
    /// Values a series needs before it can alert, so the first few do not.
    pub warmup: u64,
    /// Metrics to watch; all when left out.
    pub metrics: Option<Vec<String>>,
    /// Topic of the alerts: `{device}` and `{metric}` are filled in.
    pub topic: String,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            alpha: 0.1,
            threshold: 3.0,
            warmup: 10,
            metrics: None,
            topic: "alerts/{device}".into(),
        }
    }
}

/// Exponentially weighted mean and variance of one series.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ewma {
    pub count: u64,
    pub mean: f64,
    pub variance: f64,
}

impl Ewma {
    fn first(value: f64) -> Self {
        Ewma {
            count: 1,
            mean: value,
            variance: 0.0,
        }
    }

    /// The incremental form (Finch, "Incremental calculation of weighted
    /// mean and variance", 2009): one pass, no history kept.
    /// A value so far out that the statistics would overflow (1e308 in a
    /// series near 20) is left out of them: an infinite variance would hide
    /// every later anomaly.
    fn update(&mut self, value: f64, alpha: f64) {
        let diff = value - self.mean;
        let step = alpha * diff;
        let mean = self.mean + step;
        let variance = (1.0 - alpha) * (self.variance + diff * step);
        if mean.is_finite() && variance.is_finite() {
            self.mean = mean;
            self.variance = variance;
        }
        self.count = self.count.saturating_add(1);
    }

    /// How many standard deviations `value` lies from the mean. A series
    /// that has not varied yet gets a spread of a few ulps of its mean, so
    /// a step away from a flat line scores high rather than never; the
    /// score is kept finite, as JSON has no infinity.
    fn score(&self, value: f64) -> f64 {
        let floor = f64::EPSILON * self.mean.abs().max(1.0);
        let score = (value - self.mean).abs() / self.stddev().max(floor);
        if score.is_finite() {
            score
        } else {
            f64::MAX
        }
    }

    pub fn stddev(&self) -> f64 {
        self.variance.sqrt()
    }
}

pub struct Anomaly {
    config: Config,
    /// Device to metric to its statistics.
    series: HashMap<String, HashMap<String, Ewma>>,
}

impl Stage for Anomaly {
    type Config = Config;

    fn init(config: Config) -> Result<Self, Error> {
        // Written so that NaN fails too.
        if !(config.alpha > 0.0 && config.alpha <= 1.0) {
            bail!("alpha must be above 0 and at most 1, not {}", config.alpha);
        }
        if !(config.threshold > 0.0 && config.threshold.is_finite()) {
            bail!(
                "threshold must be a positive number, not {}",
                config.threshold
            );
        }
        if config.metrics.as_ref().is_some_and(Vec::is_empty) {
            bail!("metrics is empty; leave it out to watch every metric");
        }
        if config.topic.is_empty() {
            bail!("topic must not be empty");
        }
        Ok(Anomaly {
            config,
            series: HashMap::new(),
        })
    }

    fn process(&mut self, record: Record) -> Result<Vec<Record>, Error> {
        if !is_reading(&record) {
            return Ok(vec![record]);
        }
        let reading = decode_reading(&record)?;
        let device = reading.device.as_str();
        let config = &self.config;
        let series = self.series.entry(reading.device.clone()).or_default();
        let mut alerts = Vec::new();
        // `metrics` is a BTreeMap, so alerts come out in metric-name order.
        for (metric, &value) in &reading.metrics {
            let wanted = config
                .metrics
                .as_ref()
                .is_none_or(|wanted| wanted.contains(metric));
            // A non-finite value would poison the statistics for good.
            if !wanted || !value.is_finite() {
                continue;
            }
            let Some(stats) = series.get_mut(metric) else {
                series.insert(metric.clone(), Ewma::first(value));
                continue;
            };
            if stats.count >= config.warmup {
                let score = stats.score(value);
                if score > config.threshold {
                    let alert = Alert {
                        device: device.to_string(),
                        metric: metric.clone(),
                        ts: reading.ts,
                        value,
                        expected: stats.mean,
                        score,
                        threshold: config.threshold,
                    };
                    let topic = render_topic(&config.topic, device, metric);
                    alerts.push(derived_record(
                        KIND_ALERT, &alert, device, reading.ts, topic,
                    )?);
                }
            }
            stats.update(value, config.alpha);
        }
        let mut out = Vec::with_capacity(1 + alerts.len());
        out.push(record);
        out.extend(alerts);
        Ok(out)
    }
}

impl Anomaly {
    /// The statistics of one series, for tests and debugging.
    pub fn stats(&self, device: &str, metric: &str) -> Option<Ewma> {
        self.series.get(device)?.get(metric).copied()
    }
}

runnel_sdk::export_stage!(Anomaly);

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use reading::{Reading, KIND_AGGREGATE, KIND_HEADER, KIND_READING};

    const T0: i64 = 1_767_225_600_000;

    fn reading(device: &str, ts: i64, metrics: &[(&str, f64)]) -> Record {
        let reading = Reading {
            device: device.into(),
            ts,
            metrics: metrics.iter().map(|(m, v)| (m.to_string(), *v)).collect(),
            units: BTreeMap::new(),
            tags: BTreeMap::new(),
        };
        Record::from_json(&reading)
            .expect("serialisable")
            .with_key(device)
            .with_timestamp(ts)
            .with_topic("sensors/in")
            .with_header(KIND_HEADER, KIND_READING)
    }

    fn stage(json: &str) -> Anomaly {
        Anomaly::init(runnel_sdk::parse_config(json).expect("valid config")).expect("init")
    }

    /// A steady series with a little noise, so the deviation is not zero.
    fn steady(i: usize) -> f64 {
        21.5 + [0.0, 0.1, -0.1, 0.2, -0.2][i % 5]
    }

    /// Feeds `n` steady temperatures to `device`, asserting no alerts.
    fn warm_up(stage: &mut Anomaly, device: &str, n: usize) {
        for i in 0..n {
            let out = stage
                .process(reading(
                    device,
                    T0 + i as i64 * 5_000,
                    &[("temperature", steady(i))],
                ))
                .expect("accepted");
            assert_eq!(out.len(), 1, "no alert on steady value {i}");
        }
    }

    fn alert(record: &Record) -> Alert {
        assert_eq!(record.header(KIND_HEADER), Some(KIND_ALERT));
        record.json().expect("an alert")
    }

    #[test]
    fn empty_config_table_gives_the_defaults() {
        let config: Config = runnel_sdk::parse_config("{}").expect("empty table");
        assert_eq!(config, Config::default());
        assert_eq!(
            (config.alpha, config.threshold, config.warmup),
            (0.1, 3.0, 10)
        );
    }

    #[test]
    fn bad_configs_fail_init() {
        for (json, expected) in [
            (
                r#"{"alpha": 0}"#,
                "alpha must be above 0 and at most 1, not 0",
            ),
            (
                r#"{"alpha": 1.5}"#,
                "alpha must be above 0 and at most 1, not 1.5",
            ),
            (
                r#"{"alpha": -0.1}"#,
                "alpha must be above 0 and at most 1, not -0.1",
            ),
            (
                r#"{"threshold": 0}"#,
                "threshold must be a positive number, not 0",
            ),
            (
                r#"{"metrics": []}"#,
                "metrics is empty; leave it out to watch every metric",
            ),
            (r#"{"topic": ""}"#, "topic must not be empty"),
        ] {
            let config = runnel_sdk::parse_config(json).expect("well formed");
            let err = Anomaly::init(config).err().expect("init must fail");
            assert_eq!(err.message(), expected);
        }
        let config = Config {
            alpha: f64::NAN,
            ..Config::default()
        };
        assert!(Anomaly::init(config).is_err(), "NaN alpha");
        assert!(Anomaly::init(Config {
            alpha: 1.0,
            ..Config::default()
        })
        .is_ok());
        let err = runnel_sdk::parse_config::<Config>(r#"{"window": 5}"#).expect_err("typo");
        assert!(err.message().contains("unknown field `window`"), "{err}");
    }

    #[test]
    fn ewma_follows_the_incremental_formulas() {
        let mut stats = Ewma::first(10.0);
        stats.update(20.0, 0.5);
        // mean 10 + 0.5*10 = 15; variance 0.5 * (0 + 10*5) = 25
        assert_eq!(
            stats,
            Ewma {
                count: 2,
                mean: 15.0,
                variance: 25.0
            }
        );
        stats.update(15.0, 0.5);
        assert_eq!(
            stats,
            Ewma {
                count: 3,
                mean: 15.0,
                variance: 12.5
            }
        );
    }

    #[test]
    fn a_spike_after_warmup_alerts_after_the_reading() {
        let mut stage = stage("{}");
        warm_up(&mut stage, "dev-1", 12);
        let before = stage.stats("dev-1", "temperature").expect("tracked");
        let input = reading(
            "dev-1",
            T0 + 60_000,
            &[("temperature", 35.0), ("humidity", 40.0)],
        );
        let out = stage.process(input.clone()).expect("accepted");
        assert_eq!(out.len(), 2);
        assert_eq!(out[0], input, "the reading comes first, unchanged");
        let got = alert(&out[1]);
        assert_eq!(got.device, "dev-1");
        assert_eq!(got.metric, "temperature");
        assert_eq!(got.ts, T0 + 60_000);
        assert_eq!(got.value, 35.0);
        // serde_json's fast float parsing may be one ulp off the written value.
        assert!((got.expected - before.mean).abs() < 1e-9);
        assert!((got.score - (35.0 - before.mean).abs() / before.stddev()).abs() < 1e-6);
        assert!(got.score > 3.0);
        assert_eq!(got.threshold, 3.0);
        assert_eq!(out[1].key.as_deref(), Some("dev-1"));
        assert_eq!(out[1].timestamp, Some(T0 + 60_000));
        assert_eq!(out[1].topic.as_deref(), Some("alerts/dev-1"));
    }

    #[test]
    fn no_alert_during_warmup() {
        let mut stage = stage(r#"{"warmup": 10}"#);
        warm_up(&mut stage, "dev-1", 9);
        let out = stage
            .process(reading("dev-1", T0, &[("temperature", 100.0)]))
            .expect("accepted");
        assert_eq!(out.len(), 1, "only 9 values seen before it");
    }

    #[test]
    fn a_flat_series_alerts_on_its_first_step_away_and_not_before() {
        let mut stage = stage(r#"{"warmup": 2}"#);
        for i in 0..5 {
            let out = stage
                .process(reading("d", T0 + i, &[("t", 20.0)]))
                .expect("accepted");
            assert_eq!(out.len(), 1, "the same value is no anomaly");
        }
        let out = stage
            .process(reading("d", T0 + 9, &[("t", 500.0)]))
            .expect("accepted");
        assert_eq!(out.len(), 2, "a step from a flat line is one");
        let alert: Alert = out[1].json().expect("an alert");
        assert!(alert.score.is_finite() && alert.score > 3.0, "{alert:?}");
    }

    #[test]
    fn a_value_too_large_for_the_statistics_alerts_and_leaves_them_usable() {
        let mut stage = stage("{}");
        warm_up(&mut stage, "dev-1", 20);
        let before = stage.stats("dev-1", "temperature").expect("tracked");
        let out = stage
            .process(reading("dev-1", T0 + 200_000, &[("temperature", 1e308)]))
            .expect("accepted");
        assert_eq!(out.len(), 2);
        // The alert reads back: its score is a number, not JSON's null.
        let alert: Alert = out[1].json().expect("an alert");
        assert_eq!(alert.score, f64::MAX);
        let after = stage.stats("dev-1", "temperature").expect("tracked");
        assert_eq!((after.mean, after.variance), (before.mean, before.variance));
        let out = stage
            .process(reading("dev-1", T0 + 205_000, &[("temperature", 1000.0)]))
            .expect("accepted");
        assert_eq!(out.len(), 2, "a later spike still alerts");
    }

    #[test]
    fn the_anomaly_updates_the_stats_so_a_level_shift_settles() {
        let mut stage = stage("{}");
        warm_up(&mut stage, "dev-1", 20);
        let before = stage.stats("dev-1", "temperature").expect("tracked");
        let mut alerts = 0;
        let mut last_alert = 0;
        for i in 0..60 {
            let value = 35.0 + steady(i) - 21.5;
            let out = stage
                .process(reading(
                    "dev-1",
                    T0 + 200_000 + i as i64,
                    &[("temperature", value)],
                ))
                .expect("accepted");
            if out.len() > 1 {
                alerts += 1;
                last_alert = i;
            }
            if i == 0 {
                let after = stage.stats("dev-1", "temperature").expect("tracked");
                assert!(after.mean > before.mean, "the spike moved the mean");
                assert!(after.variance > before.variance, "and widened the variance");
            }
        }
        assert!(alerts >= 1, "the shift alerted");
        assert!(
            last_alert < 10,
            "and stopped soon: last alert at {last_alert}"
        );
        let now = stage.stats("dev-1", "temperature").expect("tracked");
        assert!((now.mean - 35.0).abs() < 0.5, "new normal {}", now.mean);
    }

    #[test]
    fn series_are_per_device_and_metric() {
        let mut stage = stage("{}");
        warm_up(&mut stage, "dev-1", 12);
        // dev-2's first value is not compared with dev-1's statistics.
        let out = stage
            .process(reading("dev-2", T0, &[("temperature", 70.0)]))
            .expect("accepted");
        assert_eq!(out.len(), 1);
        // Nor is a new metric of dev-1.
        let out = stage
            .process(reading("dev-1", T0, &[("pressure", 1013.0)]))
            .expect("accepted");
        assert_eq!(out.len(), 1);
        assert_eq!(stage.stats("dev-1", "pressure").map(|s| s.count), Some(1));
        assert_eq!(
            stage.stats("dev-1", "temperature").map(|s| s.count),
            Some(12)
        );
    }

    #[test]
    fn several_metrics_alert_in_name_order() {
        let mut stage = stage(r#"{"warmup": 5, "topic": "alerts/{device}/{metric}"}"#);
        for i in 0..8 {
            stage
                .process(reading(
                    "d",
                    T0 + i as i64,
                    &[("b", steady(i)), ("a", steady(i + 1))],
                ))
                .expect("accepted");
        }
        let out = stage
            .process(reading("d", T0 + 100, &[("b", 90.0), ("a", -90.0)]))
            .expect("accepted");
        let metrics: Vec<String> = out[1..].iter().map(|r| alert(r).metric).collect();
        assert_eq!(metrics, ["a", "b"]);
        assert_eq!(out[1].topic.as_deref(), Some("alerts/d/a"));
    }

    #[test]
    fn only_the_chosen_metrics_are_watched() {
        let mut stage = stage(r#"{"metrics": ["humidity"], "warmup": 0}"#);
        for i in 0..12 {
            stage
                .process(reading("d", T0 + i as i64, &[("temperature", steady(i))]))
                .expect("accepted");
        }
        assert_eq!(stage.stats("d", "temperature"), None);
    }

    #[test]
    fn other_records_pass_untouched() {
        let mut stage = stage("{}");
        let aggregate = Record::new("{}").with_header(KIND_HEADER, KIND_AGGREGATE);
        assert_eq!(
            stage.process(aggregate.clone()).expect("passes"),
            vec![aggregate]
        );
        let broken = Record::new("{")
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
