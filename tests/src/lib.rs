//! Shared by the end-to-end tests and the benchmarks: where the example
//! stages were built, and a way to run the real `runnel` binary.

pub mod mqtt;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The folder holding the freshly built `.wasm` stages, or the one
/// `RUNNEL_STAGES_DIR` names, so a benchmark can measure another build of them.
pub fn stages_dir() -> PathBuf {
    std::env::var_os("RUNNEL_STAGES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("RUNNEL_STAGES_DIR")))
}

/// The `.wasm` file of an example stage, e.g. `stage("parse")`.
pub fn stage(name: &str) -> PathBuf {
    let path = stages_dir().join(format!("{name}.wasm"));
    assert!(path.is_file(), "stage {} was not built", path.display());
    path
}

/// The repository root.
pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("RUNNEL_REPO_DIR"))
}

/// A compile cache shared by every test of a run, so each stage is compiled
/// once per run rather than once per test.
pub fn shared_cache_dir() -> PathBuf {
    repo_dir().join("target/test-compile-cache")
}

/// What a run of the binary left behind.
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from_output(out: Output) -> Self {
        Run {
            status: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Lines of stdout parsed as JSON.
    pub fn json_lines(&self) -> Vec<serde_json::Value> {
        self.stdout
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("stdout line {l:?}: {e}")))
            .collect()
    }

    /// The closing "runnel: N in: ..." line.
    pub fn summary(&self) -> &str {
        self.stderr
            .lines()
            .rev()
            .find(|l| l.starts_with("runnel: ") && l.contains(" in: "))
            .unwrap_or_else(|| panic!("no summary line in stderr:\n{}", self.stderr))
    }
}

/// Runs `bin` with `args` in `dir`, feeding `stdin`, with the shared compile
/// cache and info logs.
pub fn run_binary(bin: &Path, dir: &Path, args: &[&str], stdin: &[u8]) -> Run {
    run_binary_with(bin, dir, args, stdin, &[("RUST_LOG", "info")])
}

/// [`run_binary`] with more environment variables.
pub fn run_binary_with(
    bin: &Path,
    dir: &Path,
    args: &[&str],
    stdin: &[u8],
    env: &[(&str, &str)],
) -> Run {
    let mut child = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .env("RUNNEL_CACHE_DIR", shared_cache_dir())
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let _guard = Watchdog::new(child.id());
    if let Some(mut input) = child.stdin.take() {
        input.write_all(stdin).expect("write stdin");
    }
    Run::from_output(child.wait_with_output().expect("wait for runnel"))
}

/// How long any one run of the binary may take in a test before it is
/// killed: a hang fails its test instead of stalling the whole suite.
pub const RUN_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Kills process `pid` if it still runs [`RUN_LIMIT`] after this was made,
/// unless dropped first.
pub struct Watchdog {
    done: Option<std::sync::mpsc::Sender<()>>,
}

impl Watchdog {
    pub fn new(pid: u32) -> Self {
        let (done, finished) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                finished.recv_timeout(RUN_LIMIT)
            {
                eprintln!("runnel (pid {pid}) ran past {RUN_LIMIT:?}; killing it");
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        });
        Watchdog { done: Some(done) }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
    }
}

/// Reads a JSON-lines file.
pub fn read_json_lines(path: &Path) -> Vec<serde_json::Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("{} line {l:?}: {e}", path.display()))
        })
        .collect()
}

/// The numbers of a summary line, in its order: in, produced output,
/// filtered, dead-lettered, out, from timers, dead-letter entries.
pub fn summary_numbers(summary: &str) -> Vec<u64> {
    summary
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().expect("digits"))
        .collect()
}

/// A number no other call in this process returns, for client ids and file
/// names.
pub fn unique() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}-{n}", std::process::id())
}

/// The commit the benchmarks measure, for their output: the short hash, and
/// a warning when the runtime, SDK or stages have uncommitted changes.
pub fn commit() -> String {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(repo_dir())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default()
    };
    let head = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = !git(&["status", "--porcelain", "runtime", "sdk", "functions"]).is_empty();
    match (head.is_empty(), dirty) {
        (true, _) => "unknown: not a git checkout".into(),
        (false, false) => head,
        (false, true) => {
            format!("{head}, with uncommitted changes in runtime/, sdk/ or functions/")
        }
    }
}

/// The folder holding `cargo-lambda` (scripts/setup-lambda installs it on
/// first use), for the Lambda tests and benchmark.
pub fn lambda_tools() -> PathBuf {
    let out = Command::new(repo_dir().join("scripts/setup-lambda"))
        .output()
        .expect("run scripts/setup-lambda");
    assert!(
        out.status.success(),
        "scripts/setup-lambda: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// `PATH` with `tools` in front.
pub fn path_with(tools: &Path) -> String {
    format!(
        "{}:{}",
        tools.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

/// `GET path` on a loopback port over plain HTTP/1.1: the status code and body.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    use std::io::Read;
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    let status = answer
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = answer
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_string());
    Ok((status, body))
}

/// The value of the Prometheus sample whose name and labels start with `series`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find(|line| line.starts_with(series))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}
