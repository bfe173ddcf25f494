//! runnel against real brokers: mosquitto on a loopback port, and the
//! broker embedded in runnel. Every reading is accounted for through a
//! SIGKILL, a broker restart and an upstream outage.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use runnel_tests::mqtt::{by_topic, free_port, publish_all, Background, Collector, Mosquitto};
use runnel_tests::{http_get, metric, read_json_lines, stage, summary_numbers, unique};

const BIN: &str = env!("CARGO_BIN_EXE_runnel");
const STARTUP: Duration = Duration::from_secs(90);
const DELIVERY: Duration = Duration::from_secs(60);

/// `count` readings `{"n":i}` from ten devices, starting at `first`.
fn readings(first: usize, count: usize) -> Vec<(String, Vec<u8>)> {
    (first..first + count)
        .map(|n| {
            (
                format!("sensors/dev-{}/telemetry", n % 10),
                format!("{{\"n\":{n}}}").into_bytes(),
            )
        })
        .collect()
}

/// The `n` of every payload that holds one.
fn numbers(messages: &[(String, Vec<u8>)]) -> Vec<u64> {
    messages
        .iter()
        .filter_map(|(_, p)| serde_json::from_slice::<serde_json::Value>(p).ok())
        .filter_map(|v| v["n"].as_u64())
        .collect()
}

fn distinct(messages: &[(String, Vec<u8>)]) -> BTreeSet<u64> {
    numbers(messages).into_iter().collect()
}

/// A pipeline from MQTT through the `faults` stage (which passes readings
/// through and rejects the payload `reject`) to `out/{key}`, dead letters to
/// `dead/{key}`, on one connection described by `connection`.
fn pipeline(dir: &Path, connection: &str) {
    let text = format!(
        r#"
[pipeline]
name = "mqtt-test"
batch_size = 32

[mqtt.local]
{connection}

[source]
type = "mqtt"
topics = ["sensors/+/telemetry"]
qos = 1
key = "sensors/{{key}}/telemetry"

[[stage]]
name = "faults"
wasm = {:?}

[sink]
type = "mqtt"
topic = "out/{{key}}"
qos = 1

[dead_letter]
type = "mqtt"
topic = "dead/{{key}}"
qos = 1
"#,
        stage("faults").display().to_string()
    );
    std::fs::write(dir.join("p.toml"), text).expect("write pipeline");
}

/// A pipeline from one MQTT connection (`connection`, its table's lines)
/// subscribed to `topics`, through the `faults` stage, to `out.jsonl`, dead
/// letters to `dead.jsonl`.
fn file_pipeline(dir: &Path, connection: &str, topics: &[&str]) {
    let topics: Vec<String> = topics.iter().map(|t| format!("{t:?}")).collect();
    let text = format!(
        r#"
[mqtt.local]
{connection}
[source]
type = "mqtt"
topics = [{}]
[[stage]]
name = "faults"
wasm = {:?}
[sink]
type = "file"
path = "out.jsonl"
[dead_letter]
type = "file"
path = "dead.jsonl"
"#,
        topics.join(", "),
        stage("faults").display().to_string()
    );
    std::fs::write(dir.join("p.toml"), text).expect("write pipeline");
}

fn start(dir: &Path) -> Background {
    let mut runnel = Background::start(Path::new(BIN), dir, &["run", "p.toml"], &[]);
    runnel.wait_for_log("subscribed", STARTUP);
    runnel
}

