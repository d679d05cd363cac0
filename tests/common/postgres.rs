//! A throwaway PostgreSQL server for the PostgreSQL tests (`tests/postgres.rs`).
//!
//! Each test starts its own cluster (`initdb` in a fresh temp dir, then `postgres` on a free
//! loopback port, `fsync=off`) and stops it and removes the dir on drop, also when the test
//! panics. PostgreSQL refuses to run as root, and CI runs as root: then `initdb` and
//! `postgres` run as `nobody` (through `setpriv`, which execs, so the child IS the server),
//! in a dir it owns. The binaries come from Debian's `postgresql` package
//! (`/usr/lib/postgresql/<version>/bin`, the newest), or `$X402_PG_BIN`, or the PATH.
//! Without them: SKIPPED, or a failure under `CI=true` (`scripts/install-test-deps.sh`
//! installs the package).
//!
//! Included with `#[path = "common/postgres.rs"] mod pg_server;` next to `mod common;`.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::process::skip;

const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The unprivileged user the server runs as under root.
const USER: (u32, u32) = (65534, 65534); // nobody:nogroup

/// A `postgres` child on `127.0.0.1:port`; stopped and its directory removed on drop.
pub struct PgServer {
    child: Option<Child>,
    bin: PathBuf,
    dir: PathBuf,
    /// The port it listens on.
    pub port: u16,
}

/// The directory holding `initdb` and `postgres`, or `None` after [`skip`].
pub fn pg_bin(test: &str) -> Option<PathBuf> {
    let has = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Some(d) = std::env::var_os("X402_PG_BIN").map(PathBuf::from) {
        if !has(&d) {
            skip(format_args!(
                "{test}: no initdb and postgres in X402_PG_BIN={}",
                d.display()
            ));
            return None;
        }
        return Some(d);
    }
    // Debian: /usr/lib/postgresql/<major>/bin, the newest major.
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major = e.file_name().to_str()?.parse().ok()?;
            Some((major, e.path().join("bin")))
        })
        .filter(|(_, d)| has(d))
        .collect();
    found.sort();
    if let Some((_, d)) = found.pop() {
        return Some(d);
    }
    // Elsewhere: whatever `pg_config --bindir` names.
    let from_path = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .filter(|d| has(d));
    if from_path.is_none() {
        skip(format_args!(
            "{test}: PostgreSQL (initdb, postgres) not installed (apt-get install postgresql)"
        ));
    }
    from_path
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.trim_ascii() == b"0")
}

/// A loopback port free right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl PgServer {
    /// Makes a cluster and starts it on a free port, or `None` (skipped) when PostgreSQL is
    /// not installed.
    pub fn start(test: &str) -> Option<Self> {
        let bin = pg_bin(test)?;
        let dir = std::env::temp_dir().join(format!(
            "x402-pg-{test}-{}-{}",
            std::process::id(),
            free_port()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut server = Self {
            child: None,
            bin,
            dir,
            port: 0,
        };
        if is_root() {
            // The dir becomes nobody's (its parent, the temp dir, lets everyone in).
            std::os::unix::fs::chown(&server.dir, Some(USER.0), Some(USER.1))
                .expect("chown temp dir");
        }
        let out = server
            .command("initdb")
            .args([
                "--auth=trust",
                "--username=postgres",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
                "-D",
            ])
            .arg(server.dir.join("data"))
            .stdin(Stdio::null())
            .output()
            .expect("initdb runs");
        assert!(
            out.status.success(),
            "{test}: initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // A port picked free may be taken before postgres binds it: try a few.
        let mut last = String::new();
        for _ in 0..3 {
            server.port = free_port();
            match server.spawn() {
                Ok(()) => return Some(server),
                Err(e) => last = e,
            }
        }
        panic!("{test}: postgres did not start: {last}");
    }

    /// `bin/name`, run as `nobody` when we are root.
    fn command(&self, name: &str) -> Command {
        let exe = self.bin.join(name);
        if is_root() {
            let mut c = Command::new("setpriv");
            c.args([
                &format!("--reuid={}", USER.0),
                &format!("--regid={}", USER.1),
                "--clear-groups",
                "--",
            ])
            .arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    fn spawn(&mut self) -> Result<(), String> {
        let child = self
            .command("postgres")
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-k"])
            .arg(&self.dir)
            .args([
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=100",
                "-c",
                "logging_collector=off",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.dir.join("server.log"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .spawn()
            .map_err(|e| format!("spawn: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "exited with {status} (port {} taken?): {}",
                    self.port,
                    self.log()
                ));
            }
            if self.ready() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!(
                    "not ready within {START_TIMEOUT:?}: {}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn ready(&self) -> bool {
        Command::new(self.bin.join("pg_isready"))
            .args([
                "-q",
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-t",
                "1",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres` (trust authentication).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops the server: SIGINT (fast shutdown: clients are disconnected), then waits; SIGKILL
    /// after 10 s.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-INT", &c.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while c.try_wait().ok().flatten().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Sends `sig` (`-STOP`, `-CONT`) to the server and every process it forked (the
    /// backends serving open connections): SIGSTOP freezes it without closing a socket.
    pub fn signal_all(&self, sig: &str) {
        let Some(pid) = self.child.as_ref().map(Child::id) else {
            return;
        };
        let mut pids = vec![pid.to_string()];
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
                continue;
            };
            // `pid (comm) state ppid ...`: comm may hold spaces, so split after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(pid) {
                pids.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        // A backend may exit meanwhile: only the server itself must take the signal.
        let signal = |p: &str| {
            Command::new("kill")
                .args([sig, p])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let ok = signal(&pids[0]);
        for p in &pids[1..] {
            signal(p);
        }
        assert!(ok, "kill {sig} {pid} failed");
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) {
        self.spawn().expect("postgres restarts on the same port");
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        // A frozen server would ignore the shutdown signal.
        if let Some(c) = self.child.as_ref() {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .stderr(Stdio::null())
                .status();
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
