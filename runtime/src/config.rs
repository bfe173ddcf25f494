//! The pipeline file: one TOML document, parsed into types that cannot hold
//! a bad value, then checked as a whole before anything starts.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::mqtt::{pick_connection, ConnectionConfig, KeyPattern};
use crate::sink::SinkConfig;
use crate::source::SourceConfig;

/// Records per call into a stage when the file does not say.
pub const DEFAULT_BATCH_SIZE: usize = 64;
/// Per-call deadline when a stage does not set `timeout_ms`.
pub const DEFAULT_TIMEOUT_MS: u64 = 1000;
/// Memory cap per instance when a stage does not set `memory_mb`.
pub const DEFAULT_MEMORY_MB: u64 = 64;
/// How often timers (window flushes) run on a live clock.
pub const DEFAULT_TIMER_MS: u64 = 1000;

/// A parsed pipeline file, with where it came from.
#[derive(Debug)]
pub struct Pipeline {
    pub path: PathBuf,
    pub file: PipelineFile,
    source_text: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    #[serde(default)]
    pub pipeline: Settings,
    pub source: SourceConfig,
    #[serde(rename = "stage", default)]
    pub stages: Vec<StageConfig>,
    pub sink: SinkConfig,
    /// Where records that cannot go on are written; a file next to the
    /// pipeline when not set, so nothing is ever dropped unseen.
    pub dead_letter: Option<SinkConfig>,
    /// MQTT connections by name, used by sources and sinks of type "mqtt".
    #[serde(default)]
    pub mqtt: BTreeMap<String, ConnectionConfig>,
    /// An HTTP endpoint serving the run's figures for Prometheus.
    pub metrics: Option<MetricsConfig>,
}

/// The `[metrics]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address to serve `GET /metrics` on, e.g. `127.0.0.1:9464`.
    pub listen: Spanned<String>,
}

impl MetricsConfig {
    pub fn address(&self) -> Result<std::net::SocketAddr, String> {
        self.listen.get_ref().parse().map_err(|_| {
            format!(
                "metrics.listen must be an IP address and port such as 127.0.0.1:9464, not \"{}\"",
                self.listen.get_ref()
            )
        })
    }
}

/// The `[pipeline]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// A name for logs and metrics.
    #[serde(default = "default_name")]
    pub name: String,
    /// Records per call into a stage.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How often timers run on a live clock, in milliseconds.
    #[serde(default = "default_timer_ms")]
    pub timer_ms: u64,
    /// Where compiled stages are cached, relative to the pipeline file;
    /// the user's cache folder when not set.
    pub cache_dir: Option<PathBuf>,
    /// The most records one stage may output for one batch.
    #[serde(default = "default_max_batch_outputs")]
    pub max_batch_outputs: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            name: default_name(),
            batch_size: DEFAULT_BATCH_SIZE,
            timer_ms: DEFAULT_TIMER_MS,
            cache_dir: None,
            max_batch_outputs: DEFAULT_MAX_BATCH_OUTPUTS,
        }
    }
}

/// A million tiny records are about a quarter of a GB of the host's memory
/// once they are records for the sinks.
pub const DEFAULT_MAX_BATCH_OUTPUTS: usize = 1_000_000;

fn default_max_batch_outputs() -> usize {
    DEFAULT_MAX_BATCH_OUTPUTS
}

fn default_name() -> String {
    "pipeline".into()
}
fn default_batch_size() -> usize {
    DEFAULT_BATCH_SIZE
}
fn default_timer_ms() -> u64 {
    DEFAULT_TIMER_MS
}

/// One `[[stage]]` table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StageConfig {
    pub name: Spanned<StageName>,
    /// The component, relative to the pipeline file.
    pub wasm: Spanned<PathBuf>,
    /// Deadline for one call, in milliseconds.
    pub timeout_ms: Option<Spanned<u64>>,
    /// Memory cap of one instance, in MiB.
    pub memory_mb: Option<Spanned<u64>>,
    /// Handed to the stage's `init`, as JSON.
    #[serde(default)]
    pub config: toml::Table,
}

