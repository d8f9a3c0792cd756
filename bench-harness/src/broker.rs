//! Starting and stopping a `ringbroker` process for `quick` and `matrix`: a fresh data directory
//! and free ports per start, optional CPU pinning, readiness by connecting to every shard's
//! port, and a graceful stop (SIGTERM, then SIGKILL after a bound).

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::{Deserialize, Serialize};

use crate::report::BrokerInfo;

/// A named broker configuration: shard count plus `server.properties`-style overrides.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BrokerConfig {
    pub name: String,
    #[serde(default = "one")]
    pub shards: u32,
    /// Passed as `--override key=value`.
    #[serde(default)]
    pub overrides: BTreeMap<String, String>,
    /// Cores the broker process is confined to (empty = no restriction).
    #[serde(default)]
    pub cpus: Vec<usize>,
}

fn one() -> u32 {
    1
}

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// Finds the broker binary: the explicit path, else beside the running ringbench binary (same
/// target directory), else `target/release` then `target/debug` of the workspace.
pub fn locate_broker_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = explicit {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("broker binary {} does not exist", p.display());
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join("ringbroker"));
        // Test binaries live one level deeper, in deps/.
        if let Some(parent) = dir.parent() {
            candidates.push(parent.join("ringbroker"));
        }
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    candidates.push(workspace.join("target/release/ringbroker"));
    candidates.push(workspace.join("target/debug/ringbroker"));
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .ok_or_else(|| {
            anyhow!(
                "no ringbroker binary found (tried {candidates:?}); build it or pass --broker-bin"
            )
        })
}

/// Picks a base port with `shards` consecutive free ports on 127.0.0.1.
pub fn free_port_range(shards: u32) -> anyhow::Result<u16> {
    for _ in 0..50 {
        let base = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if base as u32 + shards > u16::MAX as u32 {
            continue;
        }
        let all_free =
            (0..shards as u16).all(|i| TcpListener::bind(("127.0.0.1", base + i)).is_ok());
        if all_free {
            return Ok(base);
        }
    }
    bail!("no range of {shards} free ports found on 127.0.0.1")
}

/// A running broker started by ringbench.
pub struct BrokerProcess {
    child: Option<Child>,
    port: u16,
    data_dir: PathBuf,
    log_path: PathBuf,
    info: BrokerInfo,
}

impl BrokerProcess {
    pub fn start(binary: &Path, config: &BrokerConfig) -> anyhow::Result<BrokerProcess> {
        if config.shards == 0 || config.shards > 256 {
            bail!("broker config {}: shards must be 1..=256", config.name);
        }
        let port = free_port_range(config.shards)?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let data_dir =
            std::env::temp_dir().join(format!("ringbench-broker-{}-{nanos:x}", std::process::id()));
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let log_dir = data_dir.join("logs");
        std::fs::create_dir_all(&log_dir)?;
        let log_path = data_dir.join("broker.out");
        let mut args = vec![
            "--override".to_string(),
            format!("listeners=PLAINTEXT://127.0.0.1:{port}"),
            "--override".to_string(),
            format!("log.dirs={}", log_dir.display()),
            "--shards".to_string(),
            config.shards.to_string(),
        ];
        for (k, v) in &config.overrides {
            args.push("--override".to_string());
            args.push(format!("{k}={v}"));
        }
        let out = std::fs::File::create(&log_path)?;
        let mut command = Command::new(binary);
        command
            .args(&args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        if !config.cpus.is_empty() {
            let cpus = config.cpus.clone();
            // SAFETY: between fork and exec only async-signal-safe calls are allowed;
            // CPU_SET and sched_setaffinity are plain memory writes and one system call.
            unsafe {
                command.pre_exec(move || {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    for &c in &cpus {
                        libc::CPU_SET(c, &mut set);
                    }
                    if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0
                    {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut broker = BrokerProcess {
            child: Some(child),
            port,
            data_dir,
            log_path,
            info: BrokerInfo {
                bootstrap: format!("127.0.0.1:{port}"),
                started_by_ringbench: true,
                config_name: Some(config.name.clone()),
                binary: Some(binary.display().to_string()),
                args,
                config: config.overrides.clone(),
                shards: Some(config.shards),
            },
        };
        broker.wait_ready(config.shards)?;
        Ok(broker)
    }

    fn wait_ready(&mut self, shards: u32) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut next_shard = 0;
        while next_shard < shards {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!(
                    "ringbroker exited during startup with {status}; its output:\n{}",
                    self.log_tail()
                );
            }
            if TcpStream::connect(("127.0.0.1", self.port + next_shard as u16)).is_ok() {
                next_shard += 1;
                continue;
            }
            if Instant::now() > deadline {
                bail!(
                    "ringbroker shard {next_shard} did not listen within {READY_TIMEOUT:?}; its output:\n{}",
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(())
    }

    /// The last lines of the broker's output, for error messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn info(&self) -> BrokerInfo {
        self.info.clone()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// SIGTERM, wait (bounded), SIGKILL if needed, then delete the data directory.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let result = self.terminate();
        let _ = std::fs::remove_dir_all(&self.data_dir);
        result
    }

    fn terminate(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        // SAFETY: kill(2) on our own child's pid, which has not been reaped yet.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        child.kill()?;
        child.wait()?;
        Err(anyhow!(
            "ringbroker ignored SIGTERM for {STOP_TIMEOUT:?} and was killed"
        ))
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}