/// Waits until the file holds `lines` lines, or the delivery time is up.
fn wait_for_lines(path: &Path, lines: usize) {
    let started = std::time::Instant::now();
    let count = || std::fs::read_to_string(path).map_or(0, |t| t.lines().count());
    while count() < lines && started.elapsed() < DELIVERY {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn persistent(url: &str) -> String {
    format!("broker = \"{url}\"\nclient_id = \"runnel-{}\"\n", unique())
}

#[test]
fn every_reading_through_mosquitto_is_delivered_and_bad_ones_are_dead_lettered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Mosquitto::start(&dir.path().join("broker"), free_port());
    let collector = Collector::start(broker.port, &["out/#", "dead/#"]);
    pipeline(dir.path(), &persistent(&broker.url()));
    let runnel = start(dir.path());

    let mut messages = readings(0, 1000);
    for i in 0..5 {
        messages.insert(
            i * 150,
            ("sensors/dev-3/telemetry".into(), b"reject".to_vec()),
        );
    }
    publish_all(broker.port, &messages);
    let got = collector.wait_until(DELIVERY, |got| {
        distinct(got).len() == 1000 && by_topic(got).get("dead/dev-3").map_or(0, Vec::len) >= 5
    });
    let run = runnel.stop();

    assert_eq!(distinct(&got), (0..1000).collect(), "{}", run.stderr);
    for (topic, payload) in &got {
        if let Some(n) = serde_json::from_slice::<serde_json::Value>(payload)
            .ok()
            .and_then(|v| v["n"].as_u64())
        {
            assert_eq!(topic, &format!("out/dev-{}", n % 10), "key from the topic");
        }
    }
    let dead = by_topic(&got).remove("dead/dev-3").unwrap_or_default();
    assert_eq!(dead.len(), 5, "{dead:?}");
    for entry in &dead {
        let entry: serde_json::Value = serde_json::from_str(entry).expect("JSON entry");
        assert_eq!(entry["stage"], "faults");
        assert_eq!(entry["reason"], "asked to reject");
        assert_eq!(entry["record"]["topic"], "sensors/dev-3/telemetry");
    }
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let n = summary_numbers(run.summary());
    assert_eq!(&n[..4], &[1005, 1000, 0, 5], "{}", run.summary());
    // The stop's own disconnect is no dropped connection to retry.
    assert!(!run.stderr.contains("retry_in_ms"), "{}", run.stderr);
}

#[test]
fn the_embedded_broker_carries_a_pipeline_end_to_end() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    pipeline(
        dir.path(),
        &format!("broker = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let runnel = start(dir.path());
    let collector = Collector::start(port, &["out/#"]);
    publish_all(port, &readings(0, 500));
    let got = collector.wait_until(DELIVERY, |got| distinct(got).len() == 500);
    let run = runnel.stop();
    assert_eq!(distinct(&got), (0..500).collect(), "{}", run.stderr);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert!(
        run.stderr.contains("embedded broker started"),
        "{}",
        run.stderr
    );
}

/// [`file_pipeline`] on an embedded broker whose `max_packet_kb` is 2; its
/// port.
fn embedded_with_small_packets(dir: &Path) -> u16 {
    let port = free_port();
    file_pipeline(
        dir,
        &format!("broker = \"embedded\"\nlisten = \"127.0.0.1:{port}\"\nmax_packet_kb = 2\n"),
        &["sensors/#"],
    );
    port
}

/// A reading of 5,016 bytes, over 2 KiB packets.
fn oversized_reading() -> String {
    format!("{{\"n\":1,\"pad\":\"{}\"}}", "x".repeat(5000))
}

/// The embedded broker takes a message over `max_packet_kb`, so the source
/// dead-letters it with the reason instead of the broker dropping the
/// device.
#[test]
fn the_embedded_broker_lets_an_oversized_message_reach_the_dead_letter() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = embedded_with_small_packets(dir.path());
    let runnel = start(dir.path());
    let big = oversized_reading();
    publish_all(
        port,
        &[
            ("sensors/a".to_string(), b"{\"n\":0}".to_vec()),
            ("sensors/a".to_string(), big.into_bytes()),
            ("sensors/a".to_string(), b"{\"n\":2}".to_vec()),
        ],
    );
    wait_for_lines(&dir.path().join("out.jsonl"), 2);
    wait_for_lines(&dir.path().join("dead.jsonl"), 1);
    let run = runnel.stop();
    let dead = read_json_lines(&dir.path().join("dead.jsonl"));
    assert_eq!(dead.len(), 1, "{}", run.stderr);
    assert_eq!(dead[0]["stage"], "source");
    let reason = dead[0]["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("over connection `local`'s max_packet_kb"),
        "{reason}"
    );
    assert_eq!(read_json_lines(&dir.path().join("out.jsonl")).len(), 2);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
}

/// A dead letter too large for the MQTT connection it goes to still gets
/// there, without the record's payload and saying why.
#[test]
fn a_dead_letter_over_the_packet_limit_arrives_without_its_payload() {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = embedded_with_small_packets(dir.path());
    let pipeline = dir.path().join("p.toml");
    let text = std::fs::read_to_string(&pipeline)
        .expect("read pipeline")
        .replace(
            "[dead_letter]\ntype = \"file\"\npath = \"dead.jsonl\"",
            "[dead_letter]\ntype = \"mqtt\"\ntopic = \"dead/source\"\nqos = 1",
        );
    std::fs::write(&pipeline, text).expect("write pipeline");
    let runnel = start(dir.path());
    let collector = Collector::start(port, &["dead/#"]);
    let big = oversized_reading();
    publish_all(
        port,
        &[
            ("sensors/a".to_string(), big.into_bytes()),
            ("sensors/a".to_string(), b"{\"n\":2}".to_vec()),
        ],
    );
    let got = collector.wait_until(DELIVERY, |got| !got.is_empty());
    wait_for_lines(&dir.path().join("out.jsonl"), 1);
    let run = runnel.stop();
    assert_eq!(got.len(), 1, "{}", run.stderr);
    let entry: serde_json::Value = serde_json::from_slice(&got[0].1).expect("JSON entry");
    assert_eq!(entry["stage"], "source", "{entry}");
    assert_eq!(entry["record"]["topic"], "sensors/a", "{entry}");
    assert_eq!(entry["record"]["text"], "", "{entry}");
    let omitted = entry["payload_omitted"].as_str().unwrap_or_default();
    assert!(
        omitted.starts_with("5016 bytes; the dead-letter sink refused the whole entry:")
            && omitted.contains("max_packet_kb"),
        "{omitted}"
    );
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert!(
        run.summary().ends_with("1 dead-letter entries"),
        "{}",
        run.summary()
    );
}

#[test]
fn mqtt5_user_properties_become_headers() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Mosquitto::start(&dir.path().join("broker"), free_port());
    file_pipeline(
        dir.path(),
        &format!("broker = \"{}\"\nprotocol = \"5\"", broker.url()),
        &["sensors/#"],
    );
    let runnel = start(dir.path());
    let status = std::process::Command::new("mosquitto_pub")
        .args(["-V", "5", "-p", &broker.port.to_string(), "-q", "1"])
        .args(["-t", "sensors/dev-1/telemetry", "-m", "{\"n\":1}"])
        .args(["-D", "publish", "user-property", "site", "plant-a"])
        .status()
        .expect("mosquitto_pub");
    assert!(status.success());
    let out = dir.path().join("out.jsonl");
    let started = std::time::Instant::now();
    while std::fs::metadata(&out).map_or(0, |m| m.len()) == 0 && started.elapsed() < DELIVERY {
        std::thread::sleep(Duration::from_millis(50));
    }
    let run = runnel.stop();
    let records = read_json_lines(&out);
    assert_eq!(records.len(), 1, "{}", run.stderr);
    assert_eq!(records[0]["topic"], "sensors/dev-1/telemetry");
    assert_eq!(records[0]["headers"]["site"], "plant-a", "{:?}", records[0]);
    assert_eq!(records[0]["payload"]["n"], 1);
}

