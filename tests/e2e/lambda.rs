//! runnel as a Lambda function, driven through a real Lambda Runtime API:
//! cargo-lambda's emulator (installed by scripts/setup-lambda), invoked the
//! way AWS invokes it, with AWS's event shapes (tests/lambda-events).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use runnel_tests::mqtt::{free_port, wait_for_port, Background};
use runnel_tests::{read_json_lines, repo_dir, stage};

const BIN: &str = env!("CARGO_BIN_EXE_runnel");

/// cargo-lambda's Runtime API emulator on a free port, stopped when dropped.
struct Emulator {
    port: u16,
    tools: PathBuf,
    child: Child,
}

impl Emulator {
    fn start() -> Self {
        let tools = runnel_tests::lambda_tools();
        let port = free_port();
        // It reads `cargo metadata` where it starts, and wants a binary there.
        let child = Command::new("cargo")
            .args(["lambda", "watch", "--only-lambda-apis", "-A", "127.0.0.1"])
            .args(["-P", &port.to_string()])
            .current_dir(repo_dir().join("runtime"))
            .env("PATH", runnel_tests::path_with(&tools))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start cargo lambda watch");
        wait_for_port(port);
        Emulator { port, tools, child }
    }

    /// runnel serving this emulator's invocations.
    fn function(&self, dir: &Path, args: &[&str]) -> Background {
        let api = format!("http://127.0.0.1:{}/.rt", self.port);
        Background::start(
            Path::new(BIN),
            dir,
            args,
            &[
                ("AWS_LAMBDA_RUNTIME_API", api.as_str()),
                ("AWS_LAMBDA_FUNCTION_NAME", "_"),
                ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256"),
                ("AWS_LAMBDA_FUNCTION_VERSION", "1"),
            ],
        )
    }

    fn invoke_command(&self, event: &Path) -> Command {
        let mut command = Command::new("cargo");
        command
            .args(["lambda", "invoke", "--invoke-address", "127.0.0.1"])
            .args(["--invoke-port", &self.port.to_string()])
            .arg("--data-file")
            .arg(event)
            .arg("_")
            .current_dir(repo_dir().join("runtime"))
            .env("PATH", runnel_tests::path_with(&self.tools));
        command
    }

    /// Invokes the function with `event`; `Ok` is the answer, `Err` the
    /// function's error.
    fn invoke(&self, event: &Path) -> Result<serde_json::Value, String> {
        let out = self
            .invoke_command(event)
            .output()
            .expect("cargo lambda invoke");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if out.status.success() {
            Ok(serde_json::from_str(stdout.trim())
                .unwrap_or_else(|e| panic!("answer is not JSON ({e}): {stdout}")))
        } else {
            Err(format!("{stdout}{stderr}"))
        }
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn event(name: &str) -> PathBuf {
    repo_dir().join("tests/lambda-events").join(name)
}

/// parse → validate → convert, as the demo configures them; outputs only in
/// the answer, dead letters to a file.
fn pipeline(dir: &Path) {
    let text = format!(
        r#"
[pipeline]
name = "lambda-test"

[source]
type = "lambda"

[[stage]]
name = "parse"
wasm = {parse:?}
memory_mb = 16
[stage.config]
units = {{ temperature = "C", humidity = "%" }}
device_units = {{ dev-2 = {{ temperature = "F" }} }}

[[stage]]
name = "validate"
wasm = {validate:?}
[stage.config]
required = ["temperature"]
ranges = {{ temperature = {{ min = -40, max = 125 }} }}

[[stage]]
name = "convert"
wasm = {convert:?}
[stage.config]
convert = {{ temperature = "C" }}

[sink]
type = "none"

[dead_letter]
type = "file"
path = "dead.jsonl"
"#,
        parse = stage("parse").display().to_string(),
        validate = stage("validate").display().to_string(),
        convert = stage("convert").display().to_string(),
    );
    std::fs::write(dir.join("p.toml"), text).expect("write pipeline");
}

/// One function serving every event shape in turn, as one warm instance would.
#[test]
fn every_event_shape_gets_the_answer_lambda_expects() {
    let dir = tempfile::tempdir().expect("temp dir");
    pipeline(dir.path());
    let emulator = Emulator::start();
    let mut function = emulator.function(dir.path(), &["lambda", "p.toml"]);
    function.wait_for_log("ready for invocations", Duration::from_secs(90));

    // SQS: only the message that failed validation is reported.
    let answer = emulator.invoke(&event("sqs.json")).expect("sqs");
    assert_eq!(
        answer,
        serde_json::json!({"batchItemFailures": [{"itemIdentifier": "2e1424d4-f796-459a-8184-9c92662be6da"}]})
    );
    let dead = read_json_lines(&dir.path().join("dead.jsonl"));
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0]["stage"], "validate");
    assert_eq!(dead[0]["record"]["topic"], "sensor-readings");
    // The dead letter names the message as batchItemFailures does.
    assert_eq!(
        dead[0]["record"]["headers"]["lambda.item-id"], "2e1424d4-f796-459a-8184-9c92662be6da",
        "{}",
        dead[0]
    );

