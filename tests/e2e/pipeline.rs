//! The real binary running real stages end to end.

use std::path::{Path, PathBuf};

use runnel_tests::{
    read_json_lines, repo_dir, run_binary, run_binary_with, stage, stages_dir, summary_numbers,
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_runnel");

/// The demo pipeline, pointed at the built stages and the demo data, with
/// its dead letter in `dir`.
fn demo_pipeline(dir: &Path) -> PathBuf {
    let text =
        std::fs::read_to_string(repo_dir().join("demo/pipeline.toml")).expect("demo pipeline");
    let stages = format!("{}/", stages_dir().display());
    let sensors = repo_dir().join("demo/sensors.jsonl");
    let text = text
        .replace("../functions/target/wasm32-wasip2/release/", &stages)
        .replace(
            "\"sensors.jsonl\"",
            &format!("{:?}", sensors.display().to_string()),
        );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).expect("write pipeline");
    path
}

fn by_kind<'a>(outputs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    outputs
        .iter()
        .filter(|o| o["headers"]["kind"] == kind)
        .collect()
}

#[test]
fn demo_pipeline_accounts_for_every_reading() {
    let dir = tempfile::tempdir().expect("temp dir");
    demo_pipeline(dir.path());
    let run = run_binary(Path::new(BIN), dir.path(), &["run", "pipeline.toml"], b"");
    assert_eq!(run.status, Some(0), "{}", run.stderr);

    let outputs = run.json_lines();
    let aggregates = by_kind(&outputs, "aggregate");
    let alerts = by_kind(&outputs, "alert");
    // 3 devices x 3 one-minute windows x 2 metrics each; the last window of
    // each device comes from the end-of-input flush.
    assert_eq!(aggregates.len(), 18, "{}", run.stdout);
    assert_eq!(alerts.len(), 1, "{}", run.stdout);
    assert_eq!(alerts[0]["key"], "dev-1");
    assert_eq!(alerts[0]["payload"]["metric"], "temperature");
    assert_eq!(alerts[0]["topic"], "alerts/dev-1");
    let dev2_temp = aggregates
        .iter()
        .find(|a| a["key"] == "dev-2" && a["payload"]["metric"] == "temperature")
        .expect("dev-2 temperature window");
    assert_eq!(dev2_temp["payload"]["unit"], "C", "Fahrenheit converted");

    let dead = read_json_lines(&dir.path().join("out/dead-letter.jsonl"));
    let reasons: Vec<(&str, &str)> = dead
        .iter()
        .map(|d| {
            (
                d["stage"].as_str().unwrap_or(""),
                d["reason"].as_str().unwrap_or(""),
            )
        })
        .collect();
    // In the input's order: on the event clock a batch is cut after each
    // record that moves the clock a timer_ms on, and these readings are
    // seconds apart.
    assert_eq!(
        reasons,
        vec![
            ("validate", "dev-3: temperature 900 C above maximum 125"),
            (
                "parse",
                "dev-2: column `temperature` is \"abc\", not a number"
            ),
            (
                "parse",
                "dev-3: payload is not valid JSON: EOF while parsing a value at line 1 column 47"
            ),
        ]
    );
    assert_eq!(
        dead[0]["record"]["key"], "dev-3",
        "the record is kept whole"
    );

    let n = summary_numbers(run.summary());
    let lines = std::fs::read_to_string(repo_dir().join("demo/sensors.jsonl")).expect("demo data");
    assert_eq!(n[0], lines.lines().count() as u64, "every line counted in");
    assert_eq!(
        n[0],
        n[1] + n[2] + n[3],
        "in = output + filtered + dead: {}",
        run.summary()
    );
    assert_eq!(n[3], 3);
    assert_eq!(n[4], outputs.len() as u64);
    assert_eq!(n[6], 3);
}

#[test]
fn check_loads_and_starts_every_stage() {
    let dir = tempfile::tempdir().expect("temp dir");
    demo_pipeline(dir.path());
    let run = run_binary(Path::new(BIN), dir.path(), &["check", "pipeline.toml"], b"");
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(
        run.stdout.trim(),
        "pipeline.toml: ok, 5 stage(s) loaded and started"
    );
    assert!(
        !dir.path().join("out").exists(),
        "check reads and writes no records"
    );
}

