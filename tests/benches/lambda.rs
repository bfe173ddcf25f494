//! runnel as a Lambda function against a native lambda_runtime handler
//! running the same stage crates (src/bin/native-lambda.rs), both served by
//! cargo-lambda's Runtime API emulator on loopback in the same run:
//!
//! - cold start: from spawning the process to the answer of the invocation
//!   that was already waiting for it; runnel with its compiled stages in the
//!   cache (what a package from deploy/lambda/build ships), and with an empty
//!   cache, so the cost of compiling shows. The first invocation is the
//!   100-message batch, and again a 1-message batch, whose answer is mostly
//!   the start itself;
//! - warm: one invocation with a 100-message SQS batch, the two functions
//!   invoked in turn.
//!
//! cargo bench -p runnel-tests --bench lambda
//!
//! It builds both release binaries first; RUNNEL_BENCH_BIN and
//! RUNNEL_BENCH_NATIVE_BIN name others instead. RUNNEL_BENCH_COLD (default
//! 10) sets the cold starts per case, RUNNEL_BENCH_WARM (default 200) the
//! timed warm invocations per function.
//!
//! The emulator's own work (an HTTP hop in and out, and its bookkeeping) is
//! in every figure, alike for both sides.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use runnel_tests::mqtt::{free_port, wait_for_port};
use runnel_tests::{repo_dir, run_binary_with, stage};

const MESSAGES: usize = 100;
/// Messages that must come back as batch item failures: one that is no
/// reading at all (parse) and one out of range (validate).
const UNREADABLE: usize = 37;
const OUT_OF_RANGE: usize = 71;
const WARMUP_INVOCATIONS: usize = 20;
/// How long any one answer may take before the run is called stuck.
const ANSWER_LIMIT: Duration = Duration::from_secs(120);

