//! runnel runs chains of stream-processing stages compiled to WebAssembly
//! components, fed by a source and feeding sinks, with every input ending as
//! outputs or in the dead letter with its reason.
//!
//! The binary is a thin shell over [`run::run`] and [`run::start_chain`]:
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! let pipeline = runnel::Pipeline::load(std::path::Path::new("demo/pipeline.toml"))?;
//! let summary = runnel::run(&pipeline, &runnel::RunOptions::default(), async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! assert_eq!(summary.inputs, summary.emitted + summary.filtered + summary.dead_lettered);
//! # Ok(())
//! # }
//! ```

pub mod chain;
pub mod codec;
pub mod config;
pub mod deadletter;
pub mod lambda;
pub mod logline;
pub mod metrics;
pub mod mqtt;
mod record;
pub mod run;
pub mod sink;
pub mod source;
pub mod wasm;

pub use config::Pipeline;
pub use run::{run, RunOptions, Summary};
pub use wasm::Record;

/// Milliseconds since `start`, to a tenth: start-up steps that take well
/// under a millisecond would all log as 0 in whole milliseconds.
pub(crate) fn ms_since(start: std::time::Instant) -> f64 {
    (start.elapsed().as_secs_f64() * 1e4).round() / 10.0
}

/// The longest start of `text` of at most `max` bytes that ends on a
/// character boundary.
pub(crate) fn cut_at_char(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// `text` cut to at most `max` bytes, saying how many it left out: what a
/// stage says is kept to a size the log and the dead letter can carry.
pub(crate) fn cut_text(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    let kept = cut_at_char(text, max);
    if kept.len() == text.len() {
        return std::borrow::Cow::Borrowed(text);
    }
    format!("{kept}… ({} bytes more)", text.len() - kept.len()).into()
}

/// This process's effective user id (0 where there is none).
pub(crate) fn user_id() -> u32 {
    #[cfg(unix)]
    {
        // SAFETY: geteuid has no preconditions and cannot fail.
        unsafe { libc::geteuid() }
    }
    #[cfg(not(unix))]
    0
}

/// An error and its causes on one line, each said once: errors that name
/// their cause in their own text (`cannot read X: E`) would else show it
/// twice.
pub fn error_text(err: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in err.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn text_is_cut_on_a_character_and_says_how_much_went() {
        assert_eq!(super::cut_text("short", 16), "short");
        // "é" is two bytes: a cut at 4 would split the second one.
        assert_eq!(super::cut_text("aéé", 4), "aé… (2 bytes more)");
        assert_eq!(super::cut_at_char("aéé", 4), "aé");
        assert_eq!(super::cut_at_char("aéé", 5), "aéé");
    }
}
