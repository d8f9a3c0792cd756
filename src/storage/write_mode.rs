//! storage::write_mode: how appends reach the page cache (`ringbroker.log.write.mode`), the io_uring
//! writev that carries `RWF_DONTCACHE`, and the startup probe that decides whether this log dir's
//! file system takes it.
//!
//! Why uncached appends: a log is written once and mostly read back within seconds (tailing
//! consumers) or much later (catch-up consumers). Plain buffered writes leave every written page in
//! the page cache; once dirty pages reach `vm.dirty_ratio` the writer's own core does the writeback
//! and the kernel's LRU scanning, and sustained produce fell to a quarter of its burst rate (issue
//! 12: 210-250 MB/s at 3.7 CPU-s/GB after the first 1-2 GB). With `RWF_DONTCACHE` (Linux 6.14+)
//! the write still goes through the page cache, so a tailing consumer's fetch still splices from
//! memory, but the kernel starts writeback at once and drops each page when its writeback
//! completes, so dirty and clean log pages never pile up. A catch-up consumer reads from disk with
//! the normal read-ahead, as it would after those pages had been evicted anyway.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use compio::BufResult;
use compio::driver::{OpCode, OpEntry, SharedFd, ToSharedFd};
use compio::fs::File;
use io_uring::{opcode, types::Fd};

use super::disk::Disk;

/// The config key, named in every message about the mode.
pub const KEY_LOG_WRITE_MODE: &str = "ringbroker.log.write.mode";

/// The name of the scratch file the probe writes in the log dir and removes again.
pub const PROBE_FILE_NAME: &str = ".ringbroker-write-probe";

/// `RWF_DONTCACHE` from linux/fs.h (0x80, Linux 6.14). Kernels before it answer EINVAL (unknown
/// flag); file systems without support answer EOPNOTSUPP.
pub const RWF_DONTCACHE: u32 = libc::RWF_DONTCACHE as u32;

/// `ringbroker.log.write.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WriteMode {
    /// Plain buffered writes; pages stay cached until memory pressure evicts them. The default
    /// (docs/storage.md says why).
    #[default]
    Buffered,
    /// Buffered writes with `RWF_DONTCACHE`; the broker refuses to start where the flag is refused.
    Uncached,
    /// Uncached where the probe shows the flag works, buffered otherwise (one INFO line).
    Auto,
}

impl WriteMode {
    /// Parses the config value; `None` for anything but the three names.
    pub fn parse(value: &str) -> Option<WriteMode> {
        match value.trim().to_ascii_lowercase().as_str() {
            "buffered" => Some(WriteMode::Buffered),
            "uncached" => Some(WriteMode::Uncached),
            "auto" => Some(WriteMode::Auto),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WriteMode::Buffered => "buffered",
            WriteMode::Uncached => "uncached",
            WriteMode::Auto => "auto",
        }
    }
}

/// Why the configured mode cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum WriteModeError {
    #[error(
        "{KEY_LOG_WRITE_MODE}=uncached, but the file system of {dir} refuses RWF_DONTCACHE writes \
         ({source}); it needs Linux 6.14 or newer and a file system that supports it (ext4, xfs, \
         btrfs), or set {KEY_LOG_WRITE_MODE}=auto or buffered"
    )]
    Refused { dir: String, source: io::Error },
    #[error("cannot probe RWF_DONTCACHE writes in {dir}: {source}")]
    Probe { dir: String, source: io::Error },
}

/// Whether an error from a write with `RWF_DONTCACHE` means "this kernel or file system does not
/// take the flag" rather than a real IO failure.
pub fn is_refusal(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
    )
}