fn main() {
    let cold_runs = env_count("RUNNEL_BENCH_COLD", 10);
    let warm_runs = env_count("RUNNEL_BENCH_WARM", 200);
    let runnel = release_binary(
        "RUNNEL_BENCH_BIN",
        &["-p", "runnel", "--bin", "runnel"],
        "runnel",
    );
    let native = release_binary(
        "RUNNEL_BENCH_NATIVE_BIN",
        &["-p", "runnel-tests", "--bin", "native-lambda"],
        "native-lambda",
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let pipeline = write_pipeline(dir.path());
    let event = sqs_event(MESSAGES);
    let expected = expected_answer(&event);

    // The cache a deploy package ships: filled before any timed start.
    let cache = dir.path().join("cache");
    let check = run_binary_with(
        &runnel,
        dir.path(),
        &["check", "pipeline.toml"],
        b"",
        // Portable, as deploy/lambda/build compiles them and as runnel
        // loads them under Lambda.
        &[
            ("RUNNEL_CACHE_DIR", cache.to_str().expect("UTF-8 path")),
            ("RUNNEL_CPU", "portable"),
        ],
    );
    assert_eq!(check.status, Some(0), "runnel check:\n{}", check.stderr);

    let tools = runnel_tests::lambda_tools();
    println!(
        "Lambda benchmark: {}'s Runtime API emulator on loopback, one process per function",
        cargo_lambda_version(&tools)
    );
    println!(
        "runnel: {} (commit {})",
        runnel.display(),
        runnel_tests::commit()
    );
    println!(
        "native: {} (lambda_runtime, the same stage crates linked in)",
        native.display()
    );
    println!(
        "event: SQS, {MESSAGES} messages ({} KB), sensor readings in JSON and CSV, 2 bad;",
        event.len() / 1024
    );
    println!("chain: parse, validate, convert, anomaly (the demo's configs), sink none, dead letters to stdout\n");

    let emulators = [Emulator::start(&tools), Emulator::start(&tools)];
    let functions = Functions {
        runnel: &runnel,
        native: &native,
        dir: dir.path(),
        pipeline: &pipeline,
        cache: &cache,
    };

    // Cold starts, the three cases in turn each round so that whatever else
    // the machine is doing falls on all of them alike; round 0 (page cache,
    // first exec) is not counted.
    // The first invocation is the 100-message batch, and again a batch of
    // one good message, whose answer is mostly the start itself.
    let single = sqs_event(1);
    let single_answer = serde_json::json!({ "batchItemFailures": [] });
    let cases = [
        (Case::Native, MESSAGES),
        (Case::RunnelCached, MESSAGES),
        (Case::RunnelEmptyCache, MESSAGES),
        (Case::Native, 1),
        (Case::RunnelCached, 1),
    ];
    let mut cold: Vec<Vec<Start>> = vec![Vec::new(); cases.len()];
    for round in 0..=cold_runs {
        for (i, (case, messages)) in cases.iter().enumerate() {
            let (first, answer) = if *messages == 1 {
                (&single, &single_answer)
            } else {
                (&event, &expected)
            };
            let start = cold_start(&emulators[0], &functions, *case, round, first, answer);
            if round > 0 {
                cold[i].push(start);
            }
        }
    }

    // Warm: both functions up, each behind its own emulator, invoked in turn.
    let mut native_fn = functions.spawn(&emulators[0], Case::Native, "warm");
    let mut runnel_fn = functions.spawn(&emulators[1], Case::RunnelCached, "warm");
    let mut clients = [
        Client::connect(emulators[0].port),
        Client::connect(emulators[1].port),
    ];
    // The batch of one good message: the fixed cost of an invocation.
    for _ in 0..WARMUP_INVOCATIONS {
        for client in &mut clients {
            client.invoke_checked(&event, &expected);
        }
    }
    let mut warm: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut floor: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for _ in 0..warm_runs {
        for (i, client) in clients.iter_mut().enumerate() {
            warm[i].push(client.invoke_checked(&event, &expected));
            floor[i].push(client.invoke_checked(&single, &single_answer));
        }
    }
    drop(clients);
    native_fn.stop();
    let runnel_log = runnel_fn.stop();
    let invocation_log = runnel_log
        .iter()
        .filter(|l| message(l) == Some("invocation done"))
        .count();

    // The table.
    let cold_ms: Vec<Vec<f64>> = cold
        .iter()
        .map(|starts| starts.iter().map(|s| s.total_ms).collect())
        .collect();
    // The median start of a case with a given first invocation.
    let cold_median = |wanted: (Case, usize)| {
        let i = cases
            .iter()
            .position(|c| *c == wanted)
            .expect("a case for each first invocation");
        median(&cold_ms[i])
    };
    // Each case is set against the native start with the same first invocation.
    let native_cold = |messages: usize| cold_median((Case::Native, messages));
    println!("cold start: spawn to first answer, {cold_runs} starts each      median ms    min ms   max ms   vs native");
    for (i, (case, messages)) in cases.iter().enumerate() {
        let ratio = if *case == Case::Native {
            String::new()
        } else {
            format!("{:>8.2}x", median(&cold_ms[i]) / native_cold(*messages))
        };
        println!(
            "  {:<56} {:>9.1} {:>9.1} {:>8.1} {ratio}",
            format!("{}, first batch {messages}", case.label()),
            median(&cold_ms[i]),
            min(&cold_ms[i]),
            max(&cold_ms[i]),
        );
    }
    // Where runnel's start goes, from its own log: the "ready for
    // invocations" line's time and its `ms` (pipeline file, engine, stages
    // loaded and started), the "stage loaded" lines' `ms`.
    println!("  runnel's start in phases, medians in ms:  to init   init (stage loads)   ready to answer");
    for (i, (case, messages)) in cases.iter().enumerate() {
        if *case == Case::Native {
            continue;
        }
        let phase = |f: &dyn Fn(&Start) -> Option<f64>| {
            median(&cold[i].iter().filter_map(f).collect::<Vec<f64>>())
        };
        println!(
            "    {:<38} {:>8.1} {:>8.1} {:>10.1} {:>16.1}",
            format!("runnel, {}, first batch {messages}", case.short()),
            phase(&|s| Some(s.ready_ms? - s.init_ms?)),
            phase(&|s| s.init_ms),
            phase(&|s| Some(s.stage_load_ms)),
            phase(&|s| Some(s.total_ms - s.ready_ms?)),
        );
    }

    let per_call: Vec<f64> = warm.iter().map(|t| median(t)).collect();
    let floors: Vec<f64> = floor.iter().map(|t| median(t)).collect();
    println!(
        "\nwarm invocation, {warm_runs} each, in turn               median µs    min µs   µs/record  vs native"
    );
    for (i, label) in ["native", "runnel"].iter().enumerate() {
        let ratio = if i == 0 {
            String::new()
        } else {
            format!("{:>8.2}x", per_call[1] / per_call[0])
        };
        println!(
            "  {:<54} {:>9.0} {:>9.0} {:>11.1} {ratio}",
            format!("{label}, {MESSAGES}-message SQS batch"),
            per_call[i],
            min(&warm[i]),
            per_call[i] / MESSAGES as f64,
        );
    }
    for (i, label) in ["native", "runnel"].iter().enumerate() {
        let ratio = if i == 0 {
            String::new()
        } else {
            format!("{:>20.2}x", floors[1] / floors[0])
        };
        println!(
            "  {:<54} {:>9.0} {:>9.0} {ratio}",
            format!("{label}, 1-message batch (an invocation's fixed cost)"),
            floors[i],
            min(&floor[i]),
        );
    }
    // What each message past the first costs, without the fixed part.
    let marginal: Vec<f64> = (0..2)
        .map(|i| (per_call[i] - floors[i]) / (MESSAGES - 1) as f64)
        .collect();
    for (i, label) in ["native", "runnel"].iter().enumerate() {
        let ratio = if i == 0 {
            String::new()
        } else {
            format!("{:>8.2}x", marginal[1] / marginal[0])
        };
        println!(
            "  {:<54} {:>31.1} {ratio}",
            format!(
                "{label}, each further message ({MESSAGES} less 1, / {})",
                MESSAGES - 1
            ),
            marginal[i],
        );
    }

    let verdict = |ratio: f64, goal: f64| if ratio <= goal { "met" } else { "not met" };
    let cold_ratio =
        |messages: usize| cold_median((Case::RunnelCached, messages)) / native_cold(messages);
    let (cold_one, cold_full) = (cold_ratio(1), cold_ratio(MESSAGES));
    let warm_ratio = per_call[1] / per_call[0];
    println!(
        "\ngoals: cold start (cached stages) within 1.3x native: {cold_one:.2}x with a 1-message first batch, {}; \
         {cold_full:.2}x with the {MESSAGES}-message batch, {}; warm batch within 1.5x native: {warm_ratio:.2}x, {}",
        verdict(cold_one, 1.3),
        verdict(cold_full, 1.3),
        verdict(warm_ratio, 1.5),
    );
    assert_eq!(
        invocation_log,
        WARMUP_INVOCATIONS + 2 * warm_runs,
        "runnel logged a different number of invocations than it was sent"
    );
}

#[derive(Clone, Copy, PartialEq)]
enum Case {
    Native,
    RunnelCached,
    RunnelEmptyCache,
}

impl Case {
    fn label(self) -> &'static str {
        match self {
            Case::Native => "native lambda_runtime handler",
            Case::RunnelCached => "runnel, compiled stages from the cache",
            Case::RunnelEmptyCache => "runnel, empty cache (compiles the 4 stages)",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Case::Native => "native",
            Case::RunnelCached => "cached",
            Case::RunnelEmptyCache => "empty cache",
        }
    }
}

