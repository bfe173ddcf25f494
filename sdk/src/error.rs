use std::fmt;

/// Why a stage rejected a record or failed to start.
///
/// The message becomes the dead-letter reason, so say what was wrong with
/// the record ("temperature 900 above maximum 150"), not where in the code.
/// Any `std::error::Error` converts into it with `?`, its causes joined by ": ".
pub struct Error {
    message: String,
}

/// `Result` with the SDK's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error with this message.
    pub fn msg(message: impl fmt::Display) -> Self {
        Error {
            message: message.to_string(),
        }
    }

    /// The message, as it will appear in the dead letter.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Puts `context` in front of the message: "context: message".
    pub fn context(self, context: impl fmt::Display) -> Self {
        Error {
            message: format!("{context}: {}", self.message),
        }
    }
}

// Like anyhow, `Error` itself does not implement `std::error::Error`, which is
// what lets every standard error convert into it with `?`.
impl<E: std::error::Error> From<E> for Error {
    fn from(err: E) -> Self {
        let mut message = err.to_string();
        let mut source = err.source();
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        Error { message }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Error({:?})", self.message)
    }
}

/// Returns early with an [`Error`] made from a format string.
///
/// ```
/// fn check(value: f64) -> runnel_sdk::Result<()> {
///     if value > 150.0 {
///         runnel_sdk::bail!("value {value} above maximum 150");
///     }
///     Ok(())
/// }
/// assert_eq!(check(900.0).unwrap_err().message(), "value 900 above maximum 150");
/// ```
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return ::core::result::Result::Err($crate::Error::msg(::core::format_args!($($arg)*)))
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn std_errors_convert_with_their_causes() {
        let err: Error = serde_json::from_str::<u32>("\"x\"")
            .expect_err("a string is no u32")
            .into();
        assert!(err.message().contains("invalid type"), "{err}");
    }

    #[test]
    fn context_goes_in_front() {
        let err = Error::msg("missing field `ts`").context("reading from dev-1");
        assert_eq!(err.to_string(), "reading from dev-1: missing field `ts`");
    }
}
