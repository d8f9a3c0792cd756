//! storage::disk: the one seam through which the partition log does all file IO, plus the fault
//! injector that tests plug into it (short writes, ENOSPC, EIO on write or fdatasync, a crash at any
//! write boundary).
//!
//! Every call runs on the shard's compio runtime (io_uring). Writes go through the page cache (no
//! O_DIRECT) so the page cache feeds the splice-based fetch path; appends may carry `RWF_DONTCACHE`
//! (`with_uncached_appends`, see `write_mode`) so written pages leave the cache once written back. Listing a directory is the one blocking call: io_uring
//! has no getdents, and it only happens while a partition is opened or deleted.

use std::cell::{Cell, RefCell};
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use bytes::Bytes;
use compio::BufResult;
use compio::fs::{File, OpenOptions};
use compio::io::{AsyncReadAt, AsyncWriteAt};

use super::write_mode::{self, FlaggedWritev, RWF_DONTCACHE};

/// The kinds of operation a fault can be attached to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum IoKind {
    Write,
    Sync,
    SetLen,
    Open,
    Rename,
    Remove,
    Read,
}

const IO_KINDS: usize = 7;

impl IoKind {
    fn slot(self) -> usize {
        self as usize
    }
}

/// What happens to an operation a rule hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The call fails with this errno (e.g. `libc::ENOSPC`, `libc::EIO`) and does nothing.
    Errno(i32),
    /// A write stores at most this many bytes and reports the short count (must be > 0).
    ShortWrite(usize),
    /// The process "dies" during this write: only the first `keep_bytes` reach the file and every later
    /// operation of any kind fails with EIO, as if nothing after this point ever happened.
    Crash { keep_bytes: usize },
}

#[derive(Debug, Clone)]
struct Rule {
    kind: IoKind,
    /// Operations of `kind` to let through before the rule fires.
    skip: u64,
    fault: Fault,
    /// Operations the rule still hits once it fires.
    remaining: u64,
}

/// Faults to inject into a `Disk`. Lives on one thread like the log; tests keep an `Rc` to add rules
/// while the log runs.
#[derive(Debug, Default)]
pub struct FaultInjector {
    counts: [Cell<u64>; IO_KINDS],
    rules: RefCell<Vec<Rule>>,
    crashed: Cell<bool>,
}

impl FaultInjector {
    pub fn new() -> Rc<FaultInjector> {
        Rc::new(FaultInjector::default())
    }

    /// After `skip` more operations of `kind` succeed, the next `times` operations of that kind get `fault`.
    pub fn inject(&self, kind: IoKind, skip: u64, fault: Fault, times: u64) {
        self.rules.borrow_mut().push(Rule {
            kind,
            skip,
            fault,
            remaining: times,
        });
    }

    /// Removes every pending rule (a crash, once it happened, stays).
    pub fn clear(&self) {
        self.rules.borrow_mut().clear();
    }

    /// How many operations of `kind` went through this injector so far.
    pub fn count(&self, kind: IoKind) -> u64 {
        self.counts[kind.slot()].get()
    }

    /// Whether a `Fault::Crash` has fired.
    pub fn crashed(&self) -> bool {
        self.crashed.get()
    }

    /// Counts the operation and returns the fault to apply to it, if any.
    fn next(&self, kind: IoKind) -> Option<Fault> {
        let counter = &self.counts[kind.slot()];
        counter.set(counter.get() + 1);
        if self.crashed.get() {
            return Some(Fault::Errno(libc::EIO));
        }
        let mut rules = self.rules.borrow_mut();
        let mut hit = None;
        for rule in rules.iter_mut().filter(|rule| rule.kind == kind) {
            if rule.skip > 0 {
                rule.skip -= 1;
                continue;
            }
            if hit.is_none() && rule.remaining > 0 {
                rule.remaining -= 1;
                hit = Some(rule.fault);
            }
        }
        rules.retain(|rule| rule.remaining > 0);
        hit
    }
}