/// One cold start.
#[derive(Clone)]
struct Start {
    total_ms: f64,
    /// runnel's own "ready for invocations" figure: pipeline file, engine,
    /// stages loaded and started.
    init_ms: Option<f64>,
    /// From the spawn to the "ready for invocations" line, by its time.
    ready_ms: Option<f64>,
    stage_load_ms: f64,
}

fn cold_start(
    emulator: &Emulator,
    functions: &Functions<'_>,
    case: Case,
    round: usize,
    event: &str,
    expected: &serde_json::Value,
) -> Start {
    // The invocation waits at the emulator before the process exists, as
    // the one that makes Lambda start an instance does.
    let mut client = Client::connect(emulator.port);
    client.send(event);
    // Give the emulator the moment it needs to queue the invocation, so the
    // clock below does not run while it reads the request.
    std::thread::sleep(Duration::from_millis(50));
    let spawned_at = std::time::SystemTime::now();
    let started = Instant::now();
    let mut function = functions.spawn(emulator, case, &format!("cold-{round}"));
    let (status, body) = client.receive();
    let total_ms = started.elapsed().as_secs_f64() * 1e3;
    check_answer(status, &body, expected);
    drop(client);
    let log = function.stop();
    let ready = log
        .iter()
        .find(|l| message(l) == Some("ready for invocations"));
    let init_ms = ready.and_then(|l| l["fields"]["ms"].as_f64());
    let ready_ms = ready
        .and_then(|l| l["timestamp"].as_str())
        .and_then(|t| ms_since(spawned_at, t));
    let loaded: Vec<&serde_json::Value> = log
        .iter()
        .filter(|l| message(l) == Some("stage loaded"))
        .collect();
    if case != Case::Native {
        assert!(init_ms.is_some(), "runnel logged no init time");
        assert_eq!(loaded.len(), 4, "runnel loaded {} stages", loaded.len());
        let all_cached = loaded
            .iter()
            .all(|l| l["fields"]["from_cache"].as_bool() == Some(true));
        // The cached case must not compile, the other must.
        assert_eq!(all_cached, case == Case::RunnelCached, "{loaded:?}");
    }
    Start {
        total_ms,
        init_ms,
        ready_ms,
        stage_load_ms: loaded
            .iter()
            .filter_map(|l| l["fields"]["ms"].as_f64())
            .sum(),
    }
}

