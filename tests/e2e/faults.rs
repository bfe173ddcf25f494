//! Stages that panic, loop, hog memory or misbehave: the host survives,
//! dead-letters only the record at fault with the reason, and goes on.

use std::path::Path;

use runnel_tests::{read_json_lines, run_binary, stage, summary_numbers, Run};

const BIN: &str = env!("CARGO_BIN_EXE_runnel");

/// Runs the `faults` stage over `lines` (one payload each) in batches of 4.
fn run_faults(dir: &Path, lines: &[&str], extra_stage_settings: &str) -> Run {
    run_faults_within(dir, lines, extra_stage_settings, 100, "")
}

/// [`run_faults`] with the stage's deadline and more `[pipeline]` settings.
fn run_faults_within(
    dir: &Path,
    lines: &[&str],
    extra_stage_settings: &str,
    timeout_ms: u64,
    extra_pipeline_settings: &str,
) -> Run {
    let pipeline = format!(
        r#"
[pipeline]
batch_size = 4
{extra_pipeline_settings}
[source]
type = "file"
path = "in.txt"
[[stage]]
name = "faults"
wasm = {:?}
timeout_ms = {timeout_ms}
memory_mb = 16
{extra_stage_settings}
[sink]
type = "file"
path = "out.txt"
format = "payload"
[dead_letter]
type = "file"
path = "dead.jsonl"
"#,
        stage("faults").display().to_string()
    );
    std::fs::write(dir.join("p.toml"), pipeline).expect("write pipeline");
    std::fs::write(dir.join("in.txt"), lines.join("\n")).expect("write input");
    run_binary(Path::new(BIN), dir, &["run", "p.toml"], b"")
}

fn outputs(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("out.txt"))
        .unwrap_or_default()
        .lines()
        .map(str::to_string)
        .collect()
}

