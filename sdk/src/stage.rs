use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::{Error, Record};

/// A stage: what runnel calls for every record that reaches it.
///
/// One instance lives for many batches, so fields hold state across records
/// (windows, running averages). If a call traps or runs past its deadline the
/// host throws the instance away and starts a fresh one with `init`.
///
/// ```
/// use runnel_sdk::{Error, Record, Stage};
///
/// #[derive(serde::Deserialize)]
/// struct Config { prefix: String }
///
/// struct Retopic { prefix: String }
///
/// impl Stage for Retopic {
///     type Config = Config;
///     fn init(config: Config) -> Result<Self, Error> {
///         Ok(Retopic { prefix: config.prefix })
///     }
///     fn process(&mut self, mut record: Record) -> Result<Vec<Record>, Error> {
///         let key = record.key.clone().unwrap_or_default();
///         record.topic = Some(format!("{}/{key}", self.prefix));
///         Ok(vec![record])
///     }
/// }
///
/// let mut stage = Retopic::init(Config { prefix: "out".into() }).unwrap();
/// let out = stage.process(Record::new("x").with_key("d1")).unwrap();
/// assert_eq!(out[0].topic.as_deref(), Some("out/d1"));
/// // In the stage crate, for wasm: runnel_sdk::export_stage!(Retopic);
/// ```
pub trait Stage: Sized + 'static {
    /// The stage's `[stage.config]` table, read once per instance.
    type Config: DeserializeOwned;

    /// Builds the stage from its config. An error here stops the pipeline
    /// from starting, with this message.
    fn init(config: Self::Config) -> Result<Self, Error>;

    /// Zero or more records for one input, or an error that sends the input
    /// to the dead letter with its message as the reason.
    fn process(&mut self, record: Record) -> Result<Vec<Record>, Error>;

    /// One result per input, in order. Override to work on a whole batch at once.
    fn process_batch(&mut self, batch: Vec<Record>) -> Vec<Result<Vec<Record>, Error>> {
        batch
            .into_iter()
            .map(|record| self.process(record))
            .collect()
    }

    /// Runs an encoded batch from the host and writes its encoded outcomes.
    /// The function-form attributes override it to read JSON payloads in
    /// place; a hand-written stage keeps this default.
    #[doc(hidden)]
    fn process_encoded(&mut self, batch: &[u8], out: &mut Vec<u8>) {
        crate::__private::process_owned(self, batch, out);
    }

    /// Called on the stage's timer with the pipeline clock, and once with
    /// `end_of_input` at the end of a finite input. Windowed stages emit
    /// the windows that have closed; the rest need not override it.
    fn flush(&mut self, now_ms: i64, end_of_input: bool) -> Result<Vec<Record>, Error> {
        let _ = (now_ms, end_of_input);
        Ok(Vec::new())
    }
}

/// The config of a stage that takes none: any key in its table is an error,
/// so a typo is caught when the pipeline starts.
#[derive(Debug, Default, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoConfig {}

/// Reads a stage's config the way the host hands it over (JSON text). A key
/// the config type has no field for is an error, as in the rest of the
/// pipeline file, whether or not the type says `deny_unknown_fields`: a typo
/// in an optional setting would otherwise leave its default in force
/// unnoticed. (A `#[serde(flatten)]` map takes extra keys, for a stage that
/// wants them.)
///
/// Not caught this way: keys inside what serde reads through a buffer, that
/// is a `#[serde(flatten)]` struct, an untagged enum or an internally tagged
/// one (`#[serde(tag = "...")]`). Mark those types `deny_unknown_fields`
/// (flattened ones cannot be; give them a field of their own instead).
pub fn parse_config<C: DeserializeOwned>(json: &str) -> Result<C, Error> {
    let mut reader = serde_json::Deserializer::from_str(json);
    let mut unknown = Vec::new();
    // serde_ignored writes `?` for the inside of an `Option`, which is not
    // a level of the table the author wrote.
    let mut note = |path: serde_ignored::Path<'_>| {
        let path = path.to_string();
        let levels: Vec<&str> = path.split('.').filter(|l| *l != "?").collect();
        unknown.push(levels.join("."));
    };
    let watched = serde_ignored::Deserializer::new(&mut reader, &mut note);
    let config = serde_path_to_error::deserialize(watched).map_err(|err| {
        // The place in the JSON the host made means nothing to the author
        // of the TOML table; the field's path says where.
        let path = err.path().to_string();
        let err = err.into_inner();
        let message = err.to_string();
        let place = format!(" at line {} column {}", err.line(), err.column());
        let message = message.strip_suffix(&place).unwrap_or(&message);
        // An unknown or missing field names itself; a wrong value does not.
        if path == "." || message.contains(&format!("`{path}`")) {
            Error::msg(format!("invalid stage config: {message}"))
        } else {
            Error::msg(format!("invalid stage config: {path}: {message}"))
        }
    })?;
    match unknown.first() {
        None => Ok(config),
        Some(first) => Err(Error::msg(format!(
            "invalid stage config: unknown field `{first}`"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default)]
    struct Config {
        skip_channels: Vec<u32>,
        limits: Limits,
        spare: Option<Limits>,
    }

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(default)]
    struct Limits {
        max: f64,
    }

    #[test]
    fn a_misspelt_key_is_an_error_without_deny_unknown_fields() {
        let err = parse_config::<Config>(r#"{"skip_chanels": [9]}"#).expect_err("typo");
        assert_eq!(
            err.to_string(),
            "invalid stage config: unknown field `skip_chanels`"
        );
        let err = parse_config::<Config>(r#"{"limits": {"mxa": 3}}"#).expect_err("nested");
        assert_eq!(
            err.to_string(),
            "invalid stage config: unknown field `limits.mxa`"
        );
        // The inside of an optional table is named as the author wrote it.
        let err = parse_config::<Config>(r#"{"spare": {"mx": 3}}"#).expect_err("in an option");
        assert_eq!(
            err.to_string(),
            "invalid stage config: unknown field `spare.mx`"
        );
        let config = parse_config::<Config>(r#"{"skip_channels": [9], "limits": {"max": 3}}"#)
            .expect("known keys");
        assert_eq!(config.skip_channels, [9]);
        assert_eq!(config.limits.max, 3.0);
    }

    #[test]
    fn a_wrong_value_names_its_field() {
        let err = parse_config::<Config>(r#"{"limits": {"max": "high"}}"#).expect_err("type");
        assert!(
            err.to_string()
                .starts_with("invalid stage config: limits.max: invalid type"),
            "{err}"
        );
    }
}
