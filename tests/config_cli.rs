//! The `ringbroker` binary's startup and exit: a stock Kafka server.properties starts it, an
//! invalid value stops it with a message naming key and value, a second broker on the same log
//! directory is refused, and SIGTERM exits 0. Every process started here is stopped here.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const START_TIMEOUT: Duration = Duration::from_secs(20);

/// A child broker killed on drop if the test did not stop it.
struct Broker {
    child: Child,
}

impl Drop for Broker {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Broker {
    fn spawn(dir: &Path, args: &[&str]) -> Broker {
        let child = Command::new(env!("CARGO_BIN_EXE_ringbroker"))
            .args(args)
            .current_dir(dir)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringbroker");
        Broker { child }
    }

    /// Waits until `port` accepts connections; panics if the broker exits or time runs out.
    fn wait_listening(&mut self, port: u16) {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("broker exited early with {status}: {}", self.stderr());
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("broker did not listen on {port} within {START_TIMEOUT:?}");
    }

    fn terminate(&mut self) -> ExitStatus {
        let pid = self.child.id() as libc::pid_t;
        // SAFETY: signalling our own child process.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        self.wait_exit()
    }

    fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("broker did not exit within {START_TIMEOUT:?}");
    }

    fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut text);
        }
        text
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn stock_kafka_file() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/kafka-server.properties")
        .to_str()
        .unwrap()
        .to_string()
}

#[test]
fn stock_kafka_properties_start_the_broker_and_sigterm_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listeners = format!("listeners=PLAINTEXT://127.0.0.1:{port}");
    let log_dirs = format!("log.dirs={}", dir.path().join("logs").display());
    let file = stock_kafka_file();
    let mut broker = Broker::spawn(
        dir.path(),
        &[
            "--config",
            &file,
            "--override",
            &listeners,
            "--override",
            &log_dirs,
            "--shards",
            "1",
        ],
    );
    broker.wait_listening(port);
    let status = broker.terminate();
    let stderr = broker.stderr();
    assert!(status.success(), "exit {status}: {stderr}");
    assert!(stderr.contains("`process.roles`"), "{stderr}");
    assert!(stderr.contains("config: log.dir = "), "{stderr}");
    assert!(dir.path().join("logs/.lock").exists());
}

#[test]
fn no_config_file_uses_ringbroker_data_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listeners = format!("listeners=PLAINTEXT://127.0.0.1:{port}");
    let mut broker = Broker::spawn(dir.path(), &["--override", &listeners, "--shards", "1"]);
    broker.wait_listening(port);
    assert!(dir.path().join("ringbroker-data/.lock").exists());
    let status = broker.terminate();
    assert!(status.success(), "exit {status}: {}", broker.stderr());
}

#[test]
fn an_invalid_value_stops_startup_naming_key_and_value() {
    let dir = tempfile::tempdir().unwrap();
    let mut broker = Broker::spawn(
        dir.path(),
        &["--override", "num.partitions=lots", "--shards", "1"],
    );
    let status = broker.wait_exit();
    let stderr = broker.stderr();
    assert!(!status.success());
    assert!(
        stderr.contains("num.partitions") && stderr.contains("lots"),
        "{stderr}"
    );
    assert!(!dir.path().join("ringbroker-data").exists());
}

#[test]
fn a_second_broker_on_the_same_log_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let first_listeners = format!("listeners=PLAINTEXT://127.0.0.1:{port}");
    let mut first = Broker::spawn(
        dir.path(),
        &["--override", &first_listeners, "--shards", "1"],
    );
    first.wait_listening(port);
    let other_port = free_port();
    let second_listeners = format!("listeners=PLAINTEXT://127.0.0.1:{other_port}");
    let mut second = Broker::spawn(
        dir.path(),
        &["--override", &second_listeners, "--shards", "1"],
    );
    let status = second.wait_exit();
    let stderr = second.stderr();
    assert!(!status.success());
    assert!(stderr.contains("in use by another ringbroker"), "{stderr}");
    assert!(first.terminate().success());
}