fn errno(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

/// A positional writev: compio's own op when there are no flags, ours (which passes `rw_flags`)
/// when there are.
async fn submit_writev(
    file: &File,
    parts: Vec<Bytes>,
    position: u64,
    rw_flags: u32,
) -> BufResult<usize, Vec<Bytes>> {
    if rw_flags == 0 {
        return (&mut &*file).write_vectored_at(parts, position).await;
    }
    let BufResult(result, op) =
        compio::runtime::submit(FlaggedWritev::new(file, parts, position, rw_flags)).await;
    BufResult(result, op.parts)
}

/// The file-system seam. Cheap to clone; clones share the fault injector and the append write mode
/// (so a fallback to buffered writes, once taken, holds for every clone).
#[derive(Debug, Clone, Default)]
pub struct Disk {
    faults: Option<Rc<FaultInjector>>,
    uncached_appends: Rc<Cell<bool>>,
    deferral: Option<Rc<SyncDeferral>>,
}

/// While active, fdatasync and directory fsync through the `Disk` that carries it return at once:
/// the caller makes everything durable with one `dirs::sync_filesystem` and then ends the deferral.
/// Used to create or open thousands of partitions without thousands of fsyncs; nothing they wrote
/// is relied on until that sync.
#[derive(Debug, Default)]
pub struct SyncDeferral {
    active: Cell<bool>,
}

impl SyncDeferral {
    /// Ends the deferral: later syncs through the disk are real again.
    pub fn end(&self) {
        self.active.set(false);
    }

    fn deferring(&self) -> bool {
        self.active.get()
    }
}

impl Disk {
    /// The real file system, no faults, buffered appends.
    pub fn real() -> Disk {
        Disk::default()
    }

    /// This disk (its faults and write mode shared) with syncs deferred until the returned deferral
    /// ends.
    pub fn deferring_syncs(&self) -> (Disk, Rc<SyncDeferral>) {
        let deferral = Rc::new(SyncDeferral {
            active: Cell::new(true),
        });
        (
            Disk {
                deferral: Some(deferral.clone()),
                ..self.clone()
            },
            deferral,
        )
    }

    fn syncs_deferred(&self) -> bool {
        self.deferral.as_ref().is_some_and(|d| d.deferring())
    }

    /// The real file system with faults from `injector` applied on top.
    pub fn with_faults(injector: Rc<FaultInjector>) -> Disk {
        Disk {
            faults: Some(injector),
            ..Disk::default()
        }
    }

    /// The same disk with appends (`write_all_parts_at`) written with `RWF_DONTCACHE` when `on`.
    /// The switch is the log's own (a fresh cell, not the one of the disk it was cloned from), so
    /// one log's fallback after a refusal never flips another log opened from the same shard disk.
    pub fn with_uncached_appends(self, on: bool) -> Disk {
        Disk {
            uncached_appends: Rc::new(Cell::new(on)),
            ..self
        }
    }

    /// Whether appends currently carry `RWF_DONTCACHE` (false after a refusal made them fall back).
    pub fn uncached_appends(&self) -> bool {
        self.uncached_appends.get()
    }

    fn fault(&self, kind: IoKind) -> Option<Fault> {
        self.faults
            .as_ref()
            .and_then(|injector| injector.next(kind))
    }

    fn plain_fault(&self, kind: IoKind) -> io::Result<()> {
        match self.fault(kind) {
            Some(Fault::Errno(code)) => Err(errno(code)),
            Some(Fault::Crash { .. }) => {
                if let Some(injector) = &self.faults {
                    injector.crashed.set(true);
                }
                Err(errno(libc::EIO))
            }
            Some(Fault::ShortWrite(_)) | None => Ok(()),
        }
    }

    /// Opens a file for reading and writing, creating it if `create` is set.
    pub async fn open_rw(&self, path: &Path, create: bool) -> io::Result<File> {
        self.plain_fault(IoKind::Open)?;
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .open(path)
            .await
    }

    /// Opens a file read-only.
    pub async fn open_read(&self, path: &Path) -> io::Result<File> {
        self.plain_fault(IoKind::Open)?;
        OpenOptions::new().read(true).open(path).await
    }

    /// One positional write; may store fewer bytes than given (the count says how many).
    pub async fn write_at(
        &self,
        file: &File,
        buf: Vec<u8>,
        position: u64,
    ) -> BufResult<usize, Vec<u8>> {
        match self.fault(IoKind::Write) {
            Some(Fault::Errno(code)) => return BufResult(Err(errno(code)), buf),
            Some(Fault::ShortWrite(max)) if max < buf.len() => {
                let part = buf[..max.max(1)].to_vec();
                let BufResult(result, _) = (&mut &*file).write_at(part, position).await;
                return BufResult(result, buf);
            }
            Some(Fault::Crash { keep_bytes }) => {
                if keep_bytes > 0 {
                    let part = buf[..keep_bytes.min(buf.len())].to_vec();
                    let BufResult(_, _) = (&mut &*file).write_at(part, position).await;
                }
                if let Some(injector) = &self.faults {
                    injector.crashed.set(true);
                }
                return BufResult(Err(errno(libc::EIO)), buf);
            }
            Some(Fault::ShortWrite(_)) | None => {}
        }
        (&mut &*file).write_at(buf, position).await
    }

    /// Writes all of `buf` at `position`, looping over short writes. On error the file may hold any
    /// prefix of `buf`; the caller rolls back.
    pub async fn write_all_at(&self, file: &File, buf: Vec<u8>, position: u64) -> io::Result<()> {
        let total = buf.len();
        let BufResult(result, buf) = self.write_at(file, buf, position).await;
        let mut written = result?;
        // Short writes are rare (signals, quotas, injected faults); only then is the rest copied.
        // Bounded: each round stores at least one byte or returns an error.
        while written < total {
            if written == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "write stored no bytes",
                ));
            }
            let rest = buf[written..].to_vec();
            let BufResult(result, _) = self.write_at(file, rest, position + written as u64).await;
            let count = result?;
            if count == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "write stored no bytes",
                ));
            }
            written += count;
        }
        Ok(())
    }

    /// Writes the concatenation of `parts` at `position` as one positional `writev`, looping over short
    /// writes; on error the file may hold any prefix, as with `write_all_at`. The append path hands the
    /// client's batch bytes here untouched beside small patched headers, so the batch is never copied.
    /// With uncached appends on, the writev carries `RWF_DONTCACHE`; if the kernel refuses the flag
    /// (EOPNOTSUPP/EINVAL, nothing written) this disk falls back to buffered appends for good and the
    /// same write is retried without it. Fault rules see and count one write per attempt.
    pub async fn write_all_parts_at(
        &self,
        file: &File,
        parts: Vec<Bytes>,
        position: u64,
    ) -> io::Result<()> {
        let total: usize = parts.iter().map(Bytes::len).sum();
        let mut parts = parts;
        // Bounded: the second round runs without the flag, so it cannot be refused again.
        let (result, parts) = loop {
            let flags = if self.uncached_appends() {
                RWF_DONTCACHE
            } else {
                0
            };
            let BufResult(result, returned) =
                self.write_flagged_once(file, parts, position, flags).await;
            match result {
                Err(error) if flags != 0 && write_mode::is_refusal(&error) => {
                    write_mode::note_runtime_fallback(&format!("{file:?}"), &error);
                    self.uncached_appends.set(false);
                    parts = returned;
                }
                result => break (result, returned),
            }
        };
        let written = result?;
        if written < total {
            // Short writes are rare (signals, quotas, injected faults); only then is the rest copied
            // into one buffer.
            if written == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::WriteZero,
                    "write stored no bytes",
                ));
            }
            let rest = parts.concat()[written..].to_vec();
            return self
                .write_all_at(file, rest, position + written as u64)
                .await;
        }
        Ok(())
    }

    /// One positional writev of `parts` with `rw_flags` (0 or `RWF_DONTCACHE`); may store fewer bytes
    /// than given. Fault rules for `IoKind::Write` apply as in `write_at` (a short write or a crash
    /// stores a prefix of the joined parts, with the same flags).
    pub(crate) async fn write_flagged_once(
        &self,
        file: &File,
        parts: Vec<Bytes>,
        position: u64,
        rw_flags: u32,
    ) -> BufResult<usize, Vec<Bytes>> {
        let total: usize = parts.iter().map(Bytes::len).sum();
        match self.fault(IoKind::Write) {
            Some(Fault::Errno(code)) => return BufResult(Err(errno(code)), parts),
            Some(Fault::ShortWrite(max)) if max < total => {
                let part = Bytes::from(parts.concat()).slice(..max.max(1));
                let BufResult(result, _) =
                    submit_writev(file, vec![part], position, rw_flags).await;
                return BufResult(result, parts);
            }
            Some(Fault::Crash { keep_bytes }) => {
                if keep_bytes > 0 {
                    let part = Bytes::from(parts.concat()).slice(..keep_bytes.min(total));
                    let _ = submit_writev(file, vec![part], position, rw_flags).await;
                }
                if let Some(injector) = &self.faults {
                    injector.crashed.set(true);
                }
                return BufResult(Err(errno(libc::EIO)), parts);
            }
            Some(Fault::ShortWrite(_)) | None => {}
        }
        submit_writev(file, parts, position, rw_flags).await
    }

    /// Reads up to `len` bytes at `position`; fewer only at end of file.
    pub async fn read_at(&self, file: &File, len: usize, position: u64) -> io::Result<Vec<u8>> {
        self.plain_fault(IoKind::Read)?;
        let mut out: Vec<u8> = Vec::with_capacity(len);
        // A read may return fewer bytes than asked even before the end of the file; loop until the
        // buffer is full or a read returns nothing. Bounded: each round adds at least one byte.
        while out.len() < len {
            let want = len - out.len();
            let BufResult(result, chunk) = file
                .read_at(Vec::with_capacity(want), position + out.len() as u64)
                .await;
            let count = result?;
            if count == 0 {
                break;
            }
            out.extend_from_slice(&chunk[..count.min(chunk.len())]);
        }
        Ok(out)
    }

    /// fdatasync.
    pub async fn sync_data(&self, file: &File) -> io::Result<()> {
        self.plain_fault(IoKind::Sync)?;
        if self.syncs_deferred() {
            return Ok(());
        }
        file.sync_data().await
    }

    /// ftruncate.
    pub async fn set_len(&self, file: &File, len: u64) -> io::Result<()> {
        self.plain_fault(IoKind::SetLen)?;
        file.set_len(len).await
    }

    /// The current size of an open file.
    pub async fn file_len(&self, file: &File) -> io::Result<u64> {
        Ok(file.metadata().await?.len())
    }

    pub async fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.plain_fault(IoKind::Remove)?;
        compio::fs::remove_file(path).await
    }

    pub async fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.plain_fault(IoKind::Remove)?;
        compio::fs::remove_dir(path).await
    }

    pub async fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.plain_fault(IoKind::Rename)?;
        compio::fs::rename(from, to).await
    }

    pub async fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        compio::fs::create_dir_all(path).await
    }

    /// fsyncs a directory so that creations, renames and removals inside it survive a power loss.
    pub async fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.plain_fault(IoKind::Sync)?;
        if self.syncs_deferred() {
            return Ok(());
        }
        let dir = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY)
            .open(path)
            .await?;
        dir.sync_all().await
    }

    /// Whether a path exists (file or directory).
    pub async fn exists(&self, path: &Path) -> io::Result<bool> {
        match compio::fs::metadata(path).await {
            Ok(_) => Ok(true),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// The names of the entries of a directory. Blocking (see the module comment).
    pub fn list_dir(&self, path: &Path) -> io::Result<Vec<(String, bool)>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            let entry = entry?;
            let is_dir = entry.file_type()?.is_dir();
            if let Some(name) = entry.file_name().to_str() {
                names.push((name.to_owned(), is_dir));
            }
        }
        Ok(names)
    }

    /// Reads a whole small file (checkpoint, metadata); `None` if it does not exist.
    pub async fn read_small_file(
        &self,
        path: &Path,
        limit_bytes: usize,
    ) -> io::Result<Option<Vec<u8>>> {
        let file = match self.open_read(path).await {
            Ok(file) => file,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error),
        };
        let bytes = self.read_at(&file, limit_bytes, 0).await?;
        Ok(Some(bytes))
    }

    /// Replaces `path` with `bytes` atomically and durably: write a temporary file, fdatasync it, rename
    /// it over the target, fsync the directory (Kafka's `CheckpointFile` does the same).
    pub async fn write_file_atomically(&self, path: &Path, bytes: Vec<u8>) -> io::Result<()> {
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        let temporary = PathBuf::from(temporary);
        let file = self.open_rw(&temporary, true).await?;
        self.set_len(&file, 0).await?;
        self.write_all_at(&file, bytes, 0).await?;
        self.sync_data(&file).await?;
        drop(file);
        self.rename(&temporary, path).await?;
        if let Some(parent) = path.parent() {
            self.sync_dir(parent).await?;
        }
        Ok(())
    }
}