impl StageConfig {
    pub fn timeout_ms(&self) -> u64 {
        self.timeout_ms
            .as_ref()
            .map_or(DEFAULT_TIMEOUT_MS, |t| *t.get_ref())
    }

    pub fn memory_mb(&self) -> u64 {
        self.memory_mb
            .as_ref()
            .map_or(DEFAULT_MEMORY_MB, |m| *m.get_ref())
    }

    /// The `config` table as the JSON text `init` receives. A TOML date or
    /// time becomes its RFC 3339 text, as JSON has none; serialised as it
    /// is, it would be toml's own one-field map, which no field reads.
    pub fn config_json(&self) -> String {
        fn to_json(value: &toml::Value) -> serde_json::Value {
            use serde_json::Value as J;
            match value {
                toml::Value::String(s) => J::String(s.clone()),
                toml::Value::Integer(i) => J::from(*i),
                toml::Value::Float(f) => J::from(*f),
                toml::Value::Boolean(b) => J::Bool(*b),
                toml::Value::Datetime(d) => J::String(d.to_string()),
                toml::Value::Array(items) => J::Array(items.iter().map(to_json).collect()),
                toml::Value::Table(table) => {
                    J::Object(table.iter().map(|(k, v)| (k.clone(), to_json(v))).collect())
                }
            }
        }
        let table = self
            .config
            .iter()
            .map(|(k, v)| (k.clone(), to_json(v)))
            .collect::<serde_json::Map<_, _>>();
        serde_json::Value::Object(table).to_string()
    }
}

/// A stage name: what logs, metrics and dead letters call the stage, so it
/// is kept to letters, digits, `-` and `_`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StageName(String);

impl StageName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StageName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for StageName {
    type Error = String;
    fn try_from(name: String) -> Result<Self, String> {
        let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
        if name.is_empty() || name.len() > 64 {
            return Err(format!("stage name `{name}` must be 1 to 64 characters"));
        }
        if !name.chars().all(ok_char) {
            return Err(format!(
                "stage name `{name}` may hold only letters, digits, `-` and `_`"
            ));
        }
        Ok(StageName(name))
    }
}

