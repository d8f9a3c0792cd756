//! pipe: moving a file range to a socket, by io_uring splice (file -> pipe -> socket) through a small
//! per-shard pool of enlarged pipes, or by copying (pread into a buffer, then send).
//!
//! Why a pool: the kernel charges pipe buffers to the user (`pipe-user-pages-soft`, 64 MiB by
//! default, i.e. about 64 pipes of 1 MiB); one pipe per connection would exhaust it and then every
//! new pipe silently shrinks to 4 KiB. Why 1 MiB pipes: with the default 64 KiB pipe, splice
//! throughput halves and CPU doubles (measured, docs/ARCHITECTURE.md). A pipe is only returned to
//! the pool once it has been drained completely; a pipe that saw an error (or whose send was
//! cancelled) may still hold bytes of another response, so it is closed instead.
//!
//! When the pool is exhausted (every pipe busy on a slow socket) the copy path is used: it never
//! waits for another connection's socket.

use std::cell::{Cell, RefCell};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::rc::Rc;

use bytes::Bytes;
use compio::BufResult;
use compio::buf::{IntoInner, IoBuf};
use compio::driver::op::{Interest, PollOnce, ReadAt};
use compio::driver::{SharedFd, ToSharedFd};
use compio::fs::pipe::splice;
use compio::io::AsyncWriteExt;
use compio::net::TcpStream;

/// A file descriptor kept alive by an `Rc` the caller shares with us (a log segment that must stay
/// open while it is being sent, even if retention deletes it meanwhile).
struct RcFd(Rc<dyn AsRawFd>);

impl AsFd for RcFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the Rc keeps the descriptor open for as long as this value lives, and the
        // SharedFd that owns this value lives until every io_uring op using it has completed.
        unsafe { BorrowedFd::borrow_raw(self.0.as_raw_fd()) }
    }
}

/// One pipe: both ends plus its real capacity (the kernel may grant less than asked).
struct Pipe {
    read_end: SharedFd<OwnedFd>,
    write_end: SharedFd<OwnedFd>,
    capacity_bytes: usize,
}

/// Counters for tests, benches and the stats log.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendStats {
    pub splice_sends: u64,
    pub splice_bytes: u64,
    pub copy_sends: u64,
    pub copy_bytes: u64,
    /// Sends that wanted splice but found every pipe busy and copied instead.
    pub pool_exhausted: u64,
    /// Pipes closed because they might hold stray bytes after an error or a cancelled send.
    pub pipes_discarded: u64,
}

/// Sends file ranges to sockets for one shard. Not `Send`: it lives on its shard's thread.
pub struct FileSender {
    idle: RefCell<Vec<Pipe>>,
    live_pipes: Cell<usize>,
    max_pipes: usize,
    pipe_size_bytes: usize,
    splice_min_bytes: u64,
    stats: Cell<SendStats>,
    warned_pipe_size: Cell<bool>,
}

impl FileSender {
    /// `max_pipes` bounds the pool (0 disables splice), `pipe_size_bytes` is what each pipe is
    /// enlarged to and the copy path's chunk, `splice_min_bytes` the smallest range spliced.
    pub fn new(max_pipes: usize, pipe_size_bytes: usize, splice_min_bytes: u64) -> FileSender {
        FileSender {
            idle: RefCell::new(Vec::new()),
            live_pipes: Cell::new(0),
            max_pipes,
            pipe_size_bytes: pipe_size_bytes.max(4096),
            splice_min_bytes,
            stats: Cell::new(SendStats::default()),
            warned_pipe_size: Cell::new(false),
        }
    }

    pub fn stats(&self) -> SendStats {
        self.stats.get()
    }

    /// Pipes currently open (idle or in use); never above `max_pipes`.
    pub fn live_pipes(&self) -> usize {
        self.live_pipes.get()
    }

    pub fn idle_pipes(&self) -> usize {
        self.idle.borrow().len()
    }

    /// Sends `len` bytes of `file` from `offset` to `socket`, choosing splice or copy. On error
    /// an unknown prefix of the range may have been sent: the caller must close the connection.
    pub async fn send(
        &self,
        socket: &TcpStream,
        file: Rc<dyn AsRawFd>,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        if len >= self.splice_min_bytes && self.max_pipes > 0 {
            if let Some(lease) = self.take_pipe() {
                return self.splice_range(lease, socket, file, offset, len).await;
            }
            self.bump(|s| s.pool_exhausted += 1);
        }
        self.copy(socket, file, offset, len).await
    }

