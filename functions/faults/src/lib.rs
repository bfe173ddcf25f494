//! Misbehaves on the records whose payload names a fault, and passes the
//! rest through, so a test sees the host survive it and go on.
//!
//! Payloads: `panic`, `loop` (never returns), `sleep` (sleeps for a minute,
//! waiting in the host rather than running), `hog` (allocates without
//! bound), `reject`, `write-file`, `read-env` (reports what environment it
//! sees), `connect` (opens a TCP connection), `print` (writes to stdout and
//! stderr, the last line with no newline), `fan N` (emits N records), `chatter N` (logs N lines and one of
//! 100 KB, then passes), `panic-at-flush` (passes, then its next flush panics), `miscount` (the whole batch's answer leaves out its last outcome).
//! Config: `fail_init = "reason"` makes `init` fail.

use runnel_sdk::{Error, Record, Stage};
use serde::Deserialize;

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub fail_init: Option<String>,
}

pub struct Faults {
    hoard: Vec<Vec<u8>>,
    panic_at_flush: bool,
}

impl Stage for Faults {
    type Config = Config;

    fn init(config: Config) -> Result<Self, Error> {
        if let Some(reason) = config.fail_init {
            return Err(Error::msg(reason));
        }
        Ok(Faults {
            hoard: Vec::new(),
            panic_at_flush: false,
        })
    }

    fn flush(&mut self, _now_ms: i64, _end_of_input: bool) -> Result<Vec<Record>, Error> {
        self.flush_or_panic()
    }

    fn process_batch(&mut self, batch: Vec<Record>) -> Vec<Result<Vec<Record>, Error>> {
        let miscount = batch.iter().any(|r| r.payload == b"miscount");
        let mut outcomes: Vec<_> = batch.into_iter().map(|r| self.process(r)).collect();
        if miscount {
            outcomes.pop();
        }
        outcomes
    }

    fn process(&mut self, record: Record) -> Result<Vec<Record>, Error> {
        match record.payload.as_slice() {
            b"panic" => panic!("asked to panic"),
            b"loop" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            b"sleep" => {
                std::thread::sleep(std::time::Duration::from_secs(60));
                Ok(vec![record])
            }
            b"hog" => loop {
                self.hoard.push(vec![1u8; 1 << 20]);
            },
            b"reject" => Err(Error::msg("asked to reject")),
            b"panic-at-flush" => {
                self.panic_at_flush = true;
                Ok(vec![record])
            }
            b"write-file" => {
                std::fs::write("/tmp/runnel-escape", b"x")
                    .map_err(|e| Error::msg(format!("cannot write a file: {e}")))?;
                Ok(vec![record])
            }
            b"connect" => {
                std::net::TcpStream::connect("127.0.0.1:9")
                    .map_err(|e| Error::msg(format!("cannot connect: {e}")))?;
                Ok(vec![Record::new("connected")])
            }
            b"read-env" => {
                let seen: Vec<String> = std::env::vars().map(|(k, _)| k).collect();
                Ok(vec![Record::new(format!("env: [{}]", seen.join(",")))])
            }
            b"print" => {
                println!("hello from stdout");
                eprintln!("hello from stderr");
                // A last line with no newline must not be lost.
                print!("goodbye without a newline");
                let _ = std::io::Write::flush(&mut std::io::stdout());
                Ok(vec![record])
            }
            payload if payload.starts_with(b"chatter ") => {
                let count: usize = std::str::from_utf8(&payload[8..])
                    .ok()
                    .and_then(|n| n.trim().parse().ok())
                    .ok_or_else(|| Error::msg("chatter takes a count"))?;
                for i in 0..count {
                    runnel_sdk::log::log(runnel_sdk::log::Level::Info, &format!("chatter {i}"));
                }
                runnel_sdk::log::log(runnel_sdk::log::Level::Warn, &"y".repeat(100_000));
                Ok(vec![record])
            }
            payload => match payload.strip_prefix(b"fan ") {
                // `fan N`: N records, for a test of what a fan-out hands on.
                Some(count) => {
                    let count: usize = std::str::from_utf8(count)
                        .ok()
                        .and_then(|n| n.trim().parse().ok())
                        .ok_or_else(|| Error::msg("fan takes a count"))?;
                    Ok((0..count)
                        .map(|i| Record::new(format!("copy {i}")))
                        .collect())
                }
                None => Ok(vec![record]),
            },
        }
    }
}

impl Faults {
    fn flush_or_panic(&mut self) -> Result<Vec<Record>, Error> {
        if self.panic_at_flush {
            panic!("asked to panic at the next flush");
        }
        Ok(Vec::new())
    }
}

runnel_sdk::export_stage!(Faults);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_fails_when_asked() {
        let err = Faults::init(Config {
            fail_init: Some("no".into()),
        })
        .err()
        .expect("init must fail");
        assert_eq!(err.message(), "no");
    }

    #[test]
    fn a_miscount_answers_one_outcome_short() {
        let mut stage = Faults::init(Config::default()).expect("init");
        let batch = vec![Record::new("a"), Record::new("miscount"), Record::new("b")];
        assert_eq!(stage.process_batch(batch).len(), 2);
    }

    #[test]
    fn ordinary_records_pass() {
        let mut stage = Faults::init(Config::default()).expect("init");
        let out = stage.process(Record::new("ok")).expect("passes");
        assert_eq!(out, vec![Record::new("ok")]);
    }
}