#[test]
fn stdin_to_stdout_keeps_order_per_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pipeline = format!(
        r#"
[pipeline]
batch_size = 7
[source]
type = "stdin"
format = "record"
[[stage]]
name = "pass"
wasm = {:?}
[sink]
type = "stdout"
"#,
        stage("passthrough").display().to_string()
    );
    std::fs::write(dir.path().join("p.toml"), pipeline).expect("write");
    let mut input = String::new();
    for i in 0..500 {
        input.push_str(&format!(
            "{{\"key\":\"k{}\",\"headers\":{{\"seq\":\"{i}\"}},\"payload\":{{\"n\":{i}}}}}\n",
            i % 7
        ));
    }
    let run = run_binary(
        Path::new(BIN),
        dir.path(),
        &["run", "p.toml"],
        input.as_bytes(),
    );
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let outputs = run.json_lines();
    assert_eq!(outputs.len(), 500);
    for key in 0..7 {
        let seqs: Vec<u64> = outputs
            .iter()
            .filter(|o| o["key"] == format!("k{key}"))
            .map(|o| o["payload"]["n"].as_u64().expect("n"))
            .collect();
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted, "key k{key} out of order");
    }
    assert_eq!(outputs[0]["headers"]["seq"], "0", "headers carried through");

    // With JSON logs, every line on stderr is JSON, the summary included.
    let run = run_binary(
        Path::new(BIN),
        dir.path(),
        &["--log-format", "json", "run", "p.toml"],
        input.as_bytes(),
    );
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let logged: Vec<Value> = run
        .stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}")))
        .collect();
    assert!(
        logged
            .iter()
            .any(|l| l["fields"]["message"] == "500 in: 500 produced output, 0 filtered, 0 dead-lettered; 500 out (0 from timers); 0 dead-letter entries"),
        "{}",
        run.stderr
    );

    // RUST_LOG filters the log, not runnel's own report: as in a text log,
    // the summary is there whatever it says.
    let run = run_binary_with(
        Path::new(BIN),
        dir.path(),
        &["--log-format", "json", "run", "p.toml"],
        input.as_bytes(),
        &[("RUST_LOG", "off")],
    );
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert!(
        run.stderr
            .contains(r#""message":"500 in: 500 produced output"#),
        "{}",
        run.stderr
    );
}

#[test]
fn what_a_record_says_cannot_start_a_line_of_the_text_log() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pipeline = format!(
        "[source]\ntype = \"stdin\"\n[[stage]]\nname = \"parse\"\nwasm = {:?}\n[sink]\ntype = \"stdout\"\n",
        stage("parse")
    );
    std::fs::write(dir.path().join("p.toml"), pipeline).expect("write");
    // parse's reason names the device; this one holds a whole forged line.
    let forged = "2026-01-01T00:00:00.000000Z  INFO runnel::run: all good";
    let input = format!("{{\"device\":\"evil\\n{forged}\\r\\u001b[2K\",\"temperature\":1}}\n");
    let run = run_binary(
        Path::new(BIN),
        dir.path(),
        &["run", "p.toml"],
        input.as_bytes(),
    );
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let dead_letter = run
        .stderr
        .lines()
        .find(|line| line.contains("dead letter"))
        .unwrap_or_else(|| panic!("no dead letter logged:\n{}", run.stderr));
    assert!(
        dead_letter.contains(&format!("evil\\n{forged}\\r\\x1b[2K")),
        "{dead_letter}"
    );
    assert!(
        !run.stderr.lines().any(|line| line.starts_with(forged)),
        "{}",
        run.stderr
    );
}

#[test]
fn a_metrics_port_already_taken_stops_the_start_and_says_which() {
    let dir = tempfile::tempdir().expect("temp dir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("address").port();
    let pipeline = format!(
        "[source]\ntype = \"stdin\"\n[sink]\ntype = \"file\"\npath = \"out.jsonl\"\n\
         [metrics]\nlisten = \"127.0.0.1:{port}\"\n"
    );
    std::fs::write(dir.path().join("p.toml"), pipeline).expect("write");
    let run = run_binary(Path::new(BIN), dir.path(), &["run", "p.toml"], b"{}\n");
    assert_eq!(run.status, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "p.toml: metrics.listen: cannot listen on 127.0.0.1:{port}"
        )),
        "{}",
        run.stderr
    );
    for file in ["out.jsonl", "dead-letter.jsonl"] {
        assert!(!dir.path().join(file).exists(), "{file} was not opened");
    }
}

