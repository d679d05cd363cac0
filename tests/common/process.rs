//! Child processes of the integration tests: the installed test dependencies (with the loud
//! SKIPPED line, or a failure under `CI=true`), long-running servers (the examples, the
//! reference servers and facilitator, anvil) and clients run to completion for their JSON line.
//!
//! Std only (plus `serde_json`), so that any test binary can include it whatever its features:
//! `tests/common/mod.rs` declares it, `tests/chain/mod.rs` includes it for anvil, and other
//! files use `#[path = "common/process.rs"] mod process;`. Every file uses a different subset,
//! hence the `dead_code` allowance.
#![allow(dead_code)]

use std::fmt::Display;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

// ------------------------------------------------------------------------------------------------
// Installed dependencies

/// The repository root.
pub fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where `scripts/install-test-deps.sh` installs: `$X402_TEST_DEPS`, or `<repo>/target/test-deps`.
pub fn deps_dir() -> PathBuf {
    std::env::var_os("X402_TEST_DEPS")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/test-deps"))
}

/// A test cannot run because `why`: panics under `CI=true` (CI must run every test), prints a
/// loud SKIPPED line elsewhere, so a bare `cargo test` works on a machine without the deps.
pub fn skip(why: impl Display) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why}; CI=true must run this test: run scripts/install-test-deps.sh first");
    }
    // Straight to the process's stderr: libtest would swallow an eprintln! of a passing test.
    let _ = writeln!(
        std::io::stderr(),
        "\n*** SKIPPED {why} (run scripts/install-test-deps.sh) ***\n"
    );
}

/// The deps dir when every marker (a path relative to it) exists; otherwise [`skip`]s `test`
/// naming the first missing one, and returns `None`.
pub fn test_deps(test: &str, markers: &[&str]) -> Option<PathBuf> {
    let dir = deps_dir();
    match markers.iter().map(|m| dir.join(m)).find(|m| !m.exists()) {
        None => Some(dir),
        Some(missing) => {
            skip(format_args!("{test}: {} missing", missing.display()));
            None
        }
    }
}

/// The `name` example binary, built by `cargo build --all-features --examples` next to this
/// test binary (`<target>/<profile>/deps/<test>-<hash>` → `<target>/<profile>/examples/<name>`).
/// Panics when it is not built: that is a broken build, not a missing dependency.
pub fn example_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile> dir")
        .join("examples")
        .join(name);
    assert!(
        bin.exists(),
        "{} not found: build it with `cargo build --all-features --examples` (scripts/test does)",
        bin.display()
    );
    bin
}

// ------------------------------------------------------------------------------------------------
// Servers

/// Spawns `cmd` with stdin closed and both output pipes for us to drain.
fn spawn(cmd: &mut Command) -> Child {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"))
}

/// Everything a child printed on stdout and stderr, line by line, shared with the threads that
/// drain its pipes (a full pipe would block the child).
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<String>>);

impl Log {
    /// The output so far.
    pub fn text(&self) -> String {
        self.0.lock().expect("log lock").clone()
    }

    fn push(&self, line: &str) {
        let mut log = self.0.lock().expect("log lock");
        log.push_str(line);
        log.push('\n');
    }
}

/// A long-running child (stdin closed, both pipes drained into its [`Log`]); killed and reaped
/// on drop, also when the test panics.
pub struct Server {
    child: Child,
    log: Log,
}

impl Server {
    /// Spawns `cmd` as `name` and waits up to `timeout` for its first stdout line, returned
    /// with the server. Panics (with the log) when it exits or stays silent.
    pub fn start(name: &str, cmd: &mut Command, timeout: Duration) -> (Server, String) {
        Self::start_until(name, cmd, timeout, |line| Some(line.to_owned()))
    }

    /// [`start`](Self::start) for the examples' and node scripts' convention: a first line
    /// `listening on URL`. Returns the URL without a trailing `/`.
    pub fn listening(name: &str, cmd: &mut Command, timeout: Duration) -> (Server, String) {
        let (server, first) = Self::start(name, cmd, timeout);
        let url = first
            .strip_prefix("listening on ")
            .unwrap_or_else(|| {
                panic!(
                    "{name}: unexpected first line {first:?}, want `listening on http://...`; log:\n{}",
                    server.log()
                )
            })
            .trim_end_matches('/')
            .to_owned();
        (server, url)
    }

    /// Spawns `cmd` as `name` and waits up to `timeout` for the first stdout line for which
    /// `ready` says `Some`. Panics (with the log) when it exits or times out first.
    pub fn start_until<T>(
        name: &str,
        cmd: &mut Command,
        timeout: Duration,
        mut ready: impl FnMut(&str) -> Option<T>,
    ) -> (Server, T) {
        let mut child = spawn(cmd);
        let log = Log::default();
        // stdout lines also come to us until we stop listening (the receiver is dropped).
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        let out_log = log.clone();
        thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                out_log.push(&line);
                if tx.as_ref().is_some_and(|tx| tx.send(line).is_err()) {
                    tx = None;
                }
            }
        });
        let stderr = child.stderr.take().expect("piped stderr");
        let err_log = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                err_log.push(&line);
            }
        });
        let server = Server { child, log };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(found) = ready(&line) {
                        return (server, found);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "{name} not ready within {timeout:?}; log:\n{}",
                        server.log()
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // stdout closed: it exited. Give the stderr drain a moment to catch up.
                    thread::sleep(Duration::from_millis(200));
                    panic!("{name} exited before it was ready; log:\n{}", server.log())
                }
            }
        }
    }

    /// Its output so far.
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// A handle on its output that outlives a borrow of the server (e.g. into a thread).
    pub fn log_handle(&self) -> Log {
        self.log.clone()
    }

    /// `kill -9`, and reap it.
    pub fn kill(self) {
        drop(self);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ------------------------------------------------------------------------------------------------
// Clients run to completion

/// What a finished child printed.
pub struct Output {
    /// How it exited.
    pub status: ExitStatus,
    /// All of its stdout.
    pub stdout: String,
    /// All of its stderr.
    pub stderr: String,
}

/// Runs `cmd` (stdin closed) to completion, draining both pipes while it runs. After `timeout`
/// it is killed and the test panics with its stderr and `context()` (say, a server's log).
/// A non-zero exit is not a panic: the caller decides.
pub fn run(cmd: &mut Command, timeout: Duration, context: impl Fn() -> String) -> Output {
    let mut child = spawn(cmd);
    let drain = |mut r: Box<dyn Read + Send>| {
        thread::spawn(move || {
            let mut s = String::new();
            let _ = r.read_to_string(&mut s);
            s
        })
    };
    let out = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let err = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} still running after {timeout:?}\nstderr: {}\n{}",
                err.join().unwrap_or_default(),
                context()
            );
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().expect("stdout drain"),
        stderr: err.join().expect("stderr drain"),
    }
}

/// [`run`], then its last non-empty stdout line as JSON (the test drivers in `tests/clients`
/// print one). Panics with stdout, stderr and `context()` when there is none.
pub fn run_json(cmd: &mut Command, timeout: Duration, context: impl Fn() -> String) -> Value {
    let out = run(cmd, timeout, &context);
    let line = out
        .stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "{cmd:?} ({}) printed no JSON line ({e})\nstdout: {}\nstderr: {}\n{}",
            out.status,
            out.stdout,
            out.stderr,
            context()
        )
    })
}
