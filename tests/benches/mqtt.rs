//! The example chain fed by MQTT, against a real mosquitto on loopback:
//! messages per second, and latency from publish to the chain's output
//! arriving at a subscriber, at QoS 0 and 1; against a minimal native relay
//! (subscribe and republish, no wasm) on the same broker in the same run;
//! and runnel's idle memory with the example chain.
//!
//! cargo bench -p runnel-tests --bench mqtt
//!
//! It builds the release binary first (`cargo build --release -p runnel`,
//! into target/mqtt-bench); RUNNEL_BENCH_BIN=path uses that binary instead,
//! and RUNNEL_BENCH_IDLE=1 measures only its idle memory.

use std::collections::{HashMap, VecDeque};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{Client, Event, MqttOptions, Outgoing, Packet, QoS};
use runnel_tests::mqtt::{free_port, Background, Mosquitto};
use runnel_tests::{repo_dir, run_binary, stage, unique};

const DEVICES: u64 = 16;
/// Event time of message 0; message `id` carries `BASE_TS + id` as its
/// `ts`, which every stage keeps, so each output names its input.
const BASE_TS: u64 = 1_767_225_600_000;
const PAYLOAD_BYTES: usize = 100;
const WARMUP: usize = 2_000;
const THROUGHPUT: usize = 20_000;
const THROUGHPUT_ROUNDS: usize = 3;
/// Paced runs: messages per second, for how long.
const PACED: &[(u32, Duration)] = &[
    (1_000, Duration::from_secs(5)),
    (10_000, Duration::from_secs(5)),
];
/// How long to wait with nothing arriving before counting the rest as lost.
const STALL: Duration = Duration::from_secs(15);
const INPUT_FILTER: &str = "sensors/+/telemetry";