/// `runnel check` of the pipeline in `dir` with this cache and `RUNNEL_CPU`
/// (unset when `None`): its exit code and stderr.
fn check_with_cache(dir: &Path, cache: &Path, cpu: Option<&str>) -> (Option<i32>, String) {
    let mut command = std::process::Command::new(BIN);
    command
        .args(["check", "pipeline.toml"])
        .current_dir(dir)
        .env("RUNNEL_CACHE_DIR", cache)
        .env("RUST_LOG", "info")
        .env_remove("RUNNEL_CPU")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if let Some(cpu) = cpu {
        command.env("RUNNEL_CPU", cpu);
    }
    let child = command.spawn().expect("run check");
    let _guard = runnel_tests::Watchdog::new(child.id());
    let out = child.wait_with_output().expect("wait for check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn cache_entries(cache: &Path) -> std::collections::BTreeSet<std::ffi::OsString> {
    std::fs::read_dir(cache)
        .expect("cache dir")
        .map(|entry| entry.expect("cache entry").file_name())
        .collect()
}

#[test]
fn second_start_loads_stages_from_the_compile_cache() {
    let dir = tempfile::tempdir().expect("temp dir");
    demo_pipeline(dir.path());
    let cache = dir.path().join("cache");
    let (code, first) = check_with_cache(dir.path(), &cache, None);
    assert_eq!(code, Some(0), "{first}");
    assert_eq!(first.matches("from_cache=false").count(), 5, "{first}");
    let (code, second) = check_with_cache(dir.path(), &cache, None);
    assert_eq!(code, Some(0), "{second}");
    assert_eq!(second.matches("from_cache=true").count(), 5, "{second}");
    assert_eq!(
        cache_entries(&cache).len(),
        5,
        "one compiled file per distinct stage"
    );
}

/// `check --no-cache` compiles every stage and leaves the cache alone.
#[test]
fn check_without_the_cache_compiles_and_stores_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    demo_pipeline(dir.path());
    let cache = dir.path().join("cache");
    let out = std::process::Command::new(BIN)
        .args(["check", "--no-cache", "pipeline.toml"])
        .current_dir(dir.path())
        .env("RUNNEL_CACHE_DIR", &cache)
        .env("RUST_LOG", "info")
        .output()
        .expect("run check");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stderr.matches("from_cache=false").count(), 5, "{stderr}");
    assert!(!cache.exists(), "nothing is written to the cache");
}

/// A stage file rebuilt in place is compiled again, not served from the
/// cache entry of its old contents, and the old entry stays for a rollback.
#[test]
fn a_stage_rebuilt_in_place_is_compiled_again() {
    let dir = tempfile::tempdir().expect("temp dir");
    let wasm = dir.path().join("stage.wasm");
    std::fs::copy(runnel_tests::stage("passthrough"), &wasm).expect("copy stage");
    std::fs::write(
        dir.path().join("pipeline.toml"),
        "[source]\ntype = \"stdin\"\n[sink]\ntype = \"stdout\"\n[[stage]]\nname = \"one\"\nwasm = \"stage.wasm\"\n",
    )
    .expect("write pipeline");
    let cache = dir.path().join("cache");
    let (code, out) = check_with_cache(dir.path(), &cache, None);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("from_cache=false"), "{out}");
    let (code, out) = check_with_cache(dir.path(), &cache, None);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("from_cache=true"), "{out}");

    std::fs::copy(runnel_tests::stage("validate"), &wasm).expect("replace stage");
    let (code, out) = check_with_cache(dir.path(), &cache, None);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("from_cache=false"), "{out}");
    assert_eq!(cache_entries(&cache).len(), 2, "one entry per content");
}

/// A cache made with RUNNEL_CPU=portable (as a Lambda package's is) holds
/// entries of its own, apart from this machine's native ones, and a second
/// portable start loads them.
#[test]
fn portable_cpu_target_has_its_own_cache_entries() {
    let dir = tempfile::tempdir().expect("temp dir");
    demo_pipeline(dir.path());
    let native_cache = dir.path().join("native");
    let portable_cache = dir.path().join("portable");
    let (code, out) = check_with_cache(dir.path(), &native_cache, Some("native"));
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = check_with_cache(dir.path(), &portable_cache, Some("portable"));
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.matches("from_cache=false").count(), 5, "{out}");
    let (code, out) = check_with_cache(dir.path(), &portable_cache, Some("portable"));
    assert_eq!(code, Some(0), "{out}");
    assert_eq!(out.matches("from_cache=true").count(), 5, "{out}");
    let native = cache_entries(&native_cache);
    let portable = cache_entries(&portable_cache);
    assert_eq!(portable.len(), 5);
    assert!(
        native.is_disjoint(&portable),
        "portable code must not share cache keys with native code"
    );

    let (code, out) = check_with_cache(dir.path(), &portable_cache, Some("fast"));
    assert_eq!(code, Some(2), "an unknown RUNNEL_CPU is an invalid setting");
    assert!(
        out.contains(r#"RUNNEL_CPU is "fast"; expected "native" or "portable""#),
        "{out}"
    );
}