/// What the function processes are started with.
struct Functions<'a> {
    runnel: &'a Path,
    native: &'a Path,
    dir: &'a Path,
    pipeline: &'a Path,
    cache: &'a Path,
}

impl Functions<'_> {
    fn spawn(&self, emulator: &Emulator, case: Case, name: &str) -> Function {
        let api = format!("http://127.0.0.1:{}/.rt", emulator.port);
        let out = self.dir.join(format!("{name}-{}.out", case.short()));
        let log = self.dir.join(format!("{name}-{}.log", case.short()));
        // An empty cache of its own each time, so every such start compiles.
        let cache = match case {
            Case::RunnelEmptyCache => {
                let fresh = self.dir.join(format!("{name}-empty-cache"));
                let _ = std::fs::remove_dir_all(&fresh);
                fresh
            }
            _ => self.cache.to_path_buf(),
        };
        let mut command = match case {
            Case::Native => Command::new(self.native),
            _ => {
                let mut c = Command::new(self.runnel);
                c.arg("lambda").arg(self.pipeline);
                c
            }
        };
        command
            .current_dir(self.dir)
            .env("AWS_LAMBDA_RUNTIME_API", api)
            .env("AWS_LAMBDA_FUNCTION_NAME", "_")
            .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256")
            .env("AWS_LAMBDA_FUNCTION_VERSION", "1")
            .env("RUNNEL_PIPELINE", self.pipeline)
            .env("RUNNEL_CACHE_DIR", cache)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("output file"))
            .stderr(std::fs::File::create(&log).expect("log file"));
        let child = command.spawn().expect("start the function");
        Function { child, log }
    }
}

struct Function {
    child: Child,
    log: PathBuf,
}

impl Function {
    /// Kills it, as Lambda ends an instance, and returns its JSON log lines.
    fn stop(&mut self) -> Vec<serde_json::Value> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

impl Drop for Function {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How long after `since` a log line's time (RFC 3339 in UTC, as runnel's
/// JSON logs write it) is, in ms; by time of day, as both are this machine's
/// clock and a run lasts minutes.
fn ms_since(since: std::time::SystemTime, timestamp: &str) -> Option<f64> {
    const DAY: f64 = 86_400.0;
    let time = timestamp.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.split(':');
    let hours: f64 = parts.next()?.parse().ok()?;
    let minutes: f64 = parts.next()?.parse().ok()?;
    let seconds: f64 = parts.next()?.parse().ok()?;
    let line = hours * 3600.0 + minutes * 60.0 + seconds;
    let start = since
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs_f64()
        % DAY;
    Some((line - start).rem_euclid(DAY) * 1e3)
}

fn message(line: &serde_json::Value) -> Option<&str> {
    line["fields"]["message"].as_str()
}

/// One keep-alive HTTP/1.1 connection to the emulator's invoke endpoint.
/// Written by hand: a client's own start-up or pooling would be in the
/// figures otherwise.
struct Client {
    port: u16,
    reader: BufReader<TcpStream>,
}

impl Client {
    fn connect(port: u16) -> Self {
        let stream = TcpStream::connect(("127.0.0.1", port)).expect("connect to the emulator");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        stream
            .set_read_timeout(Some(ANSWER_LIMIT))
            .expect("read timeout");
        Client {
            port,
            reader: BufReader::new(stream),
        }
    }