fn main() {
    // The bench runs itself as the native relay, so the relay is a process
    // of its own like runnel, with its own CPU time and memory to read.
    if let Ok(spec) = std::env::var("RUNNEL_BENCH_RELAY") {
        relay_main(&spec);
        return;
    }
    let bin = runnel_binary();
    let dir = tempfile::tempdir().expect("temp dir");
    let ticks = clock_ticks();
    // RUNNEL_BENCH_IDLE=1: only the idle memory, to compare builds quickly.
    if std::env::var_os("RUNNEL_BENCH_IDLE").is_some() {
        println!("runnel: {}", bin.display());
        idle_memory(&bin, dir.path());
        return;
    }

    println!(
        "MQTT benchmark: {} on loopback, {PAYLOAD_BYTES}-byte JSON readings from {DEVICES} devices",
        mosquitto_version()
    );
    println!(
        "runnel: {} (commit {})",
        bin.display(),
        runnel_tests::commit()
    );
    println!("example chain: parse, validate, convert, anomaly (the demo's configs), batch 64");
    println!("relay: rumqttc subscribe and republish, no wasm, input acked after its republish is");
    println!(
        "broker: as configured by the tests (queues unbounded, persistence on); \
         \"nodelay\" adds set_tcp_nodelay true (runnel and the relay set it on their own sockets)\n"
    );

    // The broker as shipped leaves Nagle's algorithm on for its clients,
    // which holds back acknowledgements; QoS 1 runs both ways to show what
    // that costs. RUNNEL_BENCH_QOS=0|1, RUNNEL_BENCH_NODELAY=0|1 and
    // RUNNEL_BENCH_SYSTEM=runnel|relay run a part.
    let wanted = |var: &str, value: &str| std::env::var(var).map_or(true, |v| v == value);
    let mut throughput = Vec::new();
    let mut latency = Vec::new();
    for (qos, nodelay) in [(0u8, false), (1, false), (1, true)] {
        for system in [System::Runnel, System::Relay] {
            if !wanted("RUNNEL_BENCH_QOS", &qos.to_string())
                || !wanted("RUNNEL_BENCH_NODELAY", if nodelay { "1" } else { "0" })
                || !wanted("RUNNEL_BENCH_SYSTEM", system.name())
            {
                continue;
            }
            let label = format!("qos {qos}{}", if nodelay { " nodelay" } else { "" });
            let case = run_case(&bin, dir.path(), system, qos, nodelay, &label, ticks);
            throughput.push((label.clone(), system, case.throughput));
            latency.extend(case.latency.into_iter().map(|l| (label.clone(), system, l)));
        }
    }

    println!(
        "\nthroughput: median of {THROUGHPUT_ROUNDS} rounds of {THROUGHPUT} messages published \
         as fast as the broker takes them,\nfirst publish to last output at the subscriber; \
         CPU time per message of each process"
    );
    println!(
        "{:<14} {:<7} {:>8} {:>9} {:>11} {:>11} {:>11}",
        "case", "system", "msg/s", "of relay", "own CPU", "broker CPU", "load CPU"
    );
    for (label, system, t) in &throughput {
        let relay = throughput
            .iter()
            .find(|(l, s, _)| l == label && *s == System::Relay);
        let ratio = match relay {
            Some((_, _, relay)) if *system == System::Runnel => {
                format!("{:.0}%", 100.0 * t.rate / relay.rate)
            }
            _ => String::new(),
        };
        println!(
            "{:<14} {:<7} {:>8.0} {:>9} {:>8.1} µs {:>8.1} µs {:>8.1} µs{}",
            label,
            system.name(),
            t.rate,
            ratio,
            t.cpu_us.subject,
            t.cpu_us.broker,
            t.cpu_us.load,
            t.lost_note()
        );
    }

    println!("\nlatency: publish to the output's arrival at the subscriber, paced");
    println!(
        "{:<14} {:<7} {:>8} {:>9} {:>9} {:>9} {:>12}",
        "case", "system", "rate/s", "p50 ms", "p99 ms", "max ms", "received"
    );
    for (label, system, l) in &latency {
        println!(
            "{:<14} {:<7} {:>8} {:>9.3} {:>9.3} {:>9.3} {:>12}{}",
            label,
            system.name(),
            l.rate,
            l.p50_ms,
            l.p99_ms,
            l.max_ms,
            format!("{}/{}", l.received, l.sent),
            if l.received < l.sent { "  LOST" } else { "" }
        );
    }

    let partial = [
        "RUNNEL_BENCH_QOS",
        "RUNNEL_BENCH_NODELAY",
        "RUNNEL_BENCH_SYSTEM",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some());
    if !partial {
        println!();
        idle_memory(&bin, dir.path());
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum System {
    Runnel,
    Relay,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Runnel => "runnel",
            System::Relay => "relay",
        }
    }
}

/// CPU time per message, in µs, of the system under test, the broker and
/// this process (publisher and subscriber).
#[derive(Clone, Default)]
struct CpuPerMessage {
    subject: f64,
    broker: f64,
    load: f64,
}

#[derive(Clone)]
struct Throughput {
    rate: f64,
    cpu_us: CpuPerMessage,
    lost: usize,
}

impl Throughput {
    fn lost_note(&self) -> String {
        if self.lost > 0 {
            format!("  LOST {} messages", self.lost)
        } else {
            String::new()
        }
    }
}