/// A pipeline reading record lines from stdin through parse and a 1 s window.
fn live_window_pipeline(dir: &Path) {
    let pipeline = format!(
        r#"
[pipeline]
timer_ms = 100
[source]
type = "stdin"
format = "record"
[[stage]]
name = "parse"
wasm = {:?}
[[stage]]
name = "window"
wasm = {:?}
[stage.config]
size_ms = 1000
[sink]
type = "stdout"
"#,
        stage("parse").display().to_string(),
        stage("window").display().to_string()
    );
    std::fs::write(dir.join("p.toml"), pipeline).expect("write pipeline");
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// `runnel run p.toml` in `dir`, fed on stdin as the test goes, its stdout
/// read line by line; killed if the test fails first.
struct LiveRun {
    child: std::process::Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    /// A stop was asked for: the input stays open until runnel exits, so
    /// its end cannot come first and stand in for the stop.
    stopping: bool,
    _guard: runnel_tests::Watchdog,
}

impl LiveRun {
    fn start(dir: &Path) -> Self {
        Self::start_under(dir, None)
    }

    /// [`LiveRun::start`] through `wrapper` (such as `nohup`), when given.
    fn start_under(dir: &Path, wrapper: Option<&str>) -> Self {
        use std::io::BufRead;
        let mut command = match wrapper {
            Some(wrapper) => {
                let mut command = std::process::Command::new(wrapper);
                command.arg(BIN);
                command
            }
            None => std::process::Command::new(BIN),
        };
        let mut child = command
            .args(["run", "p.toml"])
            .current_dir(dir)
            .env("RUNNEL_CACHE_DIR", runnel_tests::shared_cache_dir())
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start runnel");
        let guard = runnel_tests::Watchdog::new(child.id());
        let stdout = child.stdout.take().expect("stdout piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        LiveRun {
            stdin: child.stdin.take(),
            child,
            lines,
            stopping: false,
            _guard: guard,
        }
    }

    /// Writes `text` to runnel's stdin as it is, newlines included.
    fn write(&mut self, text: &str) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin.write_all(text.as_bytes()).expect("write to runnel");
        stdin.flush().expect("flush");
    }

    /// The next line runnel writes to stdout.
    fn next_line(&self, what: &str) -> String {
        self.lines
            .recv_timeout(std::time::Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no output: {what}"))
    }

    /// Sends a signal, such as `-TERM`; `stop` when it should end the run.
    fn signal(&mut self, signal: &str, stop: bool) {
        self.stopping |= stop;
        let kill = std::process::Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(kill.success());
    }

    /// Closes stdin (after the exit, when a stop was asked for) and waits
    /// for the exit: its code and stderr.
    fn finish(mut self) -> (Option<i32>, String) {
        use std::io::Read;
        let stdin = self.stdin.take();
        if !self.stopping {
            drop(stdin);
        }
        let status = self.child.wait().expect("wait");
        let mut stderr = String::new();
        if let Some(mut pipe) = self.child.stderr.take() {
            pipe.read_to_string(&mut stderr).expect("stderr");
        }
        (status.code(), stderr)
    }
}

#[test]
fn a_live_window_closes_on_the_wall_clock_while_input_stays_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    live_window_pipeline(dir.path());
    let mut run = LiveRun::start(dir.path());
    let ts = now_ms();
    for t in [20.0, 22.0, 24.0] {
        run.write(&format!(
            "{{\"key\":\"d1\",\"payload\":{{\"device\":\"d1\",\"ts\":{ts},\"temperature\":{t}}}}}\n"
        ));
    }
    // The window ends within a second; the timer must emit it without the
    // input ending (stdin is still open here).
    let first = run.next_line("an aggregate before the input ends");
    let aggregate: Value = serde_json::from_str(&first).expect("json line");
    assert_eq!(aggregate["headers"]["kind"], "aggregate");
    assert_eq!(aggregate["payload"]["count"], 3);
    assert_eq!(aggregate["payload"]["mean"], 22.0);
    let (status, stderr) = run.finish();
    assert_eq!(status, Some(0), "{stderr}");
}

#[test]
fn sigterm_drains_what_was_read_and_exits_cleanly() {
    // SIGHUP as well: a closed terminal must not cut a run short.
    for signal in ["-TERM", "-HUP"] {
        stop_by_signal_drains_what_was_read(signal);
    }
}

fn stop_by_signal_drains_what_was_read(signal: &str) {
    let dir = tempfile::tempdir().expect("temp dir");
    passthrough_stdin_pipeline(dir.path());
    let mut run = LiveRun::start(dir.path());
    run.write(
        &(0..10)
            .map(|i| format!("reading {i}\n"))
            .collect::<String>(),
    );
    let seen: Vec<String> = (0..10).map(|_| run.next_line("a reading")).collect();
    run.signal(signal, true);
    let (status, stderr) = run.finish();
    assert_eq!(
        status,
        Some(0),
        "{signal}: a requested stop is a clean exit"
    );
    let summary = stderr
        .lines()
        .find(|l| l.contains(" in: "))
        .unwrap_or_default()
        .to_string();
    assert!(
        summary.starts_with("runnel: 10 in: 10 produced output"),
        "{signal}: {stderr}"
    );
    assert!(
        stderr
            .contains("the run stopped before the end of its input: stdin was read up to line 10"),
        "{signal}: {stderr}"
    );
    assert_eq!(seen[9], "reading 9");
}