impl<'de> Deserialize<'de> for StageName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        StageName::try_from(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A problem in a pipeline file: where it is, and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read pipeline {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

impl Pipeline {
    /// Reads, parses and checks a pipeline file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, text)
    }

    /// Parses and checks pipeline text; `path` names it in errors and anchors
    /// relative paths.
    pub fn parse(path: &Path, text: String) -> Result<Self, ConfigError> {
        let file: PipelineFile = toml::from_str(&text).map_err(|err| ConfigError::Parse {
            path: path.to_owned(),
            message: unknown_key_at_its_line(&text, &err)
                .unwrap_or_else(|| parse_message(&err) + &single_bracket_hint(&text, &err)),
        })?;
        let mut pipeline = Pipeline {
            path: path.to_owned(),
            file,
            source_text: text,
        };
        pipeline.check()?;
        pipeline.name_connections();
        Ok(pipeline)
    }

    /// What the file allows but is likely a mistake, one sentence each.
    pub fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        if let (
            SourceConfig::Mqtt {
                connection: from,
                topics,
                ..
            },
            SinkConfig::Mqtt {
                connection: to,
                topic: None,
                ..
            },
        ) = (&self.file.source, &self.file.sink)
        {
            if from == to {
                warnings.push(format!(
                    "{}: [sink] publishes each output to its record's own topic on connection \
                     `{}`, which the source subscribes to ({}): an output whose topic no stage \
                     changed comes back as an input, again and again; set the sink's topic, \
                     e.g. topic = \"out/{{topic}}\"",
                    self.path.display(),
                    from.as_deref().unwrap_or_default(),
                    topics.join(", ")
                ));
            }
        }
        if let SourceConfig::Lambda { event } = self.file.source {
            warnings.extend(self.lambda_warnings(event));
        }
        warnings.extend(self.mqtt_warnings());
        warnings
    }

    /// A key pattern no subscribed topic fits, and a sink template whose
    /// topics the source subscribes to on the same connection.
    fn mqtt_warnings(&self) -> Vec<String> {
        use crate::mqtt::{filter_matches, KeyPattern, TopicTemplate};
        let SourceConfig::Mqtt {
            connection: from,
            topics,
            key,
            ..
        } = &self.file.source
        else {
            return Vec::new();
        };
        let mut warnings = Vec::new();
        let file = self.path.display();
        let filters: Vec<&str> = topics
            .iter()
            .map(|filter| match filter.strip_prefix("$share/") {
                Some(rest) => rest.split_once('/').map_or(rest, |(_, f)| f),
                None => filter,
            })
            .collect();
        // A topic each filter takes, its wildcards filled with a level no
        // real topic is likely to hold.
        let samples: Vec<String> = filters
            .iter()
            .map(|filter| filter.replace(['+', '#'], "runnel-sample"))
            .collect();
        if let Some(pattern) = key.as_deref().and_then(|k| KeyPattern::parse(k).ok()) {
            if !filters.iter().any(|filter| pattern.could_fit(filter)) {
                warnings.push(format!(
                    "{file}: [source] key = \"{}\" fits none of its topics ({}): no record \
                     gets a key",
                    key.as_deref().unwrap_or_default(),
                    topics.join(", ")
                ));
            }
        }
        if let SinkConfig::Mqtt {
            connection: to,
            topic: Some(template),
            ..
        } = &self.file.sink
        {
            let parsed = TopicTemplate::parse(template).ok();
            let feeds_back = samples.iter().find_map(|sample| {
                let mut record = crate::Record::new(Vec::new());
                record.key = Some("runnel-sample-key".into());
                record.topic = Some(sample.clone());
                let out = parsed.as_ref()?.render(&record).ok()?;
                topics
                    .iter()
                    .any(|filter| filter_matches(filter, &out))
                    .then_some(out)
            });
            if let (true, Some(out)) = (from == to, feeds_back) {
                warnings.push(format!(
                    "{file}: [sink] topic = \"{template}\" makes topics such as `{out}`, which \
                     the source subscribes to ({}) on the same connection: each output comes \
                     back as an input, again and again",
                    topics.join(", ")
                ));
            }
        }
        warnings
    }

    /// Environment variables the MQTT connections name that are not set
    /// here: `run` stops on them.
    pub fn missing_env(&self) -> Vec<String> {
        let mut missing = Vec::new();
        for (name, connection) in &self.file.mqtt {
            let vars = [
                ("username_env", &connection.username_env),
                ("password_env", &connection.password_env),
            ];
            for (field, var) in vars {
                let Some(var) = var else { continue };
                if std::env::var(var.get_ref()).is_err() {
                    missing.push(format!(
                        "{}: {}",
                        self.path.display(),
                        crate::mqtt::unset_env(name, field, var.get_ref())
                    ));
                }
            }
        }
        missing
    }

    fn lambda_warnings(&self, event: crate::lambda::EventShape) -> Vec<String> {
        use crate::lambda::EventShape;
        let mut warnings = Vec::new();
        let file = self.path.display();
        if matches!(self.file.sink, SinkConfig::None {})
            && !matches!(event, EventShape::Http | EventShape::Raw)
        {
            warnings.push(format!(
                "{file}: [sink] type = \"none\": the answer to an SQS, Kinesis or Kafka event \
                 names only the records that failed, so if such events come, their outputs are \
                 counted and dropped (as are an IoT rule's, which does not read the answer); \
                 only HTTP and direct invocations get them back; send them on with an mqtt, \
                 http or stdout sink"
            ));
        }
        let sinks = [
            ("[sink]", Some(&self.file.sink)),
            ("[dead_letter]", self.file.dead_letter.as_ref()),
        ];
        for (table, sink) in sinks {
            if let Some(SinkConfig::File { path, .. }) = sink {
                if !path.starts_with("/tmp") {
                    warnings.push(format!(
                        "{file}: {table} writes to {}, but on AWS Lambda only /tmp can be \
                         written: there the function would fail to start",
                        path.display()
                    ));
                }
            }
        }
        for (name, connection) in &self.file.mqtt {
            if let Some(spool) = connection.spool.as_ref() {
                if !spool.path.starts_with("/tmp") {
                    warnings.push(format!(
                        "{file}: [mqtt.{name}.spool] path is {}, but on AWS Lambda only /tmp \
                         can be written: there the function would fail to start",
                        spool.path.display()
                    ));
                }
            }
        }
        warnings
    }

    /// Where the dead letters go: its `[dead_letter]`, or by default the
    /// file beside it; under Lambda, whose task folder is read-only,
    /// standard output, which Lambda sends to CloudWatch Logs.
    pub fn dead_letter_sink(&self) -> std::borrow::Cow<'_, SinkConfig> {
        match &self.file.dead_letter {
            Some(sink) => std::borrow::Cow::Borrowed(sink),
            None if matches!(self.file.source, SourceConfig::Lambda { .. }) => {
                std::borrow::Cow::Owned(SinkConfig::Stdout { format: None })
            }
            None => std::borrow::Cow::Owned(SinkConfig::File {
                path: crate::run::DEFAULT_DEAD_LETTER.into(),
                format: None,
            }),
        }
    }

    /// The folder relative paths in the file are taken from; empty for the
    /// current folder, so paths print as the user wrote them.
    pub fn base_dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new(""))
    }

    /// A path from the file, made relative to the pipeline's folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.base_dir().join(path)
    }

    /// An error pointing at a place in the file.
    pub fn error_at(
        &self,
        span: std::ops::Range<usize>,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = line_col(&self.source_text, span.start);
        ConfigError::Invalid {
            path: self.path.clone(),
            line,
            column,
            message: message.into(),
        }
    }

    /// An error a stage gave while starting, at the place it is about: the
    /// key of its `[stage.config]` that the error names (an unknown field,
    /// or the path of a wrong value) when that key is found under the stage,
    /// the `[stage.config]` header for a missing field, else the stage's
    /// name.
    pub fn stage_error(&self, name: &str, message: String) -> ConfigError {
        let stages = &self.file.stages;
        let Some(index) = stages
            .iter()
            .position(|s| s.name.get_ref().as_str() == name)
        else {
            return self.error_at(0..0, message);
        };
        let name_span = stages[index].name.span();
        let unknown = message
            .split("unknown field `")
            .nth(1)
            .and_then(|rest| rest.split('`').next())
            .map(last_level);
        // A wrong value: the SDK puts the field's path before the reason.
        let wrong = || {
            let rest = message.split("invalid stage config: ").nth(1)?;
            let (path, _) = rest.split_once(": ")?;
            (!path.is_empty() && !path.contains(' ')).then(|| last_level(path))
        };
        // This stage's part of the file: up to the next stage's name.
        let end = stages
            .get(index + 1)
            .map_or(self.source_text.len(), |next| next.name.span().start);
        let part = self.source_text.get(name_span.start..end).unwrap_or("");
        let config_at = find_at_line_start(part, "[stage.config");
        let Some(key) = unknown.clone().or_else(wrong) else {
            // A field left out has no line of its own: its table's header.
            let span = match config_at {
                Some(at) if message.contains("missing field") => {
                    name_span.start + at..name_span.start + at + "[stage.config]".len()
                }
                _ => name_span,
            };
            return self.error_at(span, message);
        };
        let message = if unknown.is_some()
            && matches!(key.as_str(), "name" | "wasm" | "timeout_ms" | "memory_mb")
        {
            format!(
                "{message}\nhint: `{key}` is a setting of the stage itself: put it above \
                 [stage.config]"
            )
        } else {
            message
        };
        // From its `[stage.config]` on, where the stage's own `wasm` or
        // `name` line, above it, is not taken for the key.
        let config_at = config_at.unwrap_or(0);
        let from = name_span.start + config_at;
        let span = find_key(&part[config_at..], &key)
            .map_or(name_span.clone(), |at| from + at..from + at + key.len());
        self.error_at(span, message)
    }

    fn check(&self) -> Result<(), ConfigError> {
        let settings = &self.file.pipeline;
        if settings.batch_size == 0 || settings.batch_size > 65_536 {
            return Err(self.error_at(
                self.span_of("batch_size"),
                format!(
                    "pipeline.batch_size must be 1 to 65536, not {}",
                    settings.batch_size
                ),
            ));
        }
        if settings.max_batch_outputs == 0 {
            return Err(self.error_at(
                self.span_of("max_batch_outputs"),
                "pipeline.max_batch_outputs must be 1 or more",
            ));
        }
        if settings.timer_ms == 0 {
            return Err(self.error_at(
                self.span_of("timer_ms"),
                "pipeline.timer_ms must be above 0",
            ));
        }
        let mut seen = HashSet::new();
        for stage in &self.file.stages {
            let name = stage.name.get_ref();
            if !seen.insert(name.clone()) {
                return Err(self.error_at(
                    stage.name.span(),
                    format!("stage name `{name}` is used twice"),
                ));
            }
            if let Some(t) = &stage.timeout_ms {
                if *t.get_ref() == 0 || *t.get_ref() > 600_000 {
                    return Err(self.error_at(
                        t.span(),
                        format!(
                            "stage `{name}`: timeout_ms must be 1 to 600000, not {}",
                            t.get_ref()
                        ),
                    ));
                }
            }
            if let Some(m) = &stage.memory_mb {
                if *m.get_ref() == 0 || *m.get_ref() > 4096 {
                    return Err(self.error_at(
                        m.span(),
                        format!(
                            "stage `{name}`: memory_mb must be 1 to 4096, not {}",
                            m.get_ref()
                        ),
                    ));
                }
            }
            let wasm = self.resolve(stage.wasm.get_ref());
            if !wasm.is_file() {
                let what = if wasm.is_dir() {
                    "is a directory, not a .wasm file"
                } else {
                    "not found"
                };
                return Err(self.error_at(
                    stage.wasm.span(),
                    format!("stage `{name}`: wasm file {} {what}", wasm.display()),
                ));
            }
        }
        if let SourceConfig::File { path, .. } = &self.file.source {
            // A run would stop at once; `check` says so first, and where.
            let file = self.resolve(path);
            let what = if file.is_dir() {
                Some("is a directory")
            } else if !file.exists() {
                Some("does not exist")
            } else {
                None
            };
            if let Some(what) = what {
                return Err(self.error_at(
                    self.span_in("source", "path"),
                    format!("source: file {} {what}", file.display()),
                ));
            }
            // Appending to the file being read feeds every output back in,
            // with no end on a file that grows faster than it is read.
            let dead_letter = self.dead_letter_sink();
            let sinks = [("sink", &self.file.sink), ("dead_letter", &*dead_letter)];
            for (table, sink) in sinks {
                if let SinkConfig::File { path: out, .. } = sink {
                    if same_file(&file, &self.resolve(out)) {
                        // The default dead letter has no line of its own.
                        let (span, note) = match self.file.dead_letter {
                            None if table == "dead_letter" => (
                                self.span_in("source", "path"),
                                " (the default dead letter: give [dead_letter] a path of its own)",
                            ),
                            _ => (self.span_in(table, "path"), ""),
                        };
                        return Err(self.error_at(
                            span,
                            format!(
                                "{table}: file {} is the source's own file{note}: each line \
                                 written would be read again as an input, without end",
                                self.resolve(out).display()
                            ),
                        ));
                    }
                }
            }
        }
        if let Some(metrics) = &self.file.metrics {
            metrics
                .address()
                .map_err(|message| self.error_at(metrics.listen.span(), message))?;
        }
        self.check_mqtt()
    }

    /// Fills in the connection of MQTT sources and sinks that leave it out,
    /// which `check` allowed only when there is exactly one.
    fn name_connections(&mut self) {
        let Some(only) = self.file.mqtt.keys().next().cloned() else {
            return;
        };
        if let SourceConfig::Mqtt { connection, .. } = &mut self.file.source {
            connection.get_or_insert_with(|| only.clone());
        }
        for sink in std::iter::once(&mut self.file.sink).chain(self.file.dead_letter.as_mut()) {
            if let SinkConfig::Mqtt { connection, .. } = sink {
                connection.get_or_insert_with(|| only.clone());
            }
        }
    }

    fn check_mqtt(&self) -> Result<(), ConfigError> {
        let mqtt = &self.file.mqtt;
        for (name, connection) in mqtt {
            connection
                .check(name, self.base_dir())
                .map_err(|e| self.error_at(e.span, e.message))?;
        }
        let embedded = mqtt
            .values()
            .filter(|c| c.broker.get_ref() == "embedded")
            .count();
        if embedded > 1 {
            return Err(self.error_at(
                self.span_of("broker"),
                "only one connection may use broker = \"embedded\"",
            ));
        }
        if let SourceConfig::Mqtt {
            connection,
            topics,
            qos,
            key,
        } = &self.file.source
        {
            let at = |key: &str, message: String| {
                self.error_at(self.span_of(key), format!("source: {message}"))
            };
            pick_connection(mqtt, connection.as_deref()).map_err(|m| {
                self.error_at(
                    self.connection_span("source", connection.is_some()),
                    format!("source: {m}"),
                )
            })?;
            if topics.is_empty() || topics.iter().any(|t| t.is_empty()) {
                return Err(at(
                    "topics",
                    "topics must list at least one topic filter".into(),
                ));
            }
            for filter in topics {
                crate::mqtt::check_filter(filter).map_err(|m| at("topics", m))?;
            }
            if *qos > 1 {
                return Err(at("qos", format!("qos must be 0 or 1, not {qos}")));
            }
            if let Some(key) = key {
                KeyPattern::parse(key).map_err(|m| at("key", m))?;
            }
        }
        let sinks = [
            ("sink", Some(&self.file.sink)),
            ("dead_letter", self.file.dead_letter.as_ref()),
        ];
        for (role, sink) in sinks {
            let Some(SinkConfig::Mqtt {
                connection,
                topic,
                qos,
                ..
            }) = sink
            else {
                continue;
            };
            let at = |message: String| {
                self.error_at(self.span_in(role, "topic"), format!("{role}: {message}"))
            };
            pick_connection(mqtt, connection.as_deref()).map_err(|m| {
                self.error_at(
                    self.connection_span(role, connection.is_some()),
                    format!("{role}: {m}"),
                )
            })?;
            if role == "dead_letter" && topic.is_none() {
                // The default, each record's own topic, would send a dead
                // letter back where its input came from.
                return Err(at(
                    "an MQTT dead letter needs a topic, e.g. topic = \"dead-letter/{key}\"".into(),
                ));
            }
            crate::sink::topic_template(topic.as_deref()).map_err(&at)?;
            if *qos > 1 {
                return Err(at(format!("qos must be 0 or 1, not {qos}")));
            }
        }
        Ok(())
    }

    /// The span of the first `key =` in the file, for settings whose value
    /// has no span of its own; the start of the file when absent.
    fn span_of(&self, key: &str) -> std::ops::Range<usize> {
        find_key(&self.source_text, key).map_or(0..0, |i| i..i + key.len())
    }

    /// Where a table names its connection, or its `type` when it names none.
    fn connection_span(&self, table: &str, named: bool) -> std::ops::Range<usize> {
        self.span_in(table, if named { "connection" } else { "type" })
    }

    /// Where `key` is set in the `[table]` table; the file's start if nowhere.
    fn span_in(&self, table: &str, key: &str) -> std::ops::Range<usize> {
        let text = &self.source_text;
        let header = format!("[{table}]");
        let Some(start) = find_at_line_start(text, &header) else {
            return 0..0;
        };
        let body = table_body(text, start + header.len());
        find_key(&text[body.clone()], key).map_or(start..body.start, |i| {
            body.start + i..body.start + i + key.len()
        })
    }
}