struct Latency {
    rate: u32,
    sent: usize,
    received: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

struct CaseResult {
    throughput: Throughput,
    latency: Vec<Latency>,
}

/// One system at one QoS on a fresh broker: warm-up, throughput rounds,
/// then the paced runs.
fn run_case(
    bin: &Path,
    dir: &Path,
    system: System,
    qos: u8,
    nodelay: bool,
    label: &str,
    ticks: f64,
) -> CaseResult {
    let case_dir = dir.join(format!("{}-qos{qos}-nodelay-{nodelay}", system.name()));
    let broker = start_broker(&case_dir.join("broker"), nodelay);
    let broker_pid = pid_with_arg(&case_dir.join("broker/mosquitto.conf").to_string_lossy())
        .expect("mosquitto's pid");
    let subject = Subject::start(bin, &case_dir, system, broker.port, qos);
    let mut driver = Driver::start(broker.port, qos);
    println!(
        "{} {label}: started (pid {}), warming up",
        system.name(),
        subject.pid
    );

    let warm = driver.blast(WARMUP);
    driver.wait(&warm);

    let mut rounds = Vec::new();
    for round in 0..THROUGHPUT_ROUNDS {
        let before = [
            cpu_s(subject.pid, ticks),
            cpu_s(broker_pid, ticks),
            cpu_s(std::process::id(), ticks),
        ];
        let phase = driver.blast(THROUGHPUT);
        let arrived = driver.wait(&phase);
        let after = [
            cpu_s(subject.pid, ticks),
            cpu_s(broker_pid, ticks),
            cpu_s(std::process::id(), ticks),
        ];
        let per_message = |i: usize| (after[i] - before[i]) * 1e6 / THROUGHPUT as f64;
        let lost = arrived.iter().filter(|a| a.is_none()).count();
        let last = arrived.iter().flatten().max().copied();
        let rate = match last {
            Some(last) => (THROUGHPUT - lost) as f64 / (last - phase.sent[0]).as_secs_f64(),
            None => 0.0,
        };
        println!(
            "{} {label}: throughput round {}: {rate:.0} msg/s{}",
            system.name(),
            round + 1,
            if lost > 0 {
                format!(", LOST {lost} of {THROUGHPUT}")
            } else {
                String::new()
            }
        );
        rounds.push(Throughput {
            rate,
            cpu_us: CpuPerMessage {
                subject: per_message(0),
                broker: per_message(1),
                load: per_message(2),
            },
            lost,
        });
    }
    rounds.sort_by(|a, b| a.rate.total_cmp(&b.rate));
    let mut throughput = rounds[rounds.len() / 2].clone();
    throughput.lost = rounds.iter().map(|r| r.lost).sum();

    let mut latency = Vec::new();
    for &(rate, duration) in PACED {
        let count = (f64::from(rate) * duration.as_secs_f64()) as usize;
        let phase = driver.paced(count, rate);
        let arrived = driver.wait(&phase);
        let mut ms: Vec<f64> = phase
            .sent
            .iter()
            .zip(&arrived)
            .filter_map(|(sent, got)| got.map(|got| (got - *sent).as_secs_f64() * 1e3))
            .collect();
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| {
            ms.get(((ms.len() as f64 * q) as usize).min(ms.len().saturating_sub(1)))
                .copied()
                .unwrap_or(f64::NAN)
        };
        let l = Latency {
            rate,
            sent: count,
            received: ms.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: ms.last().copied().unwrap_or(f64::NAN),
        };
        // What the pacing achieved: sleeps overshoot, and late messages go
        // out at once.
        let span = phase.sent[count - 1] - phase.sent[0];
        println!(
            "{} {label}: {rate}/s for {duration:?} (sent at {:.0}/s): \
             p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms{}",
            system.name(),
            (count - 1) as f64 / span.as_secs_f64(),
            l.p50_ms,
            l.p99_ms,
            l.max_ms,
            if l.received < l.sent {
                format!(", LOST {} of {}", l.sent - l.received, l.sent)
            } else {
                String::new()
            }
        );
        latency.push(l);
    }
    let peak_kb = Memory::of(subject.pid).peak;
    driver.report_extras(system, label);
    subject.stop(system, label, peak_kb);
    drop(driver);
    drop(broker);
    CaseResult {
        throughput,
        latency,
    }
}

fn start_broker(dir: &Path, nodelay: bool) -> Mosquitto {
    let config = if nodelay {
        "allow_anonymous true\nset_tcp_nodelay true"
    } else {
        "allow_anonymous true"
    };
    Mosquitto::start_with(dir, free_port(), config)
}

/// runnel or the relay, running as its own process.
struct Subject {
    pid: u32,
    process: Process,
}

enum Process {
    Runnel(Background, PathBuf),
    Relay(Child),
}

impl Subject {
    fn start(bin: &Path, dir: &Path, system: System, port: u16, qos: u8) -> Self {
        match system {
            System::Runnel => {
                let pipeline = dir.join("bench.toml");
                std::fs::write(&pipeline, bench_pipeline(port, qos)).expect("write pipeline");
                let mut runnel =
                    Background::start(bin, dir, &["run", &pipeline.to_string_lossy()], &[]);
                runnel.wait_for_log("subscribed", Duration::from_secs(90));
                let pid = pid_with_arg(&pipeline.to_string_lossy()).expect("runnel's pid");
                Subject {
                    pid,
                    process: Process::Runnel(runnel, dir.join("dead-letter.jsonl")),
                }
            }
            System::Relay => {
                let (child, pid) = start_relay(port, qos);
                Subject {
                    pid,
                    process: Process::Relay(child),
                }
            }
        }
    }