/// A tiny HTTP server: answers 503 to the first request (a passing outage),
/// 400 to payloads holding "refuse", and 200 to the rest, recording bodies.
fn http_server() -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    http_server_with(|requests, body| {
        if requests == 1 {
            ("503 Service Unavailable", "busy")
        } else if body.contains("refuse") {
            ("400 Bad Request", "refused by the test server")
        } else {
            ("200 OK", "ok")
        }
    })
}

/// A tiny HTTP server whose answer to request number `n` (from 1) with a
/// body is `answer(n, body)`; it records the bodies it answers 200.
fn http_server_with(
    answer: impl Fn(usize, &str) -> (&'static str, &'static str) + Send + Sync + 'static,
) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = bodies.clone();
    let answer = Arc::new(answer);
    let requests = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        // A thread per connection: a client may open a new one while an
        // idle one stays open (keep-alive).
        for stream in listener.incoming().flatten() {
            let (seen, answer, requests) = (seen.clone(), answer.clone(), requests.clone());
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                // Requests on one connection follow each other.
                loop {
                    let mut length = 0;
                    let mut line = String::new();
                    let mut started = false;
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            break;
                        }
                        started = true;
                        if line == "\r\n" {
                            break;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    if !started {
                        break;
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        break;
                    }
                    let n = requests.fetch_add(1, Ordering::SeqCst) + 1;
                    let body = String::from_utf8_lossy(&body).into_owned();
                    let (status, text) = answer(n, &body);
                    if status.starts_with("200") {
                        if let Ok(mut seen) = seen.lock() {
                            seen.push(body);
                        }
                    }
                    let answer = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{text}",
                        text.len()
                    );
                    if reader.get_mut().write_all(answer.as_bytes()).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, bodies)
}

#[test]
fn an_http_sink_posts_each_output_retries_outages_and_dead_letters_refusals() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (port, bodies) = http_server();
    std::fs::write(
        dir.path().join("in.txt"),
        "{\"n\":1}\nrefuse me\n{\"n\":3}\n",
    )
    .expect("input");
    let pipeline = format!(
        r#"
[source]
type = "file"
path = "in.txt"
[[stage]]
name = "faults"
wasm = {:?}
[sink]
type = "http"
url = "http://127.0.0.1:{port}/ingest"
headers = {{ x-api-key = "k" }}
[dead_letter]
type = "file"
path = "dead.jsonl"
"#,
        stage("faults").display().to_string()
    );
    std::fs::write(dir.path().join("p.toml"), pipeline).expect("pipeline");
    let run = run_binary(Path::new(BIN), dir.path(), &["run", "p.toml"], b"");
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let got = bodies.lock().map(|b| b.clone()).unwrap_or_default();
    assert_eq!(got, ["{\"n\":1}", "{\"n\":3}"], "{}", run.stderr);
    assert!(
        run.stderr
            .contains("503 Service Unavailable: busy; trying again"),
        "{}",
        run.stderr
    );
    let dead = read_json_lines(&dir.path().join("dead.jsonl"));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["stage"], "sink");
    assert_eq!(
        dead[0]["reason"],
        "the sink refused it: 400 Bad Request: refused by the test server"
    );
    let n = summary_numbers(run.summary());
    assert_eq!(&n[..4], &[3, 2, 0, 1], "{}", run.summary());
}

/// A refusal said in the log at once, and the run's figures so far, when a
/// later output stops the run before the refusal's dead letter is written.
#[test]
fn an_http_sink_that_gives_up_says_what_it_refused_and_what_went_through() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (port, bodies) = http_server_with(|_, body| {
        if body.contains("refuse") {
            ("400 Bad Request", "refused by the test server")
        } else if body.contains("down") {
            ("503 Service Unavailable", "down for good")
        } else {
            ("200 OK", "ok")
        }
    });
    std::fs::write(dir.path().join("in.txt"), "{\"n\":1}\nrefuse me\ndown\n").expect("input");
    let pipeline = format!(
        "[source]\ntype = \"file\"\npath = \"in.txt\"\n\
         [[stage]]\nname = \"faults\"\nwasm = {:?}\n\
         [sink]\ntype = \"http\"\nurl = \"http://127.0.0.1:{port}/ingest\"\n\
         [dead_letter]\ntype = \"file\"\npath = \"dead.jsonl\"\n",
        stage("faults").display().to_string()
    );
    std::fs::write(dir.path().join("p.toml"), pipeline).expect("pipeline");
    let run = run_binary(Path::new(BIN), dir.path(), &["run", "p.toml"], b"");
    assert_eq!(run.status, Some(1), "{}", run.stderr);
    let got = bodies.lock().map(|b| b.clone()).unwrap_or_default();
    assert_eq!(got, ["{\"n\":1}"], "{}", run.stderr);
    for said in [
        "refused: 400 Bad Request: refused by the test server",
        "503 Service Unavailable: down for good (after 5 tries); 1 output(s) it refused before are not dead-lettered",
        "stopped by an error after: 3 in",
        // The first output reached the endpoint before the run stopped.
        "; 1 out (0 from timers)",
    ] {
        assert!(run.stderr.contains(said), "{said}\n{}", run.stderr);
    }
}