    fn send(&mut self, body: &str) {
        let request = format!(
            "POST /2015-03-31/functions/_/invocations HTTP/1.1\r\n\
             Host: 127.0.0.1:{}\r\n\
             Content-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.port,
            body.len()
        );
        self.reader
            .get_mut()
            .write_all(request.as_bytes())
            .expect("send the invocation");
    }

    /// The status and body of the next response.
    fn receive(&mut self) -> (u16, Vec<u8>) {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("status line");
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP status line: {line:?}"));
        let mut length = None;
        let mut chunked = false;
        loop {
            line.clear();
            self.reader.read_line(&mut line).expect("header line");
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':').unwrap_or((header, ""));
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = Some(value.parse::<usize>().expect("Content-Length"));
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.reader.read_line(&mut line).expect("chunk size");
                let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                    .expect("chunk size");
                let mut chunk = vec![0; size + 2];
                self.reader.read_exact(&mut chunk).expect("chunk");
                if size == 0 {
                    break;
                }
                body.extend_from_slice(&chunk[..size]);
            }
        } else if let Some(length) = length {
            body.resize(length, 0);
            self.reader.read_exact(&mut body).expect("body");
        } else {
            self.reader.read_to_end(&mut body).expect("body");
        }
        (status, body)
    }

    /// One invocation, its answer checked; the time it took, in µs.
    fn invoke_checked(&mut self, event: &str, expected: &serde_json::Value) -> f64 {
        let started = Instant::now();
        self.send(event);
        let (status, body) = self.receive();
        let elapsed = started.elapsed().as_secs_f64() * 1e6;
        check_answer(status, &body, expected);
        elapsed
    }
}

fn check_answer(status: u16, body: &[u8], expected: &serde_json::Value) {
    let text = String::from_utf8_lossy(body);
    assert_eq!(status, 200, "the invocation failed: {text}");
    let answer: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("the answer is not JSON ({e}): {text}"));
    assert_eq!(&answer, expected, "a wrong answer");
}

/// cargo-lambda's Runtime API emulator on a free port, stopped when dropped.
struct Emulator {
    port: u16,
    child: Child,
}

impl Emulator {
    fn start(tools: &Path) -> Self {
        let port = free_port();
        // It reads `cargo metadata` where it starts, and wants a binary there.
        let child = Command::new("cargo")
            .args(["lambda", "watch", "--only-lambda-apis", "-A", "127.0.0.1"])
            .args(["-P", &port.to_string()])
            .current_dir(repo_dir().join("runtime"))
            .env("PATH", runnel_tests::path_with(tools))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start cargo lambda watch");
        wait_for_port(port);
        Emulator { port, child }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn cargo_lambda_version(tools: &Path) -> String {
    Command::new("cargo")
        .args(["lambda", "--version"])
        .env("PATH", runnel_tests::path_with(tools))
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "cargo-lambda".into())
}

/// The Lambda package's chain (deploy/lambda/pipeline.toml) over the stages
/// the tests build; the native handler reads the same file.
fn write_pipeline(dir: &Path) -> PathBuf {
    let text = format!(
        r#"[pipeline]
name = "sensors-lambda"

[source]
type = "lambda"
event = "auto"

[[stage]]
name = "parse"
wasm = {parse:?}
[stage.config]
units = {{ temperature = "C", humidity = "%", pressure = "hPa" }}
device_units = {{ dev-2 = {{ temperature = "F" }} }}

[[stage]]
name = "validate"
wasm = {validate:?}
[stage.config]
required = ["temperature"]
ranges = {{ temperature = {{ min = -40, max = 125 }}, humidity = {{ min = 0, max = 100 }} }}

[[stage]]
name = "convert"
wasm = {convert:?}
[stage.config]
convert = {{ temperature = "C" }}
default_tags = {{ site = "plant-a" }}
devices = {{ dev-1 = {{ room = "boiler" }}, dev-2 = {{ room = "cold-store" }}, dev-3 = {{ room = "roof" }} }}

[[stage]]
name = "anomaly"
wasm = {anomaly:?}
[stage.config]
threshold = 4.0
warmup = 8

[sink]
type = "none"

[dead_letter]
type = "stdout"
"#,
        parse = stage("parse").display().to_string(),
        validate = stage("validate").display().to_string(),
        convert = stage("convert").display().to_string(),
        anomaly = stage("anomaly").display().to_string(),
    );
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).expect("write pipeline");
    path
}