/// The dead letters of records, without the entries that say an instance
/// was replaced (see `replacing_an_instance_says_its_state_is_lost`).
fn dead_reasons(dir: &Path) -> Vec<(String, String)> {
    read_json_lines(&dir.join("dead.jsonl"))
        .iter()
        .filter(|d| !is_state_lost(d))
        .map(|d| {
            (
                d["record"]["text"].as_str().unwrap_or("").to_string(),
                d["reason"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn is_state_lost(entry: &serde_json::Value) -> bool {
    entry["reason"]
        .as_str()
        .is_some_and(|r| r.starts_with("instance replaced after: "))
}

fn assert_counts_add_up(run: &Run, inputs: u64) {
    let n = summary_numbers(run.summary());
    assert_eq!(n[0], inputs, "{}", run.summary());
    assert_eq!(n[0], n[1] + n[2] + n[3], "{}", run.summary());
}

/// A stage that fans out hands the next one calls of at most `batch_size`
/// records, which is what that stage's deadline was set for.
#[test]
fn a_fan_out_reaches_the_next_stage_in_calls_of_batch_size() {
    let dir = tempfile::tempdir().expect("temp dir");
    let next = format!(
        "[[stage]]\nname = \"after\"\nwasm = {:?}\n",
        stage("faults").display().to_string()
    );
    let run = run_faults(dir.path(), &["fan 10"], &next);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(outputs(dir.path()).len(), 10, "{}", run.stderr);
    assert!(
        run.stderr.contains("stage=\"after\" calls=3 records_in=10"),
        "{}",
        run.stderr
    );
    assert_counts_add_up(&run, 1);
}

#[test]
fn a_panicking_stage_loses_only_the_record_it_panicked_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = run_faults(dir.path(), &["a", "b", "panic", "c", "d", "e"], "");
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(outputs(dir.path()), ["a", "b", "c", "d", "e"]);
    let dead = dead_reasons(dir.path());
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, "panic");
    assert!(
        dead[0]
            .1
            .starts_with("stage panicked at faults/src/lib.rs:")
            && dead[0].1.ends_with(": asked to panic"),
        "{}",
        dead[0].1
    );
    assert_counts_add_up(&run, 6);
}

#[test]
fn a_miscounted_answer_lets_no_output_through_twice() {
    let dir = tempfile::tempdir().expect("temp dir");
    // The first batch's answer is one outcome short: nothing of it may go on
    // before the records are retried one by one.
    let run = run_faults(dir.path(), &["a", "b", "miscount", "c", "d"], "");
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(outputs(dir.path()), ["a", "b", "c", "d"]);
    let dead = dead_reasons(dir.path());
    assert_eq!(
        dead,
        [(
            "miscount".to_string(),
            "stage broke the contract: returned 0 outcomes for 1 records".to_string()
        )]
    );
    assert_counts_add_up(&run, 5);
}

#[test]
fn replacing_an_instance_says_its_state_is_lost() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = run_faults(dir.path(), &["panic", "a"], "");
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let entries = read_json_lines(&dir.path().join("dead.jsonl"));
    let lost: Vec<_> = entries.iter().filter(|d| is_state_lost(d)).collect();
    // One for the batch, though the instance was replaced twice: for the
    // batch of two and for the panicking record retried alone.
    assert_eq!(lost.len(), 1, "{entries:?}");
    let reason = lost[0]["reason"].as_str().unwrap_or("");
    assert!(
        reason.ends_with(
            "(2 times, as its records were retried one by one); \
             any state it held (open windows, running statistics) is lost"
        ),
        "{reason}"
    );
    let n = summary_numbers(run.summary());
    assert_eq!(n[6], entries.len() as u64, "every entry is counted");

    // Records that fail in different ways are not all laid to the first.
    let dir = tempfile::tempdir().expect("temp dir");
    let run = run_faults(dir.path(), &["panic", "hog", "panic", "a"], "");
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let entries = read_json_lines(&dir.path().join("dead.jsonl"));
    let lost: Vec<_> = entries.iter().filter(|d| is_state_lost(d)).collect();
    let reason = lost
        .first()
        .and_then(|d| d["reason"].as_str())
        .unwrap_or("");
    assert!(
        reason.contains("; its records met 2 panics, 1 memory cap (4 times, as its records"),
        "{reason}"
    );
}

#[test]
fn an_endless_loop_is_interrupted_at_its_deadline() {
    let dir = tempfile::tempdir().expect("temp dir");
    let started = std::time::Instant::now();
    let run = run_faults(dir.path(), &["a", "loop", "b"], "");
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(outputs(dir.path()), ["a", "b"]);
    assert_eq!(
        dead_reasons(dir.path()),
        [(
            "loop".to_string(),
            "timed out: still running after its 100 ms deadline".to_string()
        )]
    );
    // A hang guard, not a speed goal: two 100 ms deadlines cannot take a minute.
    assert!(started.elapsed().as_secs() < 60);
    assert_counts_add_up(&run, 3);
}

#[test]
fn a_stage_that_sleeps_is_stopped_at_its_deadline() {
    let dir = tempfile::tempdir().expect("temp dir");
    let started = std::time::Instant::now();
    let run = run_faults(dir.path(), &["a", "sleep", "b"], "");
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(outputs(dir.path()), ["a", "b"]);
    assert_eq!(
        dead_reasons(dir.path()),
        [(
            "sleep".to_string(),
            "timed out: still running after its 100 ms deadline".to_string()
        )]
    );
    // The stage asks for a minute twice (its batch, then alone); deadlines
    // that covered only running code would let the run take two.
    assert!(
        started.elapsed().as_secs() < 30,
        "took {:?}",
        started.elapsed()
    );
    assert_counts_add_up(&run, 3);
}

#[test]
fn unbounded_allocation_stops_at_the_memory_cap() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = run_faults(dir.path(), &["hog", "a"], "");
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(outputs(dir.path()), ["a"]);
    let dead = dead_reasons(dir.path());
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0]
            .1
            .starts_with("memory limit reached: the stage asked for")
            && dead[0].1.ends_with("its cap is 16 MiB"),
        "{}",
        dead[0].1
    );
}