/// On the event clock (a file source) a window closes after the same record
/// whatever the batch size: a reading for a window that later readings have
/// closed is late with 1 record a batch and with 64 alike.
#[test]
fn event_time_windows_close_at_the_same_records_whatever_the_batch_size() {
    let readings = [
        ("dev-1", 1_767_225_610_000_i64, 20.0),
        // Moves the clock past dev-1's first minute: its window closes.
        ("dev-2", 1_767_225_730_000, 30.0),
        // For dev-1's closed window: late.
        ("dev-1", 1_767_225_650_000, 22.0),
    ];
    let input: String = readings
        .iter()
        .map(|(device, ts, t)| {
            format!(
                "{{\"key\":\"{device}\",\"timestamp\":{ts},\"payload\":{{\"device\":\"{device}\",\"ts\":{ts},\"temperature\":{t}}}}}\n"
            )
        })
        .collect();
    let mut results = Vec::new();
    for batch_size in [1, 64] {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("in.jsonl"), &input).expect("input");
        let pipeline = format!(
            "[pipeline]\nbatch_size = {batch_size}\n\
             [source]\ntype = \"file\"\npath = \"in.jsonl\"\nformat = \"record\"\n\
             [[stage]]\nname = \"parse\"\nwasm = {:?}\n\
             [[stage]]\nname = \"window\"\nwasm = {:?}\n[stage.config]\nsize_ms = 60000\n\
             [sink]\ntype = \"stdout\"\n\
             [dead_letter]\ntype = \"file\"\npath = \"dead.jsonl\"\n",
            stage("parse").display().to_string(),
            stage("window").display().to_string()
        );
        std::fs::write(dir.path().join("p.toml"), pipeline).expect("pipeline");
        let run = run_binary(Path::new(BIN), dir.path(), &["run", "p.toml"], b"");
        assert_eq!(run.status, Some(0), "{}", run.stderr);
        let dead = read_json_lines(&dir.path().join("dead.jsonl"));
        assert_eq!(dead.len(), 1, "batch {batch_size}: {dead:?}");
        assert!(
            dead[0]["reason"].as_str().unwrap_or("").contains("is late"),
            "batch {batch_size}: {}",
            dead[0]
        );
        results.push(run.stdout);
    }
    assert_eq!(
        results[0], results[1],
        "the same windows with batch 1 and 64"
    );
}

/// `p.toml` in `dir`: stdin lines through the pass-through stage to stdout.
fn passthrough_stdin_pipeline(dir: &Path) {
    let pipeline = format!(
        "[source]\ntype = \"stdin\"\n[[stage]]\nname = \"pass\"\nwasm = {:?}\n[sink]\ntype = \"stdout\"\nformat = \"payload\"\n",
        stage("passthrough").display().to_string()
    );
    std::fs::write(dir.join("p.toml"), pipeline).expect("write pipeline");
}

/// Under `nohup` SIGHUP stays ignored: a run started that way outlives the
/// session it was started from.
#[test]
fn a_run_under_nohup_ignores_sighup() {
    let dir = tempfile::tempdir().expect("temp dir");
    passthrough_stdin_pipeline(dir.path());
    let mut run = LiveRun::start_under(dir.path(), Some("nohup"));
    run.write("before\n");
    assert_eq!(run.next_line("first output"), "before");
    run.signal("-HUP", false);
    run.write("after\n");
    assert_eq!(run.next_line("the run goes on after SIGHUP"), "after");
    let (status, stderr) = run.finish();
    assert_eq!(status, Some(0), "{stderr}");
}