    // Kinesis: the same, by sequence number.
    let answer = emulator.invoke(&event("kinesis.json")).expect("kinesis");
    assert_eq!(
        answer,
        serde_json::json!({"batchItemFailures": [{"itemIdentifier": "49590338271490256608559692540925702759324208523137515618"}]})
    );

    // Kafka: a clean batch succeeds; one bad record fails the batch, named.
    let answer = emulator.invoke(&event("kafka.json")).expect("kafka");
    assert_eq!(answer, serde_json::json!({"processed": 2}));
    let error = emulator
        .invoke(&event("kafka-bad.json"))
        .expect_err("a Kafka batch with a bad record fails");
    assert!(
        error.contains("1 of 2 records failed (sensors-0@16)") && error.contains("validate"),
        "{error}"
    );
    assert!(error.contains("Runnel.BatchFailed"), "{error}");

    // API Gateway: the converted reading is the body; a bad one is a 422.
    let answer = emulator.invoke(&event("apigw-rest.json")).expect("apigw");
    assert_eq!(answer["statusCode"], 200, "{answer}");
    let body: serde_json::Value =
        serde_json::from_str(answer["body"].as_str().unwrap_or("")).expect("JSON body");
    assert_eq!(body["device"], "dev-1");
    assert_eq!(body["metrics"]["temperature"], 21.5);
    let answer = emulator
        .invoke(&event("apigw-rest-bad.json"))
        .expect("apigw bad");
    assert_eq!(answer["statusCode"], 422, "{answer}");
    assert!(answer["body"]
        .as_str()
        .unwrap_or("")
        .contains("above maximum 125"));

    // A function URL with a base64 CSV body, in Fahrenheit.
    let answer = emulator.invoke(&event("function-url.json")).expect("url");
    assert_eq!(answer["statusCode"], 200, "{answer}");
    let body: serde_json::Value =
        serde_json::from_str(answer["body"].as_str().unwrap_or("")).expect("JSON body");
    assert_eq!(body["device"], "dev-2");
    assert_eq!(body["metrics"]["temperature"], 22.0);

    // A body marked base64 that is not: the caller gets a 400 with the reason.
    let mut request: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(event("function-url.json")).expect("function-url.json"),
    )
    .expect("JSON event");
    request["body"] = "%%%".into();
    let bad_body = dir.path().join("bad-body.json");
    std::fs::write(&bad_body, request.to_string()).expect("write event");
    let answer = emulator
        .invoke(&bad_body)
        .expect("a 400, not a function error");
    assert_eq!(answer["statusCode"], 400, "{answer}");
    assert!(answer["body"]
        .as_str()
        .unwrap_or("")
        .contains("marked base64 but is not"));

    // An IoT rule's message: the outputs come back.
    let answer = emulator.invoke(&event("iot-rule.json")).expect("iot");
    assert_eq!(answer["outputs"][0]["device"], "dev-1", "{answer}");
    assert_eq!(answer["dead_letters"], serde_json::json!([]));

    // A device's array of readings is a raw event, however many there are:
    // not taken for a request or a batch by its elements' order.
    let readings = dir.path().join("readings.json");
    let reading = serde_json::json!({"device": "dev-1", "ts": 1, "temperature": 20.5});
    std::fs::write(
        &readings,
        serde_json::Value::Array(vec![reading; 6]).to_string(),
    )
    .expect("write");
    let answer = emulator.invoke(&readings).expect("an array");
    assert!(answer.get("statusCode").is_none(), "{answer}");
    assert_eq!(answer["dead_letters"][0]["stage"], "parse", "{answer}");

    // A malformed SQS event is the invocation's error, and the next works.
    let error = emulator
        .invoke(&event("sqs-malformed.json"))
        .expect_err("malformed");
    assert!(
        error.contains("the event is not a valid SQS event"),
        "{error}"
    );
    assert!(error.contains("Runnel.InvalidEvent"), "{error}");

    // An oversized reading stops at the parse stage's memory cap: a dead
    // letter in the answer, and the function goes on.
    let big = dir.path().join("big.json");
    let blob = "x".repeat(5 << 20);
    std::fs::write(
        &big,
        serde_json::json!({"device": "dev-9", "ts": 1, "temperature": 20.0, "note": blob})
            .to_string(),
    )
    .expect("big event");
    let answer = emulator.invoke(&big).expect("big");
    let reason = answer["dead_letters"][0]["reason"].as_str().unwrap_or("");
    assert!(reason.contains("memory limit reached"), "{answer}");
    let answer = emulator.invoke(&event("iot-rule.json")).expect("after big");
    assert_eq!(answer["outputs"][0]["device"], "dev-1", "{answer}");

    drop(emulator);
    function.kill();
}

