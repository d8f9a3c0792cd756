//! Test support: start a real `ringbroker` process on free loopback ports with a fresh data dir, and
//! stop it (SIGTERM or SIGKILL) when the test is done.
#![allow(dead_code)]

pub mod kafka;
pub mod proxy;

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A broker process owned by a test; dropping it kills the process.
pub struct Broker {
    child: Option<Child>,
    pub port: u16,
    pub shards: usize,
    pub data_dir: PathBuf,
    extra: Vec<String>,
    /// Where the broker's stderr (its tracing log) goes, if a test reads it.
    log_file: Option<PathBuf>,
    _temp: Option<tempfile::TempDir>,
}

/// Binds `count` consecutive free ports on 127.0.0.1 and returns the first with the listeners.
pub fn bind_port_range(count: usize) -> (u16, Vec<TcpListener>) {
    for _ in 0..200 {
        let probe = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let base = probe.local_addr().unwrap().port();
        drop(probe);
        if base as usize + count >= 65_000 {
            continue;
        }
        let bound: Result<Vec<_>, _> = (0..count)
            .map(|i| TcpListener::bind(("127.0.0.1", base + i as u16)))
            .collect();
        if let Ok(listeners) = bound {
            return (base, listeners);
        }
    }
    panic!("no range of {count} free ports found");
}

/// Finds `count` consecutive ports that are free right now on 127.0.0.1 (released again, for a
/// broker process to bind).
fn free_port_range(count: usize) -> u16 {
    bind_port_range(count).0
}

impl Broker {
    /// Starts a broker with `shards` shards and extra `key=value` overrides on a new temp dir.
    pub fn start(shards: usize, overrides: &[&str]) -> Broker {
        let temp = tempfile::tempdir().expect("temp dir");
        let data_dir = temp.path().join("data");
        let mut broker = Broker {
            child: None,
            port: 0,
            shards,
            data_dir,
            extra: overrides.iter().map(|s| s.to_string()).collect(),
            log_file: None,
            _temp: Some(temp),
        };
        broker.launch();
        broker
    }

    /// Starts a broker on an existing data dir (for restart tests), on fresh ports.
    pub fn start_on(data_dir: &Path, shards: usize, overrides: &[&str]) -> Broker {
        let mut broker = Broker {
            child: None,
            port: 0,
            shards,
            data_dir: data_dir.to_path_buf(),
            extra: overrides.iter().map(|s| s.to_string()).collect(),
            log_file: None,
            _temp: None,
        };
        broker.launch();
        broker
    }

    /// Starts a broker like [`Broker::start`] whose log (stderr, `info` level) is written to `log`,
    /// for tests that read or measure it.
    pub fn start_logging_to(log: &Path, shards: usize, overrides: &[&str]) -> Broker {
        let temp = tempfile::tempdir().expect("temp dir");
        let data_dir = temp.path().join("data");
        let mut broker = Broker {
            child: None,
            port: 0,
            shards,
            data_dir,
            extra: overrides.iter().map(|s| s.to_string()).collect(),
            log_file: Some(log.to_path_buf()),
            _temp: Some(temp),
        };
        broker.launch();
        broker
    }

    /// Like `start_on`, with the broker's log (stderr) appended to `log_file` for the test to read.
    pub fn start_on_logged(
        data_dir: &Path,
        shards: usize,
        overrides: &[&str],
        log_file: &Path,
    ) -> Broker {
        let mut broker = Broker {
            child: None,
            port: 0,
            shards,
            data_dir: data_dir.to_path_buf(),
            extra: overrides.iter().map(|s| s.to_string()).collect(),
            log_file: Some(log_file.to_path_buf()),
            _temp: None,
        };
        broker.launch();
        broker
    }

    fn launch(&mut self) {
        for attempt in 0..5 {
            let port = free_port_range(self.shards);
            let mut command = Command::new(env!("CARGO_BIN_EXE_ringbroker"));
            command
                .arg("--shards")
                .arg(self.shards.to_string())
                .arg("--override")
                .arg(format!("listeners=PLAINTEXT://127.0.0.1:{port}"))
                .arg("--override")
                .arg(format!("log.dirs={}", self.data_dir.display()))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(if let Some(path) = &self.log_file {
                    let file = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(path)
                        .expect("open the broker log file");
                    Stdio::from(file)
                } else if std::env::var_os("RINGBROKER_TEST_LOG").is_some() {
                    Stdio::inherit()
                } else {
                    Stdio::null()
                });
            for extra in &self.extra {
                command.arg("--override").arg(extra);
            }
            if self.log_file.is_some() {
                // Tests that read or measure the log expect the default `info` level.
                command.env_remove("RUST_LOG");
            }
            let mut child = command.spawn().expect("start ringbroker");
            if wait_for_ports(&mut child, port, self.shards, Duration::from_secs(20)) {
                self.child = Some(child);
                self.port = port;
                return;
            }
            let _ = child.kill();
            let _ = child.wait();
            eprintln!("broker did not come up on port {port} (attempt {attempt}); retrying");
        }
        panic!("ringbroker did not start");
    }

    /// The broker process's id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// SIGTERM and wait for a clean exit; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("broker did not stop within 20 s of SIGTERM");
    }

    /// SIGKILL: an unclean stop, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

fn wait_for_ports(child: &mut Child, base: u16, count: usize, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return false;
        }
        if (0..count).all(|i| TcpStream::connect(("127.0.0.1", base + i as u16)).is_ok()) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    false
}