/// Standard output that goes away (a reader that stops, `| head -1`): the
/// run says so, and its figures add up to what was read, those cut off
/// counted as not finished.
#[test]
fn a_stdout_that_closes_stops_the_run_with_figures_that_add_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    passthrough_stdin_pipeline(dir.path());
    let script = format!(
        "seq 1 200000 | {BIN:?} run p.toml 2>err.txt | head -n 1; echo \"${{PIPESTATUS[1]}}\" > status.txt"
    );
    let shell = std::process::Command::new("bash")
        .args(["-c", &script])
        .current_dir(dir.path())
        .output()
        .expect("bash");
    assert_eq!(String::from_utf8_lossy(&shell.stdout), "1\n");
    let status = std::fs::read_to_string(dir.path().join("status.txt")).expect("status");
    let stderr = std::fs::read_to_string(dir.path().join("err.txt")).expect("stderr");
    assert_eq!(status.trim(), "1", "{stderr}");
    assert!(stderr.contains("cannot write to stdout"), "{stderr}");
    let summary = stderr
        .lines()
        .find_map(|l| l.split_once("stopped by an error after: "))
        .map(|(_, figures)| figures)
        .unwrap_or_else(|| panic!("no figures: {stderr}"));
    let n = runnel_tests::summary_numbers(summary);
    // in, produced, filtered, dead-lettered, [not finished], out, ...
    let settled = n[1] + n[2] + n[3];
    let unfinished = if summary.contains("not finished") {
        n[4]
    } else {
        0
    };
    assert_eq!(n[0], settled + unfinished, "{summary}");
    assert!(
        unfinished > 0,
        "the run stopped with lines under way: {summary}"
    );
    let out = n[if unfinished > 0 { 5 } else { 4 }];
    // One output per input here: what counts as produced is what went out.
    assert_eq!(out, n[1], "{summary}");
}

/// A file sink whose write fails half-way (the file size limit here, as a
/// full disk would): that batch is cut back out, none after it is written,
/// and the figures count as out exactly the whole lines the file holds.
#[test]
fn a_file_sink_that_fails_half_way_keeps_whole_lines_and_true_figures() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pipeline = format!(
        "[pipeline]\nbatch_size = 16\n[source]\ntype = \"stdin\"\n\
         [[stage]]\nname = \"pass\"\nwasm = {:?}\n\
         [sink]\ntype = \"file\"\npath = \"out.txt\"\nformat = \"payload\"\n",
        stage("passthrough").display().to_string()
    );
    std::fs::write(dir.path().join("p.toml"), pipeline).expect("pipeline");
    let input: String = (0..3000)
        .map(|i| format!("reading {i:05} {}\n", "x".repeat(24)))
        .collect();
    std::fs::write(dir.path().join("in.txt"), input).expect("input");
    let summary = run_into_file_size_limit(dir.path());
    let written = std::fs::read_to_string(dir.path().join("out.txt")).expect("out.txt");
    assert!(written.ends_with('\n'), "a torn last line");
    let lines: Vec<&str> = written.lines().collect();
    assert!(!lines.is_empty() && lines.len() < 3000, "{}", lines.len());
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(
            *line,
            format!("reading {i:05} {}", "x".repeat(24)),
            "no gap, no tear"
        );
    }
    let n = runnel_tests::summary_numbers(&summary);
    assert_eq!(
        n[5] as usize,
        lines.len(),
        "out is what the file holds: {summary}"
    );
    assert_eq!(n[1] as usize, lines.len(), "{summary}");
}

/// A dead-letter file whose write fails stops the run; the outputs of the
/// batches under way at that moment are in the sink file, and "out" counts
/// them: it says what the sink took, finished inputs or not.
#[test]
fn a_dead_letter_that_fails_leaves_out_counting_what_the_sink_holds() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pipeline = format!(
        "[pipeline]\nbatch_size = 16\n[source]\ntype = \"stdin\"\n\
         [[stage]]\nname = \"faults\"\nwasm = {:?}\n\
         [sink]\ntype = \"file\"\npath = \"out.txt\"\nformat = \"payload\"\n\
         [dead_letter]\ntype = \"file\"\npath = \"dead.jsonl\"\n",
        stage("faults").display().to_string()
    );
    std::fs::write(dir.path().join("p.toml"), pipeline).expect("pipeline");
    // Half the lines rejected: a dead letter is many times an output's
    // size, so the dead-letter file meets the size limit first.
    let input: String = (0..3000)
        .map(|i| {
            if i % 2 == 0 {
                format!("ok {i}\n")
            } else {
                "reject\n".into()
            }
        })
        .collect();
    std::fs::write(dir.path().join("in.txt"), input).expect("input");
    let summary = run_into_file_size_limit(dir.path());
    let written = std::fs::read_to_string(dir.path().join("out.txt")).expect("out.txt");
    let n = runnel_tests::summary_numbers(&summary);
    assert_eq!(n[5] as usize, written.lines().count(), "{summary}");
    assert!(
        n[5] > n[1],
        "outputs of unfinished inputs went out: {summary}"
    );
}