#[test]
fn an_init_failure_is_reported_through_the_runtime_api() {
    // A missing stage, and a pipeline file with a typo in a field name: each
    // must reach the waiting invocation as an init error naming the cause.
    let cases: [(&str, &str, &str); 2] = [
        (
            "convert.wasm",
            "no-such-stage.wasm",
            "no-such-stage.wasm not found",
        ),
        (
            "[source]",
            "[source]\nbatchsize = 5",
            "unknown field `batchsize`",
        ),
    ];
    for (from, to, expected) in cases {
        let dir = tempfile::tempdir().expect("temp dir");
        pipeline(dir.path());
        let text = std::fs::read_to_string(dir.path().join("p.toml")).expect("pipeline");
        assert!(text.contains(from), "the test pipeline has no `{from}`");
        std::fs::write(dir.path().join("p.toml"), text.replacen(from, to, 1)).expect("pipeline");
        let emulator = Emulator::start();
        // The emulator hands an init error to the invocation waiting for it.
        let waiting = emulator
            .invoke_command(&event("iot-rule.json"))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("invoke");
        std::thread::sleep(Duration::from_millis(500));
        let run = emulator
            .function(dir.path(), &["lambda", "p.toml"])
            .finish();
        let out = waiting.wait_with_output().expect("invoke output");
        let answer = String::from_utf8_lossy(&out.stdout);
        assert_eq!(run.status, Some(2), "{}", run.stderr);
        assert!(
            answer.contains("Runtime.InitError") && answer.contains(expected),
            "answer: {answer}\nlog: {}",
            run.stderr
        );
    }
}

/// A sink that cannot take the outputs: a request still gets an HTTP
/// answer (a 500), where a batch fails its invocation so Lambda retries it.
#[test]
fn a_failed_sink_answers_a_request_with_a_500() {
    let dir = tempfile::tempdir().expect("temp dir");
    pipeline(dir.path());
    let text = std::fs::read_to_string(dir.path().join("p.toml")).expect("pipeline");
    let closed = format!(
        "[sink]\ntype = \"http\"\nurl = \"http://127.0.0.1:{}/in\"",
        free_port()
    );
    let text = text.replacen("[sink]\ntype = \"none\"", &closed, 1);
    assert!(text.contains("type = \"http\""), "{text}");
    std::fs::write(dir.path().join("p.toml"), text).expect("pipeline");
    let emulator = Emulator::start();
    let mut function = emulator.function(dir.path(), &["lambda", "p.toml"]);
    function.wait_for_log("ready for invocations", Duration::from_secs(90));

    let answer = emulator
        .invoke(&event("apigw-rest.json"))
        .expect("an answer");
    assert_eq!(answer["statusCode"], 500, "{answer}");
    assert!(
        !answer["body"].to_string().contains("127.0.0.1"),
        "{answer}"
    );
    let error = emulator
        .invoke(&event("sqs.json"))
        .expect_err("a batch whose outputs were not taken fails");
    assert!(error.contains("Runnel.PipelineFailed"), "{error}");

    let log = function.log();
    assert!(log.contains("request failed"), "{log}");
    drop(emulator);
    function.kill();
}

#[test]
fn run_refuses_a_lambda_pipeline() {
    let dir = tempfile::tempdir().expect("temp dir");
    pipeline(dir.path());
    let run = Background::start(Path::new(BIN), dir.path(), &["run", "p.toml"], &[]).finish();
    assert_eq!(run.status, Some(2), "{}", run.stderr);
    // Said before any stage is loaded.
    assert!(!run.stderr.contains("stage loaded"), "{}", run.stderr);
    assert!(
        run.stderr.contains("run it with `runnel lambda`"),
        "{}",
        run.stderr
    );
}

/// An SQS batch of these bodies: (message id, body, message group).
fn sqs_event(queue: &str, messages: &[(&str, &str, &str)]) -> serde_json::Value {
    let records: Vec<serde_json::Value> = messages
        .iter()
        .map(|(id, body, group)| {
            serde_json::json!({
                "messageId": id,
                "receiptHandle": "handle",
                "body": body,
                "attributes": {"MessageGroupId": group, "SentTimestamp": "1767225600000"},
                "messageAttributes": {},
                "md5OfBody": "",
                "eventSource": "aws:sqs",
                "eventSourceARN": format!("arn:aws:sqs:eu-west-1:123456789012:{queue}"),
                "awsRegion": "eu-west-1"
            })
        })
        .collect();
    serde_json::json!({ "Records": records })
}