/// Outputs whose topic or headers hold a character mosquitto refuses (it
/// closes the connection, and the message would be sent again forever) are
/// dead-lettered, and those after them arrive; an output's `mqtt.retain`
/// header sets its own retain flag.
#[test]
fn control_characters_in_a_topic_or_header_are_dead_lettered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Mosquitto::start(&dir.path().join("broker"), free_port());
    let collector = Collector::start(broker.port, &["out/#"]);
    let text = format!(
        r#"
[mqtt.out]
broker = "{url}"
client_id = "runnel-out-{id}"
protocol = "5"

[source]
type = "stdin"
format = "record"

[sink]
type = "mqtt"
topic = "out/{{key}}"
qos = 1

[dead_letter]
type = "file"
path = "dead.jsonl"
"#,
        url = broker.url(),
        id = unique(),
    );
    std::fs::write(dir.path().join("p.toml"), text).expect("write pipeline");
    let input = concat!(
        r#"{"payload":{"n":1},"key":"dev-1"}"#,
        "\n",
        r#"{"payload":{"n":2},"key":"dev-2","headers":{"trace":"a\u0001b"}}"#,
        "\n",
        r#"{"payload":{"n":3},"key":"dev\n3"}"#,
        "\n",
        r#"{"payload":{"n":4},"key":"dev-4","headers":{"bad\u007fname":"x"}}"#,
        "\n",
        r#"{"payload":{"n":5},"key":"dev-5","headers":{"trace":"fine"}}"#,
        "\n",
        // The one message the broker keeps for later subscribers.
        r#"{"payload":{"n":6},"key":"dev-6","headers":{"mqtt.retain":"true"}}"#,
        "\n",
        r#"{"payload":{"n":7},"key":"dev-7","headers":{"mqtt.retain":"yes"}}"#,
        "\n",
    );
    let run = runnel_tests::run_binary(
        Path::new(BIN),
        dir.path(),
        &["run", "p.toml"],
        input.as_bytes(),
    );
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let got = collector.wait_until(DELIVERY, |got| distinct(got).len() == 3);
    assert_eq!(distinct(&got), BTreeSet::from([1, 5, 6]), "{}", run.stderr);
    let dead = read_json_lines(&dir.path().join("dead.jsonl"));
    assert_eq!(dead.len(), 4, "{dead:?}");
    for entry in &dead[..3] {
        assert_eq!(entry["stage"], "sink", "{entry}");
        let reason = entry["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("a character MQTT tells clients not to send"),
            "{reason}"
        );
    }
    assert_eq!(
        dead[3]["reason"],
        "the sink refused it: header mqtt.retain is \"yes\"; it takes true or false"
    );
    // A header's value is not repeated in the reason: it may be a secret.
    assert!(
        !dead[0]["reason"].to_string().contains("a\\u0001b"),
        "{}",
        dead[0]
    );
    assert!(
        run.summary()
            .contains("7 in: 3 produced output, 0 filtered, 4 dead-lettered"),
        "{}",
        run.summary()
    );
    // Only the message marked retained is kept for a later subscriber.
    let late = Collector::start(broker.port, &["out/#"]);
    late.wait_until(Duration::from_secs(5), |got| !got.is_empty());
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(distinct(&late.received()), BTreeSet::from([6]));
}