#[test]
fn a_stage_that_fails_on_everything_does_not_wait_out_every_deadline() {
    let dir = tempfile::tempdir().expect("temp dir");
    let lines = vec!["loop"; 12];
    let run = run_faults(dir.path(), &lines, "");
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let dead = dead_reasons(dir.path());
    assert_eq!(dead.len(), 12, "every record accounted for");
    // In each batch three are run one by one and time out; the rest are not
    // run, and their reason says so rather than claiming they timed out.
    let not_run = "not run: the stage failed on the 3 records before it in a row, last with: \
                   timed out";
    assert!(
        dead.iter()
            .all(|(_, r)| r.starts_with("timed out") || r.starts_with(not_run)),
        "{dead:?}"
    );
    assert!(dead.iter().any(|(_, r)| r.starts_with(not_run)), "{dead:?}");
    assert_counts_add_up(&run, 12);
}

#[test]
fn stages_cannot_touch_the_file_system_and_their_output_is_logged() {
    let dir = tempfile::tempdir().expect("temp dir");
    let escape = Path::new("/tmp/runnel-escape");
    let _ = std::fs::remove_file(escape);
    let run = run_faults(dir.path(), &["write-file", "print", "reject"], "");
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert!(!escape.exists(), "a stage wrote to the host's file system");
    let dead = dead_reasons(dir.path());
    assert_eq!(dead.len(), 2);
    assert!(
        dead[0].1.starts_with("cannot write a file:"),
        "{}",
        dead[0].1
    );
    assert_eq!(
        dead[1],
        ("reject".to_string(), "asked to reject".to_string())
    );
    assert!(run.stderr.contains("hello from stdout"), "{}", run.stderr);
    assert!(run.stderr.contains("hello from stderr"), "{}", run.stderr);
    assert!(
        run.stderr.contains("goodbye without a newline"),
        "{}",
        run.stderr
    );
    assert_eq!(outputs(dir.path()), ["print"]);
}

/// A stage that logs in a loop: a call's first 10,000 lines are logged, the
/// rest counted and said, and the record still goes through in its time.
#[test]
fn a_stage_that_logs_without_end_is_cut_short_in_the_log_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Time enough for the 10,000 lines an unoptimised build logs.
    let run = run_faults_within(dir.path(), &["chatter 30000"], "", 20_000, "");
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(outputs(dir.path()), ["chatter 30000"]);
    let shown = run
        .stderr
        .lines()
        .filter(|l| l.contains("chatter "))
        .count();
    assert_eq!(shown, 10_000);
    // 20,000 short lines and the long one.
    let end = &run.stderr[run.stderr.len().saturating_sub(3000)..];
    assert!(
        run.stderr
            .contains("20001 log lines of one call were dropped"),
        "{end}"
    );

    let dir = tempfile::tempdir().expect("temp dir");
    let run = run_faults_within(dir.path(), &["chatter 3"], "", 20_000, "");
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let long = run
        .stderr
        .lines()
        .find(|l| l.contains("yyyy"))
        .expect("the long line, cut");
    assert!(long.contains("… (83616 bytes more)"), "{}", long.len());
    assert!(long.len() < 17_000, "{}", long.len());
    assert!(!run.stderr.contains("were dropped"), "{}", run.stderr);
}