/// The last level of a field's path, `max` of `limits.max` or `ranges[2]`'s
/// `ranges`: the key as it stands on its line.
fn last_level(path: &str) -> String {
    let last = path.rsplit('.').next().unwrap_or(path);
    last.split('[').next().unwrap_or(last).to_string()
}

/// Whether two paths name one existing file, links included.
fn same_file(a: &Path, b: &Path) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
            _ => false,
        }
    }
    #[cfg(not(unix))]
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The text of a table from the end of its header to the next header.
fn table_body(text: &str, header_end: usize) -> std::ops::Range<usize> {
    let end = text[header_end..]
        .find("\n[")
        .map_or(text.len(), |n| header_end + n);
    header_end..end
}

/// Where `key = ...` is written at the start of a line (not in a comment or a value).
fn find_key(text: &str, key: &str) -> Option<usize> {
    text.match_indices(key).map(|(i, _)| i).find(|&i| {
        at_line_start(text, i)
            && text[i + key.len()..]
                .trim_start_matches([' ', '\t'])
                .starts_with('=')
    })
}

fn find_at_line_start(text: &str, what: &str) -> Option<usize> {
    text.match_indices(what)
        .map(|(i, _)| i)
        .find(|&i| at_line_start(text, i))
}

fn at_line_start(text: &str, i: usize) -> bool {
    let line_start = text[..i].rfind('\n').map_or(0, |n| n + 1);
    text[line_start..i].trim().is_empty()
}

