//! The text log's writer: one event, one line.
//!
//! Logged values come from records, stages and pipeline files, and the text
//! format writes them as they are: a reason holding a newline would start a
//! line that reads as an event of its own. Each event reaches the writer as
//! one buffer, so the writer escapes line breaks and other control
//! characters inside it, and only the event's own last newline is kept.

use std::io::{self, Write};

use tracing_subscriber::fmt::MakeWriter;

/// Writes each event to stderr as a single line.
#[derive(Clone, Copy, Debug)]
pub struct OneLinePerEvent {
    /// Colours are on: ESC then starts the formatter's own colour codes.
    pub ansi: bool,
}

impl<'a> MakeWriter<'a> for OneLinePerEvent {
    type Writer = EventWriter;

    fn make_writer(&'a self) -> EventWriter {
        EventWriter { ansi: self.ansi }
    }
}

pub struct EventWriter {
    ansi: bool,
}

impl Write for EventWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let line = one_line(buf, self.ansi);
        io::stderr().lock().write_all(&line)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// `event` with every control character but a tab (and ESC, when `ansi`)
/// escaped, except a newline that ends it.
pub fn one_line(event: &[u8], ansi: bool) -> std::borrow::Cow<'_, [u8]> {
    let body = event.strip_suffix(b"\n").unwrap_or(event);
    let plain = |b: u8| !b.is_ascii_control() || b == b'\t' || (ansi && b == 0x1b);
    if body.iter().copied().all(plain) {
        return std::borrow::Cow::Borrowed(event);
    }
    let mut line = Vec::with_capacity(event.len() + 16);
    for &b in body {
        match b {
            b'\n' => line.extend_from_slice(b"\\n"),
            b'\r' => line.extend_from_slice(b"\\r"),
            b if plain(b) => line.push(b),
            b => line.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
        }
    }
    if body.len() < event.len() {
        line.push(b'\n');
    }
    std::borrow::Cow::Owned(line)
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[test]
    fn a_value_with_line_breaks_stays_on_its_event_line() {
        let event = b"WARN dead letter reason=evil\n2026-11-23 INFO all good\r\n";
        assert_eq!(
            &*one_line(event, false),
            &b"WARN dead letter reason=evil\\n2026-11-23 INFO all good\\r\n"[..]
        );
    }

    #[test]
    fn other_control_characters_are_escaped_but_tabs_and_colours_kept() {
        assert_eq!(
            &*one_line(b"a\tb\x07c\x1b[1m\n", true),
            &b"a\tb\\x07c\x1b[1m\n"[..]
        );
        assert_eq!(&*one_line(b"a\x1b[1m\n", false), &b"a\\x1b[1m\n"[..]);
    }

    #[test]
    fn an_ordinary_line_is_written_as_it_is() {
        let event = "INFO stage loaded stage=\"parse\" ünïcode\n".as_bytes();
        assert!(matches!(
            one_line(event, false),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