/// A stage that fans out past what the host holds for one batch: the input
/// that would pass the limit is dead-lettered, the others go through, and
/// the instance (with its state) stays.
#[test]
fn a_fan_out_past_the_batch_limit_is_dead_lettered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let lines = ["fan 600", "fan 600", "pass"];
    let run = run_faults_within(dir.path(), &lines, "", 5_000, "max_batch_outputs = 1000");
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(outputs(dir.path()).len(), 601);
    // One entry, and none saying the stage's state was lost.
    assert_eq!(read_json_lines(&dir.path().join("dead.jsonl")).len(), 1);
    let dead = dead_reasons(dir.path());
    assert_eq!(dead[0].0, "fan 600");
    assert!(
        dead[0]
            .1
            .contains("would pass 1000 records (max_batch_outputs)"),
        "{}",
        dead[0].1
    );
    assert!(!run.stderr.contains("instance replaced"), "{}", run.stderr);
    assert_counts_add_up(&run, 3);
    assert!(run
        .summary()
        .contains("3 in: 2 produced output, 0 filtered, 1 dead-lettered"));
}

/// The same limit on a stage with state: the inputs over it are
/// dead-lettered once, and none runs twice on the stage's windows (which
/// would make it late).
#[test]
fn the_batch_limit_runs_no_record_twice_on_a_stateful_stage() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pipeline = format!(
        r#"
[pipeline]
max_batch_outputs = 12
[source]
type = "file"
path = "in.jsonl"
format = "record"
[[stage]]
name = "window"
wasm = {:?}
[stage.config]
size_ms = 1000
pass_through = true
[sink]
type = "file"
path = "out.jsonl"
[dead_letter]
type = "file"
path = "dead.jsonl"
"#,
        stage("window").display().to_string()
    );
    std::fs::write(dir.path().join("p.toml"), pipeline).expect("pipeline");
    // Each reading after the first closes the window before it: its
    // aggregate and itself, 2 outputs; 1 + 9 x 2 = 19 in all, over 12.
    let lines: String = (0..10)
        .map(|k| {
            format!(
                "{{\"payload\":{{\"device\":\"d1\",\"ts\":{},\"metrics\":{{\"t\":{k}}}}},\
                 \"key\":\"d1\",\"headers\":{{\"kind\":\"reading\"}}}}\n",
                k * 1000
            )
        })
        .collect();
    std::fs::write(dir.path().join("in.jsonl"), lines).expect("input");
    let run = run_binary(Path::new(BIN), dir.path(), &["run", "p.toml"], b"");
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let dead = read_json_lines(&dir.path().join("dead.jsonl"));
    let reasons: Vec<&str> = dead
        .iter()
        .map(|d| d["reason"].as_str().unwrap_or(""))
        .collect();
    assert!(reasons.iter().all(|r| !r.contains("late")), "{reasons:?}");
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(reasons.iter().all(|r| r.contains("max_batch_outputs")));
    // Readings 0 to 5 and the aggregates of windows 0 to 4 went out, then
    // the end of the input closed the last window (9).
    let out = read_json_lines(&dir.path().join("out.jsonl"));
    assert_eq!(out.len(), 12, "{out:?}");
    assert!(
        run.summary()
            .starts_with("runnel: 10 in: 6 produced output, 0 filtered, 4 dead-lettered"),
        "{}",
        run.summary()
    );
}

#[test]
fn stages_cannot_open_sockets_or_see_the_environment() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = run_faults(dir.path(), &["connect", "read-env"], "");
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    let dead = dead_reasons(dir.path());
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].1.starts_with("cannot connect:"), "{}", dead[0].1);
    assert_eq!(
        outputs(dir.path()),
        ["env: []"],
        "no host variable reaches a stage"
    );
}

#[test]
fn malformed_input_lines_go_to_the_dead_letter_with_their_line_number() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pipeline = format!(
        r#"
[source]
type = "file"
path = "in.jsonl"
format = "record"
[[stage]]
name = "pass"
wasm = {:?}
[sink]
type = "file"
path = "out.jsonl"
[dead_letter]
type = "file"
path = "dead.jsonl"
"#,
        stage("passthrough").display().to_string()
    );
    std::fs::write(dir.path().join("p.toml"), pipeline).expect("write");
    let input = "{\"text\":\"one\"}\n{\"paylod\":1}\nnot json\n{\"text\":\"two\"}\n";
    std::fs::write(dir.path().join("in.jsonl"), input).expect("write");
    let run = run_binary(Path::new(BIN), dir.path(), &["run", "p.toml"], b"");
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(read_json_lines(&dir.path().join("out.jsonl")).len(), 2);
    let dead = read_json_lines(&dir.path().join("dead.jsonl"));
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0]["stage"], "source");
    assert!(
        dead[0]["reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("in.jsonl line 2: not a record object: unknown field `paylod`"),
        "{}",
        dead[0]["reason"]
    );
    assert_eq!(
        dead[1]["record"]["text"], "not json",
        "the raw line is kept"
    );
    assert_counts_add_up(&run, 4);
}