/// toml's message already says line, column and shows the line; keep it,
/// but drop its own "TOML parse error" heading, since ours names the file.
fn parse_message(err: &toml::de::Error) -> String {
    let message = err.to_string();
    message
        .strip_prefix("TOML parse error at ")
        .map(|rest| rest.to_string())
        .unwrap_or(message)
        .trim_end()
        .to_string()
}

/// `[stage]` where `[[stage]]` was meant reads as one table where a list of
/// them is expected, which serde says in its own words.
fn single_bracket_hint(text: &str, err: &toml::de::Error) -> String {
    let at = err.span().and_then(|span| text.get(span));
    if err.message().contains("expected a sequence") && at == Some("[stage]") {
        "\nhint: each stage is a `[[stage]]` table, with two brackets".to_string()
    } else {
        String::new()
    }
}

/// An unknown key, or a value no variant takes, in a table whose `type`
/// picks its fields (`[source]`, `[sink]`, `[dead_letter]`) is reported by
/// serde at the table's header; point at the key or the value instead, as
/// for any other table.
fn unknown_key_at_its_line(text: &str, err: &toml::de::Error) -> Option<String> {
    let header = err.span()?;
    if !text.get(header.clone())?.starts_with('[') {
        return None;
    }
    let body = table_body(text, header.end);
    let named = |prefix: &str| {
        err.message()
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('`').next())
    };
    let span = if let Some(key) = named("unknown field `") {
        let at = body.start + find_key(&text[body], key)?;
        at..at + key.len()
    } else if let Some(value) = named("unknown variant `") {
        let quoted = format!("\"{value}\"");
        let at = body.start + text[body].find(&quoted)?;
        at..at + quoted.len()
    } else {
        return None;
    };
    Some(snippet(text, span, err.message()))
}