    /// True when a range this long is cheaper to copy than to splice; the caller then reads it
    /// with [`FileSender::read`] and sends it together with the reply's other bytes.
    /// Ranges above one pipe's size never qualify, which bounds the memory a read holds.
    pub fn prefers_copy(&self, len: u64) -> bool {
        len <= self.pipe_size_bytes as u64 && (len < self.splice_min_bytes || self.max_pipes == 0)
    }

    /// Reads `len` bytes of `file` from `offset` into memory (the copy path for small ranges, so
    /// they can share one writev with the bytes around them).
    pub async fn read(&self, file: Rc<dyn AsRawFd>, offset: u64, len: u32) -> io::Result<Bytes> {
        let file = SharedFd::new(RcFd(file));
        let want = len as usize;
        let mut buffer = vec![0u8; want];
        let mut filled = 0usize;
        while filled < want {
            let BufResult(result, slice) = compio::runtime::submit(ReadAt::new(
                file.clone(),
                offset + filled as u64,
                buffer.slice(filled..want),
            ))
            .await
            .into_inner();
            buffer = slice.into_inner();
            match result? {
                0 => return Err(eof(offset + filled as u64)),
                n => filled += n,
            }
        }
        self.bump(|s| {
            s.copy_sends += 1;
            s.copy_bytes += u64::from(len);
        });
        Ok(Bytes::from(buffer))
    }

    /// The copy path alone (pread + send), in chunks of the pipe size so memory stays bounded.
    pub async fn copy(
        &self,
        socket: &TcpStream,
        file: Rc<dyn AsRawFd>,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let file = SharedFd::new(RcFd(file));
        let chunk_bytes = (self.pipe_size_bytes as u64).min(len) as usize;
        // Zero-filled once so that every byte is initialised; later chunks overwrite it in place.
        let mut buffer: Vec<u8> = Vec::with_capacity(chunk_bytes);
        let mut sent = 0u64;
        while sent < len {
            let want = ((len - sent) as usize).min(chunk_bytes);
            buffer.truncate(want);
            buffer.resize(want, 0);
            // Read exactly `want` bytes; a page-cache miss is served by io_uring, not this thread.
            let mut filled = 0usize;
            while filled < want {
                let BufResult(result, slice) = compio::runtime::submit(ReadAt::new(
                    file.clone(),
                    offset + sent + filled as u64,
                    buffer.slice(filled..want),
                ))
                .await
                .into_inner();
                buffer = slice.into_inner();
                match result? {
                    0 => return Err(eof(offset + sent + filled as u64)),
                    n => filled += n,
                }
            }
            let mut writer = socket;
            let BufResult(result, returned) = writer.write_all(buffer).await;
            buffer = returned;
            result?;
            sent += want as u64;
        }
        self.bump(|s| {
            s.copy_sends += 1;
            s.copy_bytes += len;
        });
        Ok(())
    }

    /// The splice path alone; fails with `WouldBlock` if no pipe is free.
    pub async fn splice(
        &self,
        socket: &TcpStream,
        file: Rc<dyn AsRawFd>,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let lease = self
            .take_pipe()
            .ok_or_else(|| io::Error::new(io::ErrorKind::WouldBlock, "every pipe is in use"))?;
        self.splice_range(lease, socket, file, offset, len).await
    }