/// A caller's deadline (a Lambda invocation's end) cuts a stage's own,
/// longer one: the call stops in time, and what was not run is
/// dead-lettered as such, to be given again; a later batch with time to
/// spare runs on a fresh instance.
#[test]
fn a_callers_deadline_stops_the_stages_in_time() {
    use runnel::chain::{Chain, InputOutcome};
    use runnel::wasm::{Engine, EngineOptions, LoadedStage, StageLimits};
    use std::time::{Duration, Instant};

    let engine = Engine::new(&EngineOptions::default()).expect("engine");
    let limits = StageLimits {
        timeout: Duration::from_secs(60),
        memory_bytes: 64 << 20,
    };
    let stage = LoadedStage::load(&engine, "faults", &stage("faults"), "{}".into(), limits)
        .expect("load the faults stage");
    let mut chain = Chain::start(vec![stage]).expect("start");
    let batch = ["fine", "loop", "fine too"]
        .map(runnel::Record::new)
        .to_vec();

    let started = Instant::now();
    chain.set_deadline(Some(started + Duration::from_millis(300)));
    let output = chain.process(batch);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the 60 s stage deadline was not cut: {:?}",
        started.elapsed()
    );
    assert_eq!(output.outcomes, [InputOutcome::DeadLettered; 3]);
    let reasons: Vec<&str> = output
        .dead_letters
        .iter()
        .filter(|d| d.input.is_some())
        .map(|d| d.reason.as_str())
        .collect();
    assert_eq!(
        reasons,
        ["not run: the invocation's time was nearly up (its stages must end before it does)"; 3],
        "{:?}",
        output.dead_letters
    );

    chain.set_deadline(Some(Instant::now() + Duration::from_secs(30)));
    let output = chain.process(vec![runnel::Record::new("panic-at-flush")]);
    assert_eq!(output.outcomes, [InputOutcome::Emitted]);

    // With no time left a timer flush is not run at all: what the stage
    // holds waits for the next one, rather than be lost to a stopped call.
    chain.set_deadline(Some(Instant::now()));
    let flushed = chain.flush(0, false);
    assert!(
        flushed.dead_letters.is_empty() && flushed.outputs.is_empty(),
        "{:?}",
        flushed.dead_letters
    );
    chain.set_deadline(None);
    let flushed = chain.flush(0, true);
    assert!(
        flushed.dead_letters[0]
            .reason
            .starts_with("flush failed: stage panicked"),
        "the flush ran once there was time: {:?}",
        flushed.dead_letters
    );
}

/// A stage that panics in its timer hook loses its state like one that
/// panics on a record, and its entry says so.
#[test]
fn a_panic_in_flush_says_the_state_is_lost() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = run_faults(dir.path(), &["panic-at-flush", "a"], "");
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert_eq!(outputs(dir.path()), ["panic-at-flush", "a"]);
    let entries = read_json_lines(&dir.path().join("dead.jsonl"));
    let reason = entries
        .iter()
        .filter_map(|d| d["reason"].as_str())
        .find(|r| r.starts_with("flush failed: "))
        .unwrap_or_default();
    assert!(
        reason.contains("stage panicked")
            && reason.contains("asked to panic at the next flush")
            && reason.ends_with(
                "instance replaced: any state it held (open windows, running statistics) is lost"
            ),
        "{entries:?}"
    );
}