    fn stop(self, system: System, label: &str, peak_kb: u64) {
        match self.process {
            Process::Runnel(runnel, dead_letter) => {
                let run = runnel.stop();
                let dead = std::fs::read_to_string(&dead_letter)
                    .map(|t| t.lines().count())
                    .unwrap_or(0);
                println!(
                    "{} {label}: {}; {dead} dead letters; peak RSS {:.1} MB",
                    system.name(),
                    run.stderr
                        .lines()
                        .rev()
                        .find(|l| l.starts_with("runnel: "))
                        .unwrap_or("no summary line"),
                    peak_kb as f64 / 1024.0
                );
            }
            Process::Relay(mut child) => {
                println!(
                    "{} {label}: peak RSS {:.1} MB",
                    system.name(),
                    peak_kb as f64 / 1024.0
                );
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

/// The example chain between MQTT topics; the window stage is left out
/// because it emits only on its timer, so outputs would not match inputs
/// one to one.
fn bench_pipeline(port: u16, qos: u8) -> String {
    format!(
        r#"[pipeline]
name = "bench"
batch_size = 64

[mqtt.local]
broker = "mqtt://127.0.0.1:{port}"
client_id = "runnel-bench-{id}"

[source]
type = "mqtt"
topics = ["{INPUT_FILTER}"]
qos = {qos}
key = "sensors/{{key}}/telemetry"

{stages}
[sink]
type = "mqtt"
topic = "out/{{key}}"
qos = {qos}

[dead_letter]
type = "file"
path = "dead-letter.jsonl"
"#,
        id = unique(),
        stages = demo_stages(&["parse", "validate", "convert", "anomaly"]),
    )
}

/// The demo pipeline's `[[stage]]` tables for `names`, with the wasm paths
/// of the freshly built stages.
fn demo_stages(names: &[&str]) -> String {
    let configs: HashMap<&str, &str> = HashMap::from([
        (
            "parse",
            "[stage.config]\nunits = { temperature = \"C\", humidity = \"%\", pressure = \"hPa\" }\n\
             device_units = { dev-2 = { temperature = \"F\" } }\n",
        ),
        (
            "validate",
            "[stage.config]\nrequired = [\"temperature\"]\n\
             ranges = { temperature = { min = -40, max = 125 }, humidity = { min = 0, max = 100 } }\n",
        ),
        (
            "convert",
            "[stage.config]\nconvert = { temperature = \"C\" }\ndefault_tags = { site = \"plant-a\" }\n\
             devices = { dev-1 = { room = \"boiler\" }, dev-2 = { room = \"cold-store\" }, dev-3 = { room = \"roof\" } }\n",
        ),
        (
            "anomaly",
            "[stage.config]\nthreshold = 4.0\nwarmup = 8\n",
        ),
        (
            "window",
            "timeout_ms = 200\n[stage.config]\nsize_ms = 60000\n",
        ),
    ]);
    names
        .iter()
        .map(|name| {
            format!(
                "[[stage]]\nname = \"{name}\"\nwasm = {:?}\n{}\n",
                stage(name).to_string_lossy(),
                configs[name]
            )
        })
        .collect()
}

/// Message `id`: its topic and a reading padded to exactly PAYLOAD_BYTES
/// with a string field, which parse ignores.
fn message(id: u64) -> (String, Vec<u8>) {
    let device = format!("dev-{}", id % DEVICES);
    let head = format!(
        r#"{{"device":"{device}","ts":{},"temperature":{:.2},"humidity":{:.1},"fw":""#,
        BASE_TS + id,
        21.0 + (id % 7) as f64 * 0.1,
        40.0 + (id % 5) as f64
    );
    let pad = PAYLOAD_BYTES.saturating_sub(head.len() + 2);
    let payload = format!("{head}{}\"}}", "x".repeat(pad));
    (format!("sensors/{device}/telemetry"), payload.into_bytes())
}

/// The id in an output's `ts`, unless the output is an alert (which
/// carries its reading's `ts` too).
fn output_id(payload: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(payload).ok()?;
    if text.contains("\"score\"") {
        return None;
    }
    let rest = &text[text.find("\"ts\":")? + 5..];
    let digits: &str = &rest[..rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len())];
    digits.parse::<u64>().ok()?.checked_sub(BASE_TS)
}

enum Arrival {
    Output(u64, Instant),
    /// An anomaly alert or anything else without a reading's id.
    Other,
}

/// Messages handed to the publishing client, with when each was.
struct Phase {
    first: u64,
    sent: Vec<Instant>,
}

/// The load: one client publishing readings, one subscribed to the outputs,
/// both in this process.
struct Driver {
    qos: QoS,
    publisher: Client,
    subscriber: Client,
    arrivals: mpsc::Receiver<Arrival>,
    /// Set once the case is over, when the broker going away is no error.
    stopping: Arc<AtomicBool>,
    next_id: u64,
    duplicates: usize,
    others: usize,
}

fn client_options(id: &str, port: u16) -> MqttOptions {
    let mut options = MqttOptions::new(id, "127.0.0.1", port);
    options.set_keep_alive(Duration::from_secs(30));
    options.set_max_packet_size(1 << 20, 1 << 20);
    options
}

fn mqtt_qos(level: u8) -> QoS {
    if level == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

impl Driver {
    fn start(port: u16, qos: u8) -> Self {
        let qos = mqtt_qos(qos);
        let stopping = Arc::new(AtomicBool::new(false));
        let (subscriber, mut connection) = Client::new(
            client_options(&format!("bench-sub-{}", unique()), port),
            1000,
        );
        subscriber
            .subscribe("out/#", qos)
            .expect("queue a subscribe");
        let (arrived, arrivals) = mpsc::channel();
        let (subscribed_tx, subscribed) = mpsc::channel();
        let stop = stopping.clone();
        std::thread::spawn(move || {
            for event in connection.iter() {
                match event {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let at = Instant::now();
                        let arrival = match output_id(&p.payload) {
                            Some(id) => Arrival::Output(id, at),
                            None => Arrival::Other,
                        };
                        if arrived.send(arrival).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = subscribed_tx.send(());
                    }
                    Ok(_) => {}
                    Err(err) => {
                        if !stop.load(Ordering::Relaxed) {
                            eprintln!("!!! bench subscriber: {err}");
                        }
                        return;
                    }
                }
            }
        });
        subscribed
            .recv_timeout(Duration::from_secs(20))
            .expect("the bench's subscription was acknowledged");

        let mut options = client_options(&format!("bench-pub-{}", unique()), port);
        // A wide window so the publisher is not what sets the pace.
        options.set_inflight(1000);
        let (publisher, mut connection) = Client::new(options, 10_000);
        let stop = stopping.clone();
        std::thread::spawn(move || {
            for event in connection.iter() {
                if let Err(err) = event {
                    if !stop.load(Ordering::Relaxed) {
                        eprintln!("!!! bench publisher: {err}");
                    }
                    return;
                }
            }
        });
        Driver {
            qos,
            publisher,
            subscriber,
            arrivals,
            stopping,
            next_id: 0,
            duplicates: 0,
            others: 0,
        }
    }

    fn publish(&self, (topic, payload): (String, Vec<u8>)) {
        self.publisher
            .publish(topic, self.qos, false, payload)
            .expect("queue a publish");
    }

    /// Publishes `count` messages as fast as the client takes them.
    fn blast(&mut self, count: usize) -> Phase {
        let first = self.next_id;
        self.next_id += count as u64;
        let messages: Vec<_> = (first..first + count as u64).map(message).collect();
        let mut sent = Vec::with_capacity(count);
        for m in messages {
            sent.push(Instant::now());
            self.publish(m);
        }
        Phase { first, sent }
    }

    /// Publishes `count` messages at `rate` a second, each at its due time
    /// (or at once, when late).
    fn paced(&mut self, count: usize, rate: u32) -> Phase {
        let first = self.next_id;
        self.next_id += count as u64;
        let messages: Vec<_> = (first..first + count as u64).map(message).collect();
        let period = Duration::from_secs(1) / rate;
        let mut sent = Vec::with_capacity(count);
        let start = Instant::now();
        for (i, m) in messages.into_iter().enumerate() {
            let due = start + period * i as u32;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            sent.push(Instant::now());
            self.publish(m);
        }
        Phase { first, sent }
    }

    /// When each message of the phase arrived at the subscriber, `None`
    /// for those that did not within STALL of the last arrival.
    fn wait(&mut self, phase: &Phase) -> Vec<Option<Instant>> {
        let count = phase.sent.len();
        let mut arrived = vec![None; count];
        let mut got = 0;
        while got < count {
            match self.arrivals.recv_timeout(STALL) {
                Ok(Arrival::Output(id, at)) => {
                    let Some(index) = id.checked_sub(phase.first).map(|i| i as usize) else {
                        self.duplicates += 1;
                        continue;
                    };
                    match arrived.get_mut(index) {
                        Some(slot @ None) => {
                            *slot = Some(at);
                            got += 1;
                        }
                        _ => self.duplicates += 1,
                    }
                }
                Ok(Arrival::Other) => self.others += 1,
                Err(_) => {
                    eprintln!(
                        "!!! only {got} of {count} outputs arrived; nothing more for {STALL:?}"
                    );
                    break;
                }
            }
        }
        arrived
    }

    fn report_extras(&self, system: System, label: &str) {
        if self.duplicates > 0 || self.others > 0 {
            println!(
                "{} {label}: {} duplicate outputs, {} other messages (alerts)",
                system.name(),
                self.duplicates,
                self.others
            );
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.publisher.disconnect();
        let _ = self.subscriber.disconnect();
    }
}

/// Starts this benchmark again as the relay; returns once it subscribed.
fn start_relay(port: u16, qos: u8) -> (Child, u32) {
    let mut child = Command::new(std::env::current_exe().expect("own path"))
        .env(
            "RUNNEL_BENCH_RELAY",
            format!("{port} {qos} relay-{}", unique()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the relay");
    let stdout = child.stdout.take().expect("relay stdout");
    let (ready_tx, ready) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines() {
            match line {
                Ok(l) if l == "subscribed" => {
                    let _ = ready_tx.send(());
                }
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    ready
        .recv_timeout(Duration::from_secs(20))
        .expect("the relay subscribed");
    let pid = child.id();
    (child, pid)
}

/// The native relay: subscribes to the input filter and republishes each
/// payload to `out/DEVICE` at the same QoS. At QoS 1 each input is
/// acknowledged only once the broker acknowledged its republish, message
/// by message (no batches). Like runnel, it subscribes and publishes on two
/// client connections.
fn relay_main(spec: &str) {
    let mut parts = spec.split_whitespace();
    let port: u16 = parts
        .next()
        .and_then(|p| p.parse().ok())
        .expect("relay port");
    let qos = mqtt_qos(
        parts
            .next()
            .and_then(|q| q.parse().ok())
            .expect("relay qos"),
    );
    let id = parts.next().expect("relay client id").to_string();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
        .block_on(relay(port, qos, id));
}

async fn relay(port: u16, qos: QoS, id: String) {
    use rumqttc::AsyncClient;
    let options = |role: &str| {
        let mut o = client_options(&format!("{id}-{role}"), port);
        // As runnel's connections: a persistent session, 100 in flight.
        o.set_clean_session(false).set_inflight(100);
        o
    };
    let mut sub_options = options("sub");
    sub_options.set_manual_acks(true);
    let (sub, mut sub_loop) = AsyncClient::new(sub_options, 10_000);
    let (publ, mut pub_loop) = AsyncClient::new(options("pub"), 10_000);
    // As runnel's connections: Nagle's algorithm off.
    let mut network = rumqttc::NetworkOptions::new();
    network.set_tcp_nodelay(true);
    sub_loop.set_network_options(network.clone());
    pub_loop.set_network_options(network);
    sub.subscribe(INPUT_FILTER, qos)
        .await
        .expect("queue a subscribe");

    // Inputs whose republish was queued, in order: rumqttc names a publish's
    // packet id only in its Outgoing event, in queue order.
    let queued: Arc<Mutex<VecDeque<rumqttc::Publish>>> = Arc::default();
    let (inputs_tx, mut inputs) = tokio::sync::mpsc::unbounded_channel::<rumqttc::Publish>();
    let at_least_once = qos == QoS::AtLeastOnce;

    let queue = queued.clone();
    tokio::spawn(async move {
        while let Some(input) = inputs.recv().await {
            let device = input.topic.split('/').nth(1).unwrap_or("unknown");
            let topic = format!("out/{device}");
            let payload = input.payload.clone();
            if at_least_once {
                queue.lock().expect("queue lock").push_back(input);
            }
            publ.publish(topic, qos, false, payload)
                .await
                .expect("queue a republish");
        }
    });

    let acker = sub.clone();
    tokio::spawn(async move {
        let mut inflight: HashMap<u16, rumqttc::Publish> = HashMap::new();
        loop {
            match pub_loop.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(pkid))) if pkid != 0 => {
                    if let Some(input) = queued.lock().expect("queue lock").pop_front() {
                        inflight.insert(pkid, input);
                    }
                }
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    if let Some(input) = inflight.remove(&ack.pkid) {
                        acker.ack(&input).await.expect("queue an ack");
                    }
                }
                Ok(_) => {}
                Err(err) => {
                    eprintln!("relay publisher: {err}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });

    loop {
        match sub_loop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = inputs_tx.send(p);
            }
            Ok(Event::Incoming(Packet::SubAck(_))) => {
                println!("subscribed");
            }
            Ok(_) => {}
            Err(err) => {
                eprintln!("relay subscriber: {err}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Idle RSS of runnel with the whole example chain (all five demo stages)
/// between MQTT topics, and of the relay.
fn idle_memory(bin: &Path, dir: &Path) {
    println!("idle memory (VmRSS, a few seconds after subscribing, nothing flowing)");
    let dir = dir.join("idle");
    let broker = Mosquitto::start(&dir.join("broker"), free_port());
    let pipeline = dir.join("idle.toml");
    let text = format!(
        r#"[pipeline]
name = "idle"

[mqtt.local]
broker = "mqtt://127.0.0.1:{port}"
client_id = "runnel-idle-{id}"

[source]
type = "mqtt"
topics = ["{INPUT_FILTER}"]
qos = 1
key = "sensors/{{key}}/telemetry"

{stages}
[sink]
type = "mqtt"
topic = "out/{{key}}"
qos = 1
"#,
        port = broker.port,
        id = unique(),
        stages = demo_stages(&["parse", "validate", "convert", "anomaly", "window"]),
    );
    std::fs::write(&pipeline, text).expect("write pipeline");
    let path = pipeline.to_string_lossy().to_string();
    // Fills the compile cache, so the first measured start loads from it.
    let check = run_binary(bin, &dir, &["check", &path], b"");
    assert_eq!(check.status, Some(0), "runnel check:\n{}", check.stderr);

    for (label, args) in [
        (
            "runnel, 5 stages, compiled stages from the cache",
            vec!["run", &path],
        ),
        (
            "runnel, 5 stages, --no-cache (compiled at start)",
            vec!["run", "--no-cache", &path],
        ),
    ] {
        let mut runnel = Background::start(bin, &dir, &args, &[]);
        runnel.wait_for_log("subscribed", Duration::from_secs(90));
        std::thread::sleep(Duration::from_secs(3));
        let pid = pid_with_arg(&path).expect("runnel's pid");
        println!("{label:<50} {}", Memory::of(pid).describe());
        runnel.stop();
    }

    let (mut relay, pid) = start_relay(broker.port, 1);
    std::thread::sleep(Duration::from_secs(3));
    println!("{:<50} {}", "native relay", Memory::of(pid).describe());
    let _ = relay.kill();
    let _ = relay.wait();
}

/// A process's memory from /proc, in KiB.
struct Memory {
    rss: u64,
    peak: u64,
    /// Of `rss`: the heap, stacks and wasm memories.
    anon: u64,
    /// Of `rss`: pages mapped from files (the binary's code, cached stages).
    file: u64,
}

impl Memory {
    fn of(pid: u32) -> Self {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Memory {
            rss: field("VmRSS:"),
            peak: field("VmHWM:"),
            anon: field("RssAnon:"),
            file: field("RssFile:"),
        }
    }

    fn describe(&self) -> String {
        let mb = |kb: u64| kb as f64 / 1024.0;
        format!(
            "{:>5.1} MB ({:.1} MB anonymous, {:.1} MB from files; peak {:.1} MB)",
            mb(self.rss),
            mb(self.anon),
            mb(self.file),
            mb(self.peak)
        )
    }
}

/// User plus system CPU time of a process so far, in seconds.
fn cpu_s(pid: u32, ticks: f64) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which may hold spaces: utime and stime
    // are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<f64> = after
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    fields.iter().sum::<f64>() / ticks
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// The process whose command line holds `arg` (a path unique to this run).
fn pid_with_arg(arg: &str) -> Option<u32> {
    let me = std::process::id();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .find(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| c.split(|&b| b == 0).any(|a| a == arg.as_bytes()))
                .unwrap_or(false)
        })
}

/// The release binary: built now, unless RUNNEL_BENCH_BIN names one.
fn runnel_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("RUNNEL_BENCH_BIN") {
        return PathBuf::from(bin);
    }
    // A target folder of its own: built alone, runnel's dependencies unify
    // features differently from this benchmark's build, and sharing
    // target/release would rebuild the TLS stack and runnel each way.
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_dir().join("target"))
        .join("mqtt-bench");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "-p", "runnel", "--target-dir"])
        .arg(&target)
        .current_dir(repo_dir())
        .status()
        .expect("run cargo build");
    assert!(status.success(), "cargo build --release -p runnel failed");
    target.join("release/runnel")
}

fn mosquitto_version() -> String {
    let out = Command::new("/usr/sbin/mosquitto")
        .arg("-h")
        .output()
        .map(|o| {
            let mut text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&o.stderr));
            text
        })
        .unwrap_or_default();
    out.lines().next().unwrap_or("mosquitto").trim().to_string()
}