/// One message too large for the source's connection, one whose output is
/// too large for the sink's: each is dead-lettered with the reason, and the
/// readings around them go through, on both protocol versions.
#[test]
fn oversized_messages_in_and_out_are_dead_lettered_and_the_stream_goes_on() {
    for protocol in ["3.1.1", "5"] {
        let dir = tempfile::tempdir().expect("temp dir");
        let broker = Mosquitto::start(&dir.path().join("broker"), free_port());
        let collector = Collector::start(broker.port, &["out/#"]);
        let text = format!(
            r#"
[mqtt.local]
broker = "{url}"
client_id = "runnel-in-{id}"
protocol = "{protocol}"
max_packet_kb = 512

[mqtt.out]
broker = "{url}"
client_id = "runnel-out-{id}"
protocol = "{protocol}"
max_packet_kb = 64

[source]
type = "mqtt"
connection = "local"
topics = ["sensors/+/telemetry"]
key = "sensors/{{key}}/telemetry"

[[stage]]
name = "faults"
wasm = {wasm:?}

[sink]
type = "mqtt"
connection = "out"
topic = "out/{{key}}/{{key}}"

[dead_letter]
type = "file"
path = "dead.jsonl"
"#,
            url = broker.url(),
            id = unique(),
            wasm = stage("faults").display().to_string()
        );
        std::fs::write(dir.path().join("p.toml"), text).expect("write pipeline");
        let runnel = start(dir.path());
        let padded = |n: usize, bytes: usize| {
            let mut payload = format!("{{\"n\":{n},\"pad\":\"").into_bytes();
            payload.resize(bytes, b'x');
            payload.extend_from_slice(b"\"}");
            payload
        };
        let topic = |dev: &str| format!("sensors/{dev}/telemetry");
        publish_all(
            broker.port,
            &[
                (topic("dev-1"), padded(1, 100)),
                // Through the source (512 KiB), too large for the sink (64 KiB).
                (topic("dev-2"), padded(2, 100 << 10)),
                // Too large for the source.
                (topic("dev-3"), padded(3, 600 << 10)),
                (topic("dev-4"), padded(4, 100)),
                // A key whose output topic would be over MQTT's 65,535 bytes:
                // sent anyway, its length would wrap into another topic.
                (topic(&"k".repeat(40_000)), padded(5, 100)),
            ],
        );
        let got = collector.wait_until(DELIVERY, |got| distinct(got).len() == 2);
        let dead_file = dir.path().join("dead.jsonl");
        wait_for_lines(&dead_file, 3);
        let run = runnel.stop();
        assert_eq!(
            distinct(&got),
            BTreeSet::from([1, 4]),
            "{protocol}: {}",
            run.stderr
        );
        let dead = read_json_lines(&dead_file);
        assert_eq!(dead.len(), 3, "{protocol}: {dead:?}\n{}", run.stderr);
        let long_topic = dead
            .iter()
            .find(|d| d["record"]["key"].as_str().map(str::len) == Some(40_000))
            .expect("the record with the long key is dead-lettered");
        assert_eq!(long_topic["stage"], "sink", "{protocol}");
        let reason = long_topic["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("the topic would be 80005 bytes, over MQTT's limit of 65535"),
            "{protocol}: {reason}"
        );
        let by_stage: std::collections::HashMap<&str, &serde_json::Value> = dead
            .iter()
            .filter(|d| d["record"]["key"].as_str().map(str::len) != Some(40_000))
            .map(|d| (d["stage"].as_str().unwrap_or_default(), d))
            .collect();
        let sink = by_stage.get("sink").expect("a dead letter from the sink");
        assert_eq!(sink["record"]["key"], "dev-2", "{protocol}");
        let reason = sink["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("max_packet_kb (65536 bytes)"),
            "{protocol}: {reason}"
        );
        let source = by_stage
            .get("source")
            .expect("a dead letter from the source");
        assert_eq!(source["record"]["topic"], topic("dev-3"), "{protocol}");
        let reason = source["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains("max_packet_kb (524288 bytes)"),
            "{protocol}: {reason}"
        );
        assert_eq!(run.status, Some(0), "{protocol}: {}", run.stderr);
        let n = summary_numbers(run.summary());
        assert_eq!(&n[..4], &[5, 2, 0, 3], "{protocol}: {}", run.summary());
        assert!(
            !run.stderr.contains("reconnected"),
            "{protocol}: no connection dropped over them:\n{}",
            run.stderr
        );
    }
}

/// A persistent session keeps the subscriptions of an earlier run: a
/// message through one the pipeline no longer has is dead-lettered, not run.
#[test]
fn a_subscription_left_by_an_earlier_run_is_not_taken_for_input() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Mosquitto::start(&dir.path().join("broker"), free_port());
    let client = persistent(&broker.url());
    file_pipeline(dir.path(), &client, &["frames/#"]);
    start(dir.path()).stop();
    file_pipeline(dir.path(), &client, &["sensors/+/telemetry"]);
    let runnel = start(dir.path());
    publish_all(
        broker.port,
        &[
            ("frames/a/raw".into(), b"{\"n\":1}".to_vec()),
            ("sensors/dev-1/telemetry".into(), b"{\"n\":2}".to_vec()),
        ],
    );
    let dead_file = dir.path().join("dead.jsonl");
    wait_for_lines(&dead_file, 1);
    wait_for_lines(&dir.path().join("out.jsonl"), 1);
    let run = runnel.stop();
    let out = read_json_lines(&dir.path().join("out.jsonl"));
    assert_eq!(out.len(), 1, "{out:?}\n{}", run.stderr);
    assert_eq!(out[0]["payload"]["n"], 2);
    let dead = read_json_lines(&dead_file);
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["stage"], "source");
    assert_eq!(dead[0]["record"]["topic"], "frames/a/raw");
    let reason = dead[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("clean_start = true"), "{reason}");
}

/// On MQTT 5 a resumed session does not take a retained message again.
#[test]
fn a_retained_message_is_taken_once_across_restarts_on_mqtt5() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Mosquitto::start(&dir.path().join("broker"), free_port());
    let connection = format!("{}protocol = \"5\"", persistent(&broker.url()));
    file_pipeline(dir.path(), &connection, &["sensors/#"]);
    let status = std::process::Command::new("mosquitto_pub")
        .args(["-V", "5", "-p", &broker.port.to_string(), "-q", "1", "-r"])
        .args(["-t", "sensors/dev-1/telemetry", "-m", "{\"n\":1}"])
        .status()
        .expect("mosquitto_pub");
    assert!(status.success());
    let out = dir.path().join("out.jsonl");
    let first = start(dir.path());
    wait_for_lines(&out, 1);
    let first = first.stop();
    // A retained message comes right after the subscription; a reading
    // published after it marks that anything retained has come by then.
    let second = start(dir.path());
    publish_all(
        broker.port,
        &[("sensors/dev-2/telemetry".into(), b"{\"n\":2}".to_vec())],
    );
    wait_for_lines(&out, 2);
    let second = second.stop();
    let numbers: Vec<_> = read_json_lines(&out)
        .iter()
        .map(|r| r["payload"]["n"].as_u64())
        .collect();
    assert_eq!(numbers, [Some(1), Some(2)], "{}", second.stderr);
    assert_eq!(&summary_numbers(first.summary())[..2], &[1, 1]);
    assert_eq!(&summary_numbers(second.summary())[..2], &[1, 1]);
}