/// The faults stage alone (it passes through what names no fault), outputs
/// and dead letters to files.
#[test]
fn fifo_groups_stay_in_order_and_an_answer_too_large_is_dead_lettered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = format!(
        "[source]\ntype = \"lambda\"\n\n[[stage]]\nname = \"faults\"\nwasm = {:?}\n\
         memory_mb = 64\n\n[sink]\ntype = \"file\"\npath = \"out.jsonl\"\n\
         format = \"payload\"\n\n[dead_letter]\ntype = \"file\"\npath = \"dead.jsonl\"\n",
        stage("faults").display().to_string()
    );
    std::fs::write(dir.path().join("p.toml"), text).expect("write pipeline");
    let emulator = Emulator::start();
    let mut function = emulator.function(dir.path(), &["lambda", "p.toml"]);
    function.wait_for_log("ready for invocations", Duration::from_secs(90));
    let write_event = |name: &str, event: &serde_json::Value| {
        let path = dir.path().join(name);
        std::fs::write(&path, event.to_string()).expect("write event");
        path
    };
    let messages = [
        ("a1", "first of a", "a"),
        ("a2", "reject", "a"),
        ("a3", "third of a", "a"),
        ("b1", "first of b", "b"),
    ];

    // A FIFO queue: group a stops at its failed message, whose later one is
    // reported with it and not processed; group b goes on.
    let fifo = write_event("fifo.json", &sqs_event("orders.fifo", &messages));
    let answer = emulator.invoke(&fifo).expect("fifo");
    assert_eq!(
        answer,
        serde_json::json!({"batchItemFailures": [{"itemIdentifier": "a2"}, {"itemIdentifier": "a3"}]})
    );
    let dead = read_json_lines(&dir.path().join("dead.jsonl"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0]["reason"], "asked to reject");
    let out = std::fs::read_to_string(dir.path().join("out.jsonl")).expect("outputs");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["first of a", "first of b"]
    );

    // A standard queue keeps no order: only the failed message is reported.
    let standard = write_event("standard.json", &sqs_event("orders", &messages));
    let answer = emulator.invoke(&standard).expect("standard");
    assert_eq!(
        answer,
        serde_json::json!({"batchItemFailures": [{"itemIdentifier": "a2"}]})
    );

    // An output over Lambda's 6 MB answer limit: the invocation fails with
    // the reason, and the event is in the dead letter rather than lost.
    let big = write_event(
        "big.json",
        &serde_json::json!({"note": "x".repeat(6_500_000)}),
    );
    let error = emulator.invoke(&big).expect_err("too large an answer");
    assert!(error.contains("Runnel.AnswerTooLarge"), "{error}");
    assert!(error.contains("over Lambda's limit"), "{error}");
    let dead = read_json_lines(&dir.path().join("dead.jsonl"));
    let last = dead.last().expect("a dead letter");
    assert_eq!(last["stage"], "answer", "{last}");

    // The function goes on.
    let answer = emulator.invoke(&event("iot-rule.json")).expect("after big");
    assert_eq!(answer["outputs"][0]["device"], "dev-1", "{answer}");
    drop(emulator);
    function.kill();
}

#[test]
fn lambda_without_the_runtime_api_says_what_is_missing() {
    let dir = tempfile::tempdir().expect("temp dir");
    pipeline(dir.path());
    let run = Background::start(Path::new(BIN), dir.path(), &["lambda", "p.toml"], &[]).finish();
    assert_ne!(run.status, Some(101), "panicked: {}", run.stderr);
    assert_ne!(run.status, Some(0), "{}", run.stderr);
    assert!(
        run.stderr.contains("AWS_LAMBDA_RUNTIME_API is not set"),
        "{}",
        run.stderr
    );
    // A pipeline for `run` is named as such first, with the exit code of a
    // pipeline that is not valid here.
    std::fs::write(
        dir.path().join("stdin.toml"),
        "[source]\ntype = \"stdin\"\n[sink]\ntype = \"stdout\"\n",
    )
    .expect("write pipeline");
    let run =
        Background::start(Path::new(BIN), dir.path(), &["lambda", "stdin.toml"], &[]).finish();
    assert_eq!(run.status, Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains("runnel lambda needs [source] type"),
        "{}",
        run.stderr
    );
}