/// Writes one 4 KiB block with `RWF_DONTCACHE` through `disk` into a scratch file in `dir`,
/// fdatasyncs it, and removes it. `Ok(true)`: the flag works here; `Ok(false)`: it is refused;
/// `Err`: the directory itself is unusable (that error would stop the broker anyway).
pub async fn probe_uncached(disk: &Disk, dir: &Path) -> io::Result<bool> {
    let path = dir.join(PROBE_FILE_NAME);
    let file = disk.open_rw(&path, true).await?;
    let block = Bytes::from(vec![0u8; 4096]);
    let outcome = disk
        .write_flagged_once(&file, vec![block], 0, RWF_DONTCACHE)
        .await;
    let supported = match outcome {
        BufResult(Ok(_), _) => true,
        BufResult(Err(error), _) if is_refusal(&error) => false,
        BufResult(Err(error), _) => {
            drop(file);
            let _ = disk.remove_file(&path).await;
            return Err(error);
        }
    };
    drop(file);
    disk.remove_file(&path).await?;
    Ok(supported)
}

/// Turns the configured mode into the one appends use (`Buffered` or `Uncached`, never `Auto`),
/// probing `dir` unless the mode is `Buffered`.
pub async fn resolve(
    disk: &Disk,
    dir: &Path,
    mode: WriteMode,
) -> Result<WriteMode, WriteModeError> {
    if mode == WriteMode::Buffered {
        return Ok(WriteMode::Buffered);
    }
    let supported = probe_uncached(disk, dir)
        .await
        .map_err(|source| WriteModeError::Probe {
            dir: dir.display().to_string(),
            source,
        })?;
    match (mode, supported) {
        (_, true) => Ok(WriteMode::Uncached),
        (WriteMode::Uncached, false) => Err(WriteModeError::Refused {
            dir: dir.display().to_string(),
            source: io::Error::from_raw_os_error(libc::EOPNOTSUPP),
        }),
        (_, false) => {
            tracing::info!(
                dir = %dir.display(),
                "{KEY_LOG_WRITE_MODE}=auto: RWF_DONTCACHE is refused here (needs Linux 6.14+ and \
                 file system support); appends use buffered writes"
            );
            Ok(WriteMode::Buffered)
        }
    }
}

/// Says once per process that appends fell back to buffered writes after a refusal at run time
/// (a log dir whose file system changed under a running broker, or a probe that passed by chance).
pub(crate) fn note_runtime_fallback(path: &str, error: &io::Error) {
    static NOTED: AtomicBool = AtomicBool::new(false);
    if !NOTED.swap(true, Ordering::Relaxed) {
        tracing::info!(
            file = path,
            %error,
            "RWF_DONTCACHE write refused; appends fall back to buffered writes"
        );
    }
}

/// A positional writev with `rw_flags` (compio's own `WriteVectoredAt` has no way to pass them).
/// The iovecs point into `parts`, whose heap buffers do not move while the op is in flight: the op
/// owns them and compio keeps the op alive until the kernel completes it, even if the future that
/// submitted it is dropped.
pub(crate) struct FlaggedWritev {
    fd: SharedFd<std::fs::File>,
    offset: u64,
    rw_flags: u32,
    pub(crate) parts: Vec<Bytes>,
    iovecs: Vec<libc::iovec>,
}

impl FlaggedWritev {
    pub(crate) fn new(file: &File, parts: Vec<Bytes>, offset: u64, rw_flags: u32) -> Self {
        let iovecs = parts
            .iter()
            .map(|part| libc::iovec {
                iov_base: part.as_ptr() as *mut libc::c_void,
                iov_len: part.len(),
            })
            .collect();
        FlaggedWritev {
            fd: file.to_shared_fd(),
            offset,
            rw_flags,
            parts,
            iovecs,
        }
    }
}

// SAFETY: the entry points at `iovecs` and, through them, at `parts`; both are owned by the op and
// neither is touched until the op completes.
unsafe impl OpCode for FlaggedWritev {
    type Control = ();

    fn create_entry(&mut self, _: &mut Self::Control) -> OpEntry {
        opcode::Writev::new(
            Fd(self.fd.as_raw_fd()),
            self.iovecs.as_ptr(),
            self.iovecs.len().try_into().unwrap_or(u32::MAX),
        )
        .offset(self.offset)
        .rw_flags(self.rw_flags as i32)
        .build()
        .into()
    }
}