#[test]
fn sigkill_mid_stream_then_restart_loses_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Mosquitto::start(&dir.path().join("broker"), free_port());
    let collector = Collector::start(broker.port, &["out/#"]);
    pipeline(dir.path(), &persistent(&broker.url()));
    let runnel = start(dir.path());

    let port = broker.port;
    let publisher = std::thread::spawn(move || {
        for chunk in 0..30 {
            publish_all(port, &readings(chunk * 100, 100));
            std::thread::sleep(Duration::from_millis(30));
        }
    });
    collector.wait_until(DELIVERY, |got| distinct(got).len() >= 300);
    runnel.kill();
    let before_restart = distinct(&collector.received()).len();
    let runnel = start(dir.path());
    publisher.join().expect("publisher");
    let got = collector.wait_until(DELIVERY, |got| distinct(got).len() == 3000);
    let run = runnel.stop();
    assert!(
        before_restart < 3000,
        "the kill came after the stream ended"
    );
    assert_eq!(distinct(&got), (0..3000).collect(), "{}", run.stderr);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
}

#[test]
fn a_broker_restart_mid_stream_loses_nothing() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut broker = Mosquitto::start(&dir.path().join("broker"), free_port());
    let collector = Collector::start(broker.port, &["out/#"]);
    pipeline(dir.path(), &persistent(&broker.url()));
    let mut runnel = start(dir.path());

    publish_all(broker.port, &readings(0, 2000));
    broker.restart();
    publish_all(broker.port, &readings(2000, 1000));
    let got = collector.wait_until(DELIVERY, |got| distinct(got).len() == 3000);
    runnel.wait_for_log("reconnected", Duration::from_secs(5));
    let run = runnel.stop();
    assert_eq!(distinct(&got), (0..3000).collect(), "{}", run.stderr);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
}

#[test]
fn a_stop_gives_up_on_outputs_for_a_broker_out_of_reach_and_the_next_start_delivers_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let source = Mosquitto::start(&dir.path().join("source"), free_port());
    let mut sink = Mosquitto::start(&dir.path().join("sink"), free_port());
    let metrics_port = free_port();
    let text = format!(
        r#"
[mqtt.in]
{}
[mqtt.out]
{}
[metrics]
listen = "127.0.0.1:{metrics_port}"

[source]
type = "mqtt"
connection = "in"
topics = ["sensors/+/telemetry"]
qos = 1
key = "sensors/{{key}}/telemetry"

[[stage]]
name = "faults"
wasm = {:?}

[sink]
type = "mqtt"
connection = "out"
topic = "out/{{key}}"
qos = 1
"#,
        persistent(&source.url()),
        persistent(&sink.url()),
        stage("faults").display().to_string()
    );
    std::fs::write(dir.path().join("p.toml"), text).expect("write pipeline");
    let mut runnel = start(dir.path());

    sink.stop();
    // One reading, so one batch: the figures are published once it is
    // handed to the sink, and nothing else waits for the broker.
    publish_all(source.port, &readings(0, 1));
    let started = std::time::Instant::now();
    while metric(&scrape(metrics_port), "runnel_inputs_total{") != Some(1.0) {
        assert!(started.elapsed() < DELIVERY, "{}", runnel.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    runnel.terminate();
    runnel.wait_for_log("stopping", DELIVERY);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        runnel.running(),
        "runnel should wait for the outputs under way:\n{}",
        runnel.log()
    );
    runnel.terminate();
    let run = runnel.finish();
    assert_eq!(run.status, Some(1), "{}", run.stderr);
    for said in [
        "for up to 20 s; a second Ctrl-C, SIGTERM or SIGHUP stops at once",
        "their inputs were not acknowledged",
        // The figures so far: one reading in, its output never accepted.
        "until then: 1 in: 0 produced output, 0 filtered, 0 dead-lettered, 1 not finished; 0 out",
    ] {
        assert!(run.stderr.contains(said), "{said}\n{}", run.stderr);
    }

    sink.restart();
    let collector = Collector::start(sink.port, &["out/#"]);
    let runnel = start(dir.path());
    let got = collector.wait_until(DELIVERY, |got| !got.is_empty());
    let run = runnel.stop();
    assert_eq!(distinct(&got), (0..1).collect(), "{}", run.stderr);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
}

/// The metrics endpoint's text, checked to be served as Prometheus wants it.
fn scrape(port: u16) -> String {
    let (status, body) = http_get(port, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("# TYPE runnel_inputs_total counter"),
        "{body}"
    );
    body
}

