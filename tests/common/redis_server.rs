//! A throwaway `redis-server` for the Redis tests (`tests/redis.rs`, `tests/prepaid_redis.rs`).
//!
//! Each test starts its own server on a free loopback port (no persistence) and kills it when
//! done, also when the test panics. Without `redis-server` on the PATH: with `CI=true` the
//! tests fail; otherwise they print SKIPPED and pass, so a bare `cargo test` works anywhere
//! (`scripts/test` installs the Debian package `redis-server`).
//!
//! Included with `#[path = "common/redis_server.rs"] mod redis_server;`: every test file uses a
//! different subset, hence the `dead_code` allowance.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const START_TIMEOUT: Duration = Duration::from_secs(5);

/// A `redis-server` child on `127.0.0.1:port`; killed on drop.
pub struct RedisServer {
    child: Option<Child>,
    /// The port it listens on.
    pub port: u16,
}

/// True when `redis-server` runs. Otherwise fails under `CI=true`, prints SKIPPED elsewhere.
pub fn redis_installed(test: &str) -> bool {
    let ok = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{test}: redis-server not installed; CI must run the Redis tests (apt-get install redis-server)"
        );
    }
    // Straight to the process's stderr: the test harness would swallow `eprintln!`.
    let _ = writeln!(
        std::io::stderr(),
        "\n*** {test}: SKIPPED: redis-server not installed (scripts/test installs it) ***\n"
    );
    false
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

impl RedisServer {
    /// Starts a server on a free port, or `None` (skipped) when redis-server is missing.
    pub fn start(test: &str) -> Option<Self> {
        if !redis_installed(test) {
            return None;
        }
        // A port picked free may be taken before redis binds it: try a few.
        let mut last = String::new();
        for _ in 0..3 {
            let mut server = Self {
                child: None,
                port: free_port(),
            };
            match server.spawn() {
                Ok(()) => return Some(server),
                Err(e) => last = e,
            }
        }
        panic!("{test}: redis-server did not start: {last}");
    }

    fn spawn(&mut self) -> Result<(), String> {
        let port = self.port.to_string();
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
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
                return Err(format!("exited with {status} (port {port} taken?)"));
            }
            if ping(self.port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.stop();
                return Err(format!("no PONG on port {port} within {START_TIMEOUT:?}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn pid(&self) -> String {
        self.child
            .as_ref()
            .map(|c| c.id().to_string())
            .expect("server running")
    }

    /// Kills the server (SIGKILL: no goodbye to clients).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.spawn()
            .expect("redis-server restarts on the same port");
    }

    /// SIGSTOP / SIGCONT: a server that accepts bytes but does not answer.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} failed");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_ref() {
            // A stopped process would otherwise ignore nothing, but be explicit.
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
        }
        self.stop();
    }
}

/// One raw `PING` over TCP.
pub fn ping(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = [0u8; 7];
    s.write_all(b"PING\r\n").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"+PONG\r\n"
}
