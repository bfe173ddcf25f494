//! Bad pipeline files and bad stages: `runnel check` (and `run`) exit 2 with
//! a message naming the file, line and field. Each case is a `.toml` in
//! tests/ui/ next to the `.err` text it must print; RUNNEL_BLESS=1 rewrites them.

use std::path::Path;

use runnel_tests::{repo_dir, run_binary_with};

/// Logs off: stderr is then exactly the error message.
const QUIET: &[(&str, &str)] = &[("RUST_LOG", "off")];

/// runnel with these arguments in `dir`, no input and no log.
fn quietly(dir: &Path, args: &[&str]) -> runnel_tests::Run {
    run_binary_with(Path::new(BIN), dir, args, b"", QUIET)
}

const BIN: &str = env!("CARGO_BIN_EXE_runnel");

#[test]
fn every_bad_pipeline_gets_its_expected_message() {
    let ui = repo_dir().join("tests/ui");
    let mut cases: Vec<_> = std::fs::read_dir(&ui)
        .expect("tests/ui")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    cases.sort();
    assert!(cases.len() >= 10, "cases: {cases:?}");
    let bless = std::env::var_os("RUNNEL_BLESS").is_some();
    let mut failures = Vec::new();
    for case in &cases {
        let name = case
            .file_name()
            .and_then(|n| n.to_str())
            .expect("utf-8 name");
        let run = run_binary_with(Path::new(BIN), &ui, &["check", name], b"", QUIET);
        let stderr = run.stderr.trim_end();
        let expected_path = case.with_extension("err");
        if bless {
            std::fs::write(&expected_path, format!("{stderr}\n")).expect("bless");
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if run.status != Some(2) || stderr.trim_end() != expected.trim_end() {
            failures.push(format!(
                "{name}: exit {:?}\n--- expected\n{}\n--- got\n{}",
                run.status,
                expected.trim_end(),
                run.stderr.trim_end()
            ));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n\n"));
}

#[test]
fn run_refuses_a_bad_pipeline_the_same_way() {
    let ui = repo_dir().join("tests/ui");
    let run = run_binary_with(
        Path::new(BIN),
        &ui,
        &["run", "unknown-stage-field.toml"],
        b"",
        QUIET,
    );
    assert_eq!(run.status, Some(2));
    let expected = std::fs::read_to_string(ui.join("unknown-stage-field.err")).expect("err file");
    assert_eq!(run.stderr.trim_end(), expected.trim_end());
}

#[test]
fn a_missing_pipeline_file_is_named() {
    let dir = tempfile::tempdir().expect("temp dir");
    let run = quietly(dir.path(), &["check", "nope.toml"]);
    assert_eq!(run.status, Some(2));
    assert!(
        run.stderr
            .starts_with("runnel: cannot read pipeline nope.toml: No such file or directory"),
        "{}",
        run.stderr
    );
}

/// `runnel check p.toml 2>&1 | head -1` and the like: a reader that quit
/// early must not turn the answer into a crash.
#[test]
fn a_closed_stderr_leaves_the_exit_code_alone() {
    let mut child = std::process::Command::new(BIN)
        .args(["check", "malformed.toml"])
        .current_dir(repo_dir().join("tests/ui"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start runnel");
    drop(child.stderr.take());
    let status = child.wait().expect("wait for runnel");
    assert_eq!(status.code(), Some(2), "exit 101 is a panic");
}

/// A dead letter `run` could not write fails `check` too, so an install
/// finds out before a service restarts over it; `check` leaves no trace.
#[test]
fn check_fails_on_an_output_file_it_cannot_write() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("in.jsonl"), "").expect("input");
    std::fs::write(dir.path().join("blocker"), "a file, not a folder").expect("blocker");
    let pipeline = |dead: &str| {
        format!(
            "[source]\ntype = \"file\"\npath = \"in.jsonl\"\n[sink]\ntype = \"stdout\"\n\
             [dead_letter]\ntype = \"file\"\npath = \"{dead}\"\n"
        )
    };
    std::fs::write(dir.path().join("bad.toml"), pipeline("blocker/dead.jsonl")).expect("write");
    let run = quietly(dir.path(), &["check", "bad.toml"]);
    assert_eq!(run.status, Some(1), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("bad.toml: dead_letter.path: blocker is a file, and blocker/dead.jsonl would need it to be a folder"),
        "{}",
        run.stderr
    );
    std::fs::write(dir.path().join("good.toml"), pipeline("dl/dead.jsonl")).expect("write");
    let run = quietly(dir.path(), &["check", "good.toml"]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert!(!dir.path().join("dl").exists(), "check left its probe");
}

/// A spool folder `run` could not make fails `check`; a credential variable
/// the shell lacks is a warning for `check` and stops `run` with exit 2, so
/// a service is not restarted over it.
#[test]
fn check_fails_on_a_spool_it_cannot_make_and_run_on_a_missing_credential() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("blocker"), "a file, not a folder").expect("blocker");
    let pipeline = |spool: &str| {
        format!(
            "[mqtt.up]\nbroker = \"mqtt://127.0.0.1:1\"\nusername_env = \"RUNNEL_TEST_NO_SUCH_USER\"\n\
             [mqtt.up.spool]\npath = \"{spool}\"\nwhen_full = \"refuse-new\"\n\
             [source]\ntype = \"stdin\"\n[sink]\ntype = \"mqtt\"\ntopic = \"out/{{key}}\"\n"
        )
    };
    std::fs::write(dir.path().join("bad.toml"), pipeline("blocker")).expect("write");
    let run = quietly(dir.path(), &["check", "bad.toml"]);
    assert_eq!(run.status, Some(1), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("bad.toml: mqtt.up.spool.path: blocker is a file, and blocker/spool.jsonl would need it to be a folder"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains(
            "RUNNEL_TEST_NO_SUCH_USER, which is not set or is not UTF-8, in this environment"
        ),
        "{}",
        run.stderr
    );
    std::fs::write(dir.path().join("good.toml"), pipeline("spool")).expect("write");
    let run = quietly(dir.path(), &["check", "good.toml"]);
    assert_eq!(run.status, Some(0), "{}", run.stderr);
    assert!(!dir.path().join("spool").exists(), "check left its probe");
    let run = quietly(dir.path(), &["run", "good.toml"]);
    assert_eq!(run.status, Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains(
            "mqtt.up: username_env names the environment variable RUNNEL_TEST_NO_SUCH_USER"
        ),
        "{}",
        run.stderr
    );
}