/// The metrics text once `series` reads `value`, or after 10 s as it is then.
fn scrape_until(port: u16, series: &str, value: f64) -> String {
    let started = std::time::Instant::now();
    loop {
        let figures = scrape(port);
        if metric(&figures, series) == Some(value) || started.elapsed() > Duration::from_secs(10) {
            return figures;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn outputs_for_an_unreachable_upstream_are_spooled_and_replayed_in_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let local = free_port();
    let upstream_port = free_port();
    let metrics_port = free_port();
    let text = spool_pipeline(local, upstream_port, metrics_port, 4, "refuse-new");
    let text = text.replace("[pipeline]\n", "[pipeline]\nbatch_size = 16\n");
    std::fs::write(dir.path().join("p.toml"), text).expect("write pipeline");
    let one_device = |first: usize| -> Vec<(String, Vec<u8>)> {
        (first..first + 100)
            .map(|n| {
                (
                    "sensors/dev-1/telemetry".into(),
                    format!("{{\"n\":{n}}}").into_bytes(),
                )
            })
            .collect()
    };
    let spooled = || {
        std::fs::read_to_string(dir.path().join("spool/spool.jsonl"))
            .map_or(0, |t| t.lines().count())
    };

    // Upstream down: outputs go to the spool, and survive a restart.
    let mut runnel = start(dir.path());
    publish_all(local, &one_device(0));
    let started = std::time::Instant::now();
    while spooled() < 100 && started.elapsed() < DELIVERY {
        std::thread::sleep(Duration::from_millis(50));
    }
    runnel.wait_for_log("messages are spooled", Duration::from_secs(10));
    let upstream = "connection=\"upstream\",role=\"publish\"}";
    let local_in = "connection=\"local\",role=\"subscribe\"}";
    // The file holds a message before the spool has synced and counted it,
    // so the figures may lag the file by a moment.
    let spooled_now = format!("runnel_mqtt_spooled_messages{{pipeline=\"pipeline\",{upstream}");
    let figures = scrape_until(metrics_port, &spooled_now, 100.0);
    let run = runnel.stop();
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(spooled(), 100, "{}", run.stderr);
    let series = |name: &str, labels: &str| {
        metric(&figures, &format!("{name}{{pipeline=\"pipeline\",{labels}"))
    };
    assert_eq!(
        series("runnel_mqtt_spooled_messages", upstream),
        Some(100.0),
        "{figures}"
    );
    assert!(
        series("runnel_mqtt_spooled_bytes", upstream) > Some(1000.0),
        "{figures}"
    );
    assert_eq!(
        series("runnel_mqtt_connected", upstream),
        Some(0.0),
        "{figures}"
    );
    assert_eq!(
        series("runnel_mqtt_connected", local_in),
        Some(1.0),
        "{figures}"
    );
    assert_eq!(
        series("runnel_stage_records_in_total", "stage=\"faults\"}"),
        Some(100.0),
        "{figures}"
    );
    assert_eq!(
        metric(&figures, "runnel_inputs_total{"),
        Some(100.0),
        "{figures}"
    );

    // Upstream back: the spool drains first, then new outputs follow.
    let broker = Mosquitto::start(&dir.path().join("upstream"), upstream_port);
    let collector = Collector::start(upstream_port, &["up/#"]);
    let mut runnel = start(dir.path());
    publish_all(local, &one_device(100));
    let got = collector.wait_until(DELIVERY, |got| distinct(got).len() == 200);
    runnel.wait_for_log("spool drained", Duration::from_secs(10));
    let figures = scrape_until(metrics_port, &spooled_now, 0.0);
    let run = runnel.stop();
    drop(broker);
    assert_eq!(
        metric(
            &figures,
            &format!("runnel_mqtt_spooled_messages{{pipeline=\"pipeline\",{upstream}")
        ),
        Some(0.0),
        "{figures}"
    );
    assert_eq!(
        metric(
            &figures,
            &format!("runnel_mqtt_connected{{pipeline=\"pipeline\",{upstream}")
        ),
        Some(1.0),
        "{figures}"
    );

    let mut first_seen = Vec::new();
    for n in numbers(&got) {
        if !first_seen.contains(&n) {
            first_seen.push(n);
        }
    }
    assert_eq!(first_seen, (0..200).collect::<Vec<u64>>(), "{}", run.stderr);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
}

/// A pipeline from an embedded broker on `local` through the `faults` stage
/// to an upstream broker on `upstream` with a spool of `max_mb`, and metrics.
fn spool_pipeline(local: u16, upstream: u16, metrics: u16, max_mb: u64, when_full: &str) -> String {
    format!(
        r#"
[pipeline]

[mqtt.local]
broker = "embedded"
listen = "127.0.0.1:{local}"
client_id = "runnel-spool-local"

[mqtt.upstream]
broker = "mqtt://127.0.0.1:{upstream}"
client_id = "runnel-spool-upstream"
[mqtt.upstream.spool]
path = "spool"
max_mb = {max_mb}
when_full = "{when_full}"

[metrics]
listen = "127.0.0.1:{metrics}"

[source]
type = "mqtt"
connection = "local"
topics = ["sensors/+/telemetry"]
key = "sensors/{{key}}/telemetry"

[[stage]]
name = "faults"
wasm = {:?}

[sink]
type = "mqtt"
connection = "upstream"
topic = "up/{{key}}"
"#,
        stage("faults").display().to_string()
    )
}

/// 2,500 outputs of about 600 bytes for an upstream that is down, through
/// a 1 MB spool with `when_full`; then the upstream comes back. Returns the
/// numbers it received, each at its first arrival, the runnel log, and the
/// spool's dropped-messages count from the metrics once all were delivered.
fn fill_the_spool(when_full: &str) -> (Vec<u64>, String, Option<f64>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let local = free_port();
    let upstream_port = free_port();
    let metrics_port = free_port();
    let text = spool_pipeline(local, upstream_port, metrics_port, 1, when_full);
    std::fs::write(dir.path().join("p.toml"), text).expect("write pipeline");
    // About 600 bytes each: the 1 MB spool is full after some 1,700.
    let pad = "x".repeat(580);
    let messages: Vec<(String, Vec<u8>)> = (0..2500)
        .map(|n| {
            (
                "sensors/dev-1/telemetry".into(),
                format!("{{\"n\":{n},\"pad\":\"{pad}\"}}").into_bytes(),
            )
        })
        .collect();
    let mut runnel = start(dir.path());
    publish_all(local, &messages);
    let full = if when_full == "refuse-new" {
        "spool full"
    } else {
        "dropped the oldest"
    };
    runnel.wait_for_log(full, DELIVERY);

    let broker = Mosquitto::start(&dir.path().join("upstream"), upstream_port);
    let collector = Collector::start(upstream_port, &["up/#"]);
    let got = collector.wait_until(DELIVERY, |got| distinct(got).contains(&2499));
    runnel.wait_for_log("spool drained", Duration::from_secs(10));
    let figures = scrape(metrics_port);
    let spool_file = dir.path().join("spool").join("spool.jsonl");
    let left = std::fs::metadata(&spool_file).expect("spool file").len();
    assert_eq!(left, 0, "a drained spool takes no room on the disk");
    let run = runnel.stop();
    drop(broker);
    let mut first_seen = Vec::new();
    let mut seen = BTreeSet::new();
    for n in numbers(&got) {
        if seen.insert(n) {
            first_seen.push(n);
        }
    }
    let dropped = metric(
        &figures,
        "runnel_mqtt_spool_dropped_total{pipeline=\"pipeline\",connection=\"upstream\",role=\"publish\"}",
    );
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    (first_seen, run.stderr, dropped)
}

/// A `refuse-new` spool that fills: what it refused waits, and follows the
/// spooled messages once the upstream is back, not between their chunks.
/// (The collector subscribes as the upstream starts, and may miss the
/// first messages runnel sends it: a prefix, never a gap.)
#[test]
fn outputs_a_full_spool_refused_follow_the_spooled_ones_in_order() {
    let (got, log, dropped) = fill_the_spool("refuse-new");
    let out_of_order = got.windows(2).find(|w| w[1] != w[0] + 1);
    assert_eq!(out_of_order, None, "{log}");
    assert_eq!(got.last(), Some(&2499), "{log}");
    assert!(got.len() > 1000, "{} arrived: {log}", got.len());
    assert_eq!(dropped, Some(0.0));
}

/// A `drop-oldest` spool that fills keeps the newest, in order, and counts
/// what it dropped in the log and the metrics alike.
#[test]
fn a_full_drop_oldest_spool_keeps_the_newest_and_counts_the_rest() {
    let (got, log, dropped) = fill_the_spool("drop-oldest");
    let out_of_order = got.windows(2).find(|w| w[1] <= w[0]);
    assert_eq!(out_of_order, None, "{log}");
    assert_eq!(got.last(), Some(&2499), "{log}");
    let logged: u64 = log
        .lines()
        .filter(|line| line.contains("dropped the oldest"))
        .filter_map(|line| line.split("dropped=").nth(1))
        .filter_map(|n| n.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    assert!(logged > 0, "nothing was dropped: {log}");
    assert_eq!(dropped, Some(logged as f64), "{log}");
    // The run's own figures say so too, not only the log and the metrics.
    let said = format!("; {logged} sent, then dropped from a full spool");
    assert!(
        log.lines()
            .any(|l| l.starts_with("runnel: ") && l.ends_with(&said)),
        "{log}"
    );
    assert!(got.len() as u64 <= 2500 - logged, "{log}");
}

#[test]
fn refused_credentials_stop_the_run_with_a_clear_error_and_no_password_in_the_log() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker_dir = dir.path().join("broker");
    std::fs::create_dir_all(&broker_dir).expect("broker dir");
    let passwords = broker_dir.join("passwords");
    let made = std::process::Command::new("mosquitto_passwd")
        .args(["-b", "-c"])
        .arg(&passwords)
        .args(["gateway", "right-secret"])
        .status()
        .expect("mosquitto_passwd");
    assert!(made.success());
    let broker = Mosquitto::start_with(
        &broker_dir,
        free_port(),
        &format!(
            "allow_anonymous false\npassword_file {}",
            passwords.display()
        ),
    );
    pipeline(
        dir.path(),
        &format!(
            "{}username_env = \"TEST_MQTT_USER\"\npassword_env = \"TEST_MQTT_PASSWORD\"\n",
            persistent(&broker.url())
        ),
    );
    let runnel = Background::start(
        Path::new(BIN),
        dir.path(),
        &["run", "p.toml"],
        &[
            ("TEST_MQTT_USER", "gateway"),
            ("TEST_MQTT_PASSWORD", "wrong-secret"),
        ],
    );
    let run = runnel.finish();
    assert_eq!(run.status, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("connection `local`")
            && (run.stderr.contains("BadUserNamePassword") || run.stderr.contains("NotAuthorized"))
            && run.stderr.contains("username_env and password_env"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("wrong-secret"), "{}", run.stderr);
}

#[test]
fn an_unreachable_broker_is_retried_and_said_so() {
    let dir = tempfile::tempdir().expect("temp dir");
    pipeline(
        dir.path(),
        &persistent(&format!("mqtt://127.0.0.1:{}", free_port())),
    );
    let mut runnel = Background::start(Path::new(BIN), dir.path(), &["run", "p.toml"], &[]);
    runnel.wait_for_log("retry_in_ms", STARTUP);
    let run = runnel.stop();
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert!(
        run.stderr.contains("connection `local` (mqtt://127.0.0.1:")
            && run.stderr.contains("Connection refused"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_missing_credential_variable_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    pipeline(
        dir.path(),
        "broker = \"mqtt://127.0.0.1:1\"\nusername_env = \"TEST_MQTT_NOBODY_SET_THIS\"\n",
    );
    let run = Background::start(Path::new(BIN), dir.path(), &["run", "p.toml"], &[]).finish();
    // As for a bad pipeline file: starting again cannot help.
    assert_eq!(run.status, Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains("mqtt.local: username_env names the environment variable TEST_MQTT_NOBODY_SET_THIS, which is not set"),
        "{}",
        run.stderr
    );
}

#[test]
fn two_instances_split_a_shared_subscription() {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Mosquitto::start(&dir.path().join("broker"), free_port());
    let collector = Collector::start(broker.port, &["out/#"]);
    let mut instances = Vec::new();
    for name in ["a", "b"] {
        let sub = dir.path().join(name);
        std::fs::create_dir_all(&sub).expect("instance dir");
        pipeline(&sub, &persistent(&broker.url()));
        let text = std::fs::read_to_string(sub.join("p.toml")).expect("pipeline");
        let text = text.replace(
            "topics = [\"sensors/+/telemetry\"]",
            "topics = [\"$share/gateways/sensors/+/telemetry\"]",
        );
        std::fs::write(sub.join("p.toml"), text).expect("pipeline");
        instances.push(start(&sub));
    }
    publish_all(broker.port, &readings(0, 1000));
    let got = collector.wait_until(DELIVERY, |got| distinct(got).len() == 1000);
    let runs: Vec<_> = instances.into_iter().map(Background::stop).collect();
    assert_eq!(distinct(&got), (0..1000).collect());
    let inputs: Vec<u64> = runs
        .iter()
        .map(|r| summary_numbers(r.summary())[0])
        .collect();
    assert_eq!(
        inputs.iter().sum::<u64>(),
        1000,
        "each reading went to one instance"
    );
    assert!(
        inputs.iter().all(|&n| n > 0),
        "both instances took a share: {inputs:?}"
    );
}

/// A CA, and a certificate it signed for `localhost` (server) or a client.
fn make_certificates(dir: &Path, ca: &str, leaves: &[&str]) {
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("openssl (installed by scripts/setup)");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ca_key = format!("{ca}.key");
    let ca_crt = format!("{ca}.crt");
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN={ca}"),
        "-keyout",
        &ca_key,
        "-out",
        &ca_crt,
    ]);
    std::fs::write(
        dir.join("san.ext"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .expect("ext");
    for leaf in leaves {
        let key = format!("{leaf}.key");
        let csr = format!("{leaf}.csr");
        let crt = format!("{leaf}.crt");
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &key,
            "-out",
            &csr,
        ]);
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_crt,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "san.ext",
            "-out",
            &crt,
        ]);
    }
}

/// mosquitto with a plain listener (for the test's collector) and a TLS one
/// that wants a client certificate, as AWS IoT Core does.
fn tls_broker(dir: &Path) -> (Mosquitto, u16) {
    let certs = dir.join("certs");
    std::fs::create_dir_all(&certs).expect("certs dir");
    make_certificates(&certs, "ca", &["server", "device"]);
    make_certificates(&certs, "other-ca", &[]);
    let tls_port = free_port();
    let broker = Mosquitto::start_with(
        &dir.join("broker"),
        free_port(),
        &format!(
            "allow_anonymous true\n\
             listener {tls_port} 127.0.0.1\n\
             cafile {c}/ca.crt\ncertfile {c}/server.crt\nkeyfile {c}/server.key\n\
             require_certificate true",
            c = certs.display()
        ),
    );
    runnel_tests::mqtt::wait_for_port(tls_port);
    (broker, tls_port)
}

fn tls_pipeline(dir: &Path, tls_port: u16, ca: &str) {
    std::fs::write(dir.join("in.txt"), "{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n").expect("input");
    let text = format!(
        r#"
[mqtt.upstream]
broker = "mqtts://localhost:{tls_port}"
ca_file = "certs/{ca}.crt"
cert_file = "certs/device.crt"
key_file = "certs/device.key"

[source]
type = "file"
path = "in.txt"

[[stage]]
name = "faults"
wasm = {:?}

[sink]
type = "mqtt"
topic = "up/gw"
"#,
        stage("faults").display().to_string()
    );
    std::fs::write(dir.join("p.toml"), text).expect("write pipeline");
}

#[test]
fn outputs_reach_a_tls_broker_with_a_client_certificate() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (broker, tls_port) = tls_broker(dir.path());
    let collector = Collector::start(broker.port, &["up/#"]);
    tls_pipeline(dir.path(), tls_port, "ca");
    let run = Background::start(Path::new(BIN), dir.path(), &["run", "p.toml"], &[]).finish();
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let got = collector.wait_until(DELIVERY, |got| distinct(got).len() == 3);
    assert_eq!(distinct(&got), (1..=3).collect(), "{}", run.stderr);
    assert!(run.stderr.contains("mqtts://localhost:"), "{}", run.stderr);
}

#[test]
fn a_broker_certificate_from_another_ca_stops_the_run_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_broker, tls_port) = tls_broker(dir.path());
    tls_pipeline(dir.path(), tls_port, "other-ca");
    let run = Background::start(Path::new(BIN), dir.path(), &["run", "p.toml"], &[]).finish();
    assert_eq!(run.status, Some(1), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("connection `upstream` (mqtts://localhost:")
            && run.stderr.to_lowercase().contains("certificate"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_broker_that_wants_a_client_certificate_stops_a_run_without_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_broker, tls_port) = tls_broker(dir.path());
    tls_pipeline(dir.path(), tls_port, "ca");
    let path = dir.path().join("p.toml");
    let text = std::fs::read_to_string(&path).expect("pipeline");
    let without: String = text
        .lines()
        .filter(|line| !line.starts_with("cert_file") && !line.starts_with("key_file"))
        .map(|line| format!("{line}\n"))
        .collect();
    std::fs::write(&path, without).expect("write pipeline");
    let run = Background::start(Path::new(BIN), dir.path(), &["run", "p.toml"], &[]).finish();
    assert_eq!(run.status, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("CertificateRequired") && run.stderr.contains("cert_file"),
        "{}",
        run.stderr
    );
}