fn message_id(i: usize) -> String {
    format!("{i:08x}-87a3-44ab-83d2-661975830a7d")
}

/// An SQS event as Lambda delivers it: readings from four devices, every
/// tenth one CSV in Fahrenheit from dev-2, a spike the anomaly stage flags,
/// and the two bad messages.
fn sqs_event(messages: usize) -> String {
    let base = 1_767_225_600_000_i64;
    let records: Vec<serde_json::Value> = (0..messages)
        .map(|i| {
            let ts = base + i as i64 * 1000;
            let device = [1, 3, 4][i % 3];
            let body = match i {
                UNREADABLE => "hello from dev-9".to_string(),
                OUT_OF_RANGE => format!(r#"{{"device":"dev-3","ts":{ts},"temperature":900}}"#),
                90 => {
                    format!(r#"{{"device":"dev-1","ts":{ts},"temperature":48.0,"humidity":40.2}}"#)
                }
                _ if i % 10 == 5 => {
                    format!("dev-2,{ts},{:.1},{:.1}", 70.0 + (i % 4) as f64, 41.0)
                }
                _ => format!(
                    r#"{{"device":"dev-{device}","ts":{ts},"temperature":{:.1},"humidity":{:.1}}}"#,
                    21.0 + (i % 5) as f64 * 0.1,
                    40.0 + (i % 3) as f64
                ),
            };
            serde_json::json!({
                "messageId": message_id(i),
                "receiptHandle": "MessageReceiptHandle",
                "body": body,
                "attributes": {
                    "ApproximateReceiveCount": "1",
                    "SentTimestamp": ts.to_string(),
                    "SenderId": "AIDAIENQZJOLO23YVJ4VO",
                    "ApproximateFirstReceiveTimestamp": (ts + 10).to_string(),
                },
                "messageAttributes": {
                    "site": {
                        "stringValue": "plant-a",
                        "stringListValues": [],
                        "binaryListValues": [],
                        "dataType": "String",
                    },
                },
                "md5OfBody": "7b270e59b47ff90a553787216d55d91d",
                "eventSource": "aws:sqs",
                "eventSourceARN": "arn:aws:sqs:eu-west-1:123456789012:sensor-readings",
                "awsRegion": "eu-west-1",
            })
        })
        .collect();
    serde_json::json!({ "Records": records }).to_string()
}

/// Only the two bad messages are reported, in order.
fn expected_answer(event: &str) -> serde_json::Value {
    assert!(event.contains(&message_id(UNREADABLE)));
    serde_json::json!({ "batchItemFailures": [
        { "itemIdentifier": message_id(UNREADABLE) },
        { "itemIdentifier": message_id(OUT_OF_RANGE) },
    ]})
}

fn env_count(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(default)
}

/// A release binary: built now, unless `var` names one.
fn release_binary(var: &str, build: &[&str], name: &str) -> PathBuf {
    if let Some(bin) = std::env::var_os(var) {
        return PathBuf::from(bin);
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release"])
        .args(build)
        .current_dir(repo_dir())
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build --release {build:?} failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_dir().join("target"));
    target.join("release").join(name)
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}