/// Runs the pipeline `p.toml` in `dir` on `in.txt` with files limited to
/// 32 KiB, as a full disk would stop them; it must stop with exit code 1.
/// Returns the figures it gives as it stops.
fn run_into_file_size_limit(dir: &Path) -> String {
    // The stage compiled and cached first: under the limit a compile
    // could not write its cache entry.
    let check = run_binary(Path::new(BIN), dir, &["check", "p.toml"], b"");
    assert_eq!(check.status, Some(0), "{}", check.stderr);
    // With SIGXFSZ ignored, a write past the limit fails with EFBIG.
    let script = format!("trap '' XFSZ; ulimit -f 32; exec {BIN:?} run p.toml < in.txt");
    let run = std::process::Command::new("bash")
        .args(["-c", &script])
        .current_dir(dir)
        .env("RUST_LOG", "info")
        .env("RUNNEL_CACHE_DIR", runnel_tests::shared_cache_dir())
        .output()
        .expect("bash");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{stderr}");
    let summary = stderr
        .lines()
        .find_map(|l| l.split_once("stopped by an error after: "))
        .map(|(_, figures)| figures.to_string())
        .unwrap_or_else(|| panic!("no figures: {stderr}"));
    assert!(summary.contains("not finished"), "{summary}");
    summary
}

/// Dead letters on standard output (the default under Lambda, where stdout
/// and the log both land in CloudWatch) are not logged a second time.
#[test]
fn dead_letters_on_stdout_are_not_logged_twice() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pipeline = format!(
        "[source]\ntype = \"stdin\"\n[[stage]]\nname = \"faults\"\nwasm = {:?}\n\
         [sink]\ntype = \"file\"\npath = \"out.txt\"\nformat = \"payload\"\n\
         [dead_letter]\ntype = \"stdout\"\n",
        stage("faults").display().to_string()
    );
    std::fs::write(dir.path().join("p.toml"), pipeline).expect("pipeline");
    let run = run_binary(
        Path::new(BIN),
        dir.path(),
        &["run", "p.toml"],
        b"ok\nreject\n",
    );
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let entries: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(entries.len(), 1, "{}", run.stdout);
    assert!(entries[0].contains("asked to reject"), "{}", entries[0]);
    assert!(!run.stderr.contains("asked to reject"), "{}", run.stderr);
    assert!(
        run.summary()
            .contains("2 in: 1 produced output, 0 filtered, 1 dead-lettered"),
        "{}",
        run.summary()
    );
}

/// A source of bad records does not flood the log: the first dead letters
/// of a while are logged one by one, with the record's key, and the rest
/// counted; the dead-letter file holds them all.
#[test]
fn the_log_shows_the_first_dead_letters_and_counts_the_rest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pipeline = format!(
        "[source]\ntype = \"stdin\"\nformat = \"record\"\n\
         [[stage]]\nname = \"faults\"\nwasm = {:?}\n\
         [sink]\ntype = \"stdout\"\n[dead_letter]\ntype = \"file\"\npath = \"dead.jsonl\"\n",
        stage("faults").display().to_string()
    );
    std::fs::write(dir.path().join("p.toml"), pipeline).expect("pipeline");
    let input = "{\"key\":\"dev-7\",\"text\":\"reject\"}\n".repeat(300);
    let run = run_binary(
        Path::new(BIN),
        dir.path(),
        &["run", "p.toml"],
        input.as_bytes(),
    );
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let dead = std::fs::read_to_string(dir.path().join("dead.jsonl")).expect("dead letters");
    assert_eq!(dead.lines().count(), 300);
    let logged: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("dead letter stage=faults"))
        .collect();
    assert_eq!(logged.len(), 100, "{}", run.stderr);
    assert!(logged[0].contains("key=dev-7"), "{}", logged[0]);
    assert!(run.stderr.contains("not_logged=200"), "{}", run.stderr);
}

/// A stop while a line is only half read (its end not yet written): those
/// bytes cannot be read again from a pipe, so they go to the dead letter.
#[test]
fn a_line_cut_off_by_a_stop_is_dead_lettered() {
    let dir = tempfile::tempdir().expect("temp dir");
    passthrough_stdin_pipeline(dir.path());
    let mut run = LiveRun::start(dir.path());
    run.write("whole\nhalf a li");
    assert_eq!(run.next_line("first output"), "whole");
    // The half line is read by now: the whole one before it came out.
    std::thread::sleep(std::time::Duration::from_millis(300));
    run.signal("-TERM", true);
    let (status, stderr) = run.finish();
    assert_eq!(status, Some(0), "{stderr}");
    assert!(
        stderr.contains("2 in: 1 produced output, 0 filtered, 1 dead-lettered"),
        "{stderr}"
    );
    let dead = runnel_tests::read_json_lines(&dir.path().join("dead-letter.jsonl"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["record"]["text"], "half a li");
    assert_eq!(
        dead[0]["reason"],
        "stdin line 2: the run stopped before this line ended"
    );
}