    async fn splice_range(
        &self,
        mut lease: PipeLease<'_>,
        socket: &TcpStream,
        file: Rc<dyn AsRawFd>,
        offset: u64,
        len: u64,
    ) -> io::Result<()> {
        let file = SharedFd::new(RcFd(file));
        let pipe = lease
            .pipe
            .as_ref()
            .expect("a lease holds a pipe until dropped");
        let mut sent = 0u64;
        while sent < len {
            let want = ((len - sent) as usize).min(pipe.capacity_bytes);
            let position = offset + sent;
            let position_in = i64::try_from(position)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
            let in_pipe = splice(&file, &pipe.write_end, want)
                .offset_in(position_in)
                .flags(libc::SPLICE_F_MOVE)
                .await?;
            if in_pipe == 0 {
                // The pipe is still empty, so it stays reusable; the range ran past the file end.
                lease.clean = true;
                return Err(eof(position));
            }
            // Drain what entered the pipe completely before the next file chunk, so bytes can
            // never overtake each other and the pipe is empty whenever it is given back.
            let mut left = in_pipe;
            while left > 0 {
                match splice(&pipe.read_end, socket, left)
                    .flags(libc::SPLICE_F_MOVE)
                    .await
                {
                    Ok(0) => {
                        return Err(io::Error::new(
                            io::ErrorKind::WriteZero,
                            "socket accepted no bytes",
                        ));
                    }
                    Ok(n) => left -= n,
                    // A non-blocking socket with a full send buffer: wait until it drains.
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        compio::runtime::submit(PollOnce::new(
                            socket.to_shared_fd(),
                            Interest::Writable,
                        ))
                        .await
                        .0?;
                    }
                    Err(error) => return Err(error),
                }
            }
            sent += in_pipe as u64;
        }
        lease.clean = true;
        self.bump(|s| {
            s.splice_sends += 1;
            s.splice_bytes += len;
        });
        Ok(())
    }

    fn take_pipe(&self) -> Option<PipeLease<'_>> {
        if let Some(pipe) = self.idle.borrow_mut().pop() {
            return Some(PipeLease::new(self, pipe));
        }
        if self.live_pipes.get() >= self.max_pipes {
            return None;
        }
        match self.create_pipe() {
            Ok(pipe) => {
                self.live_pipes.set(self.live_pipes.get() + 1);
                Some(PipeLease::new(self, pipe))
            }
            Err(error) => {
                tracing::warn!(%error, "cannot create a pipe; sending by copy");
                None
            }
        }
    }

    fn create_pipe(&self) -> io::Result<Pipe> {
        let mut fds = [0 as libc::c_int; 2];
        // SAFETY: fds has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both descriptors are open and owned by nobody else.
        let (read_end, write_end) =
            unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let wanted = libc::c_int::try_from(self.pipe_size_bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: plain fcntl on a descriptor we own.
        let granted = unsafe { libc::fcntl(write_end.as_raw_fd(), libc::F_SETPIPE_SZ, wanted) };
        let capacity_bytes = if granted > 0 {
            granted as usize
        } else {
            if !self.warned_pipe_size.replace(true) {
                tracing::warn!(
                    error = %io::Error::last_os_error(),
                    wanted,
                    "cannot enlarge pipes (see /proc/sys/fs/pipe-max-size and pipe-user-pages-soft); \
                     splice will be slower"
                );
            }
            // SAFETY: as above.
            let current = unsafe { libc::fcntl(write_end.as_raw_fd(), libc::F_GETPIPE_SZ) };
            if current <= 0 {
                return Err(io::Error::last_os_error());
            }
            current as usize
        };
        Ok(Pipe {
            read_end: SharedFd::new(read_end),
            write_end: SharedFd::new(write_end),
            capacity_bytes,
        })
    }

    fn bump(&self, f: impl FnOnce(&mut SendStats)) {
        let mut stats = self.stats.get();
        f(&mut stats);
        self.stats.set(stats);
    }
}

/// A pipe borrowed from the pool. Dropped without `clean` (error or cancellation), the pipe is
/// closed rather than reused: it may still hold bytes meant for another socket.
struct PipeLease<'a> {
    sender: &'a FileSender,
    pipe: Option<Pipe>,
    clean: bool,
}

impl<'a> PipeLease<'a> {
    fn new(sender: &'a FileSender, pipe: Pipe) -> Self {
        PipeLease {
            sender,
            pipe: Some(pipe),
            clean: false,
        }
    }
}

impl Drop for PipeLease<'_> {
    fn drop(&mut self) {
        let Some(pipe) = self.pipe.take() else {
            return;
        };
        if self.clean {
            self.sender.idle.borrow_mut().push(pipe);
        } else {
            self.sender.live_pipes.set(self.sender.live_pipes.get() - 1);
            self.sender.bump(|s| s.pipes_discarded += 1);
        }
    }
}

fn eof(position: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        format!("file ends before the range to send (at byte {position})"),
    )
}