/// The file's line at `span`, marked, then `message`: the layout toml's own
/// errors use, so every error about the file reads the same.
fn snippet(text: &str, span: std::ops::Range<usize>, message: &str) -> String {
    let (line, column) = line_col(text, span.start);
    let content = text.lines().nth(line - 1).unwrap_or("");
    let gutter = " ".repeat(line.to_string().len());
    let pad = " ".repeat(column - 1);
    let marks = "^".repeat(span.len().max(1));
    format!("line {line}, column {column}\n{gutter} |\n{line} | {content}\n{gutter} | {pad}{marks}\n{message}")
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column_count_from_one() {
        let text = "a = 1\nbb = 2\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 6), (2, 1));
        assert_eq!(line_col(text, 9), (2, 4));
    }

    #[test]
    fn a_stage_gets_toml_dates_and_times_as_rfc_3339_text() {
        let wasm = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/ui/not-wasm.wasm");
        let text = format!(
            "[source]\ntype = \"stdin\"\n[sink]\ntype = \"stdout\"\n\
             [[stage]]\nname = \"s\"\nwasm = {wasm:?}\n\
             [stage.config]\nsince = 2026-01-01T10:00:00Z\nn = 3\n\
             shifts = [{{ start = 07:30:00, day = 2026-01-02 }}]\n"
        );
        let pipeline = Pipeline::parse(Path::new("p.toml"), text).expect("valid");
        let config: serde_json::Value =
            serde_json::from_str(&pipeline.file.stages[0].config_json()).expect("json");
        assert_eq!(
            config,
            serde_json::json!({
                "since": "2026-01-01T10:00:00Z",
                "n": 3,
                "shifts": [{ "start": "07:30:00", "day": "2026-01-02" }],
            })
        );
    }

    #[test]
    fn a_sink_that_feeds_its_own_source_is_warned_of() {
        let text = |sink_topic: &str| {
            format!(
                "[mqtt.local]\nbroker = \"mqtt://127.0.0.1:1883\"\n\
                 [source]\ntype = \"mqtt\"\ntopics = [\"cmd/#\"]\n\
                 [sink]\ntype = \"mqtt\"\n{sink_topic}"
            )
        };
        let looping = Pipeline::parse(Path::new("p.toml"), text("")).expect("valid");
        let warnings = looping.warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].starts_with("p.toml: [sink] publishes each output to its record's own topic on connection `local`"), "{}", warnings[0]);
        assert!(warnings[0].contains("(cmd/#)"), "{}", warnings[0]);
        let elsewhere =
            Pipeline::parse(Path::new("p.toml"), text("topic = \"out/{key}\"\n")).expect("valid");
        assert_eq!(elsewhere.warnings(), Vec::<String>::new());
    }

    #[test]
    fn files_a_lambda_function_cannot_write_are_warned_of() {
        let text = |spool: &str, dead: &str| {
            format!(
                "[mqtt.up]\nbroker = \"mqtt://127.0.0.1:1883\"\n\
                 [mqtt.up.spool]\npath = \"{spool}\"\nwhen_full = \"refuse-new\"\n\
                 [source]\ntype = \"lambda\"\n\
                 [sink]\ntype = \"mqtt\"\ntopic = \"out/x\"\n\
                 [dead_letter]\ntype = \"file\"\npath = \"{dead}\"\n"
            )
        };
        let parse = |spool, dead| {
            Pipeline::parse(Path::new("p.toml"), text(spool, dead))
                .expect("valid")
                .warnings()
        };
        let warnings = parse("spool", "dead.jsonl");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings[0].contains("[dead_letter] writes to dead.jsonl"),
            "{warnings:?}"
        );
        assert!(
            warnings[1].contains("[mqtt.up.spool] path is spool"),
            "{warnings:?}"
        );
        assert!(warnings
            .iter()
            .all(|w| w.contains("only /tmp can be written")));
        assert_eq!(parse("/tmp/spool", "/tmp/dead.jsonl"), Vec::<String>::new());
    }

    #[test]
    fn a_key_pattern_no_topic_fits_and_a_template_that_loops_are_warned_of() {
        let text = |key: &str, sink_topic: &str| {
            format!(
                "[mqtt.local]\nbroker = \"mqtt://127.0.0.1:1883\"\n\
                 [source]\ntype = \"mqtt\"\ntopics = [\"loop/+/data\"]\nkey = \"{key}\"\n\
                 [sink]\ntype = \"mqtt\"\ntopic = \"{sink_topic}\"\n"
            )
        };
        let parse =
            |key, topic| Pipeline::parse(Path::new("p.toml"), text(key, topic)).expect("valid");
        let warnings = parse("other/{key}/x", "out/{key}").warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("fits none of its topics (loop/+/data)"),
            "{}",
            warnings[0]
        );
        let warnings = parse("loop/{key}/data", "loop/out/{topic}").warnings();
        assert_eq!(warnings.len(), 0, "{warnings:?}");
        let warnings = parse("loop/{key}/data", "loop/{key}/data").warnings();
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(
            warnings[0].contains("such as `loop/runnel-sample-key/data`"),
            "{}",
            warnings[0]
        );
        assert!(parse("loop/{key}/data", "out/{key}").warnings().is_empty());
        // Wildcards where the pattern has words: some topics fit.
        assert!(parse("+/{key}/#", "out/{key}").warnings().is_empty());
    }

    #[test]
    fn stage_names_reject_spaces_and_slashes() {
        assert!(StageName::try_from("parse-v2".to_string()).is_ok());
        assert!(StageName::try_from("my stage".to_string()).is_err());
        assert!(StageName::try_from("a/b".to_string()).is_err());
        assert!(StageName::try_from(String::new()).is_err());
    }
}
