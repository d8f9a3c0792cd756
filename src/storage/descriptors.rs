//! storage::descriptors: the per-shard bound on open segment descriptors. A segment is known by a
//! `SegmentHandle` (path and base offset, no descriptor); its `.log` is opened on demand and the open
//! `SegmentFile` kept in a least-recently-used cache of `capacity` entries per shard thread, so the
//! number of partitions and segments on disk is limited by the disk, not by `RLIMIT_NOFILE`.
//!
//! Eviction only drops the cache's reference: a `SegmentFile` handed to a reader (a fetch splicing
//! from it) keeps its descriptor open until the reader drops its clone, so an in-use descriptor is
//! never closed under a send. The cache lives in a thread-local because a `PartitionLog` belongs to
//! one shard thread and every shard thread is one shard: the cache is per shard without being
//! threaded through every constructor.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;

use compio::fs::File;

use super::disk::Disk;
use super::error::StorageError;
use super::segment::SegmentFile;

/// Capacity of a thread's cache until `set_capacity` is called (tests, tools). The broker sets it
/// at shard start from `ringbroker.descriptor.cache.size`.
pub const DEFAULT_CAPACITY: usize = 256;

/// The fewest descriptors a cache may keep: every partition being appended to needs its active
/// segment open, and a cache smaller than the handful of partitions touched by one request would
/// reopen files within that request.
pub const MIN_CAPACITY: usize = 16;

thread_local! {
    static CACHE: RefCell<DescriptorCache> = RefCell::new(DescriptorCache::new(DEFAULT_CAPACITY));
    static NEXT_ID: Cell<u64> = const { Cell::new(1) };
}

/// Sets how many segment descriptors this thread (shard) keeps open at most, evicting at once if the
/// cache holds more.
pub fn set_capacity(capacity: usize) {
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        cache.capacity = capacity.max(MIN_CAPACITY);
        cache.evict_to_capacity();
    });
}

/// Descriptors this thread's cache holds open now (readers may hold more, evicted ones).
pub fn cached_count() -> usize {
    CACHE.with(|cache| cache.borrow().entries.len())
}

/// The capacity of this thread's cache.
pub fn capacity() -> usize {
    CACHE.with(|cache| cache.borrow().capacity)
}

/// The default capacity per shard for a process allowed `nofile_limit` descriptors: a quarter of the
/// limit shared by the shards, the rest left to connections, pipes, the offsets logs, files opened
/// briefly (indexes, snapshots, checkpoints) and descriptors held past eviction by in-flight fetches.
pub fn default_capacity(nofile_limit: u64, shard_count: usize) -> usize {
    let per_shard = nofile_limit / 4 / shard_count.max(1) as u64;
    (per_shard.min(1 << 20) as usize).max(MIN_CAPACITY)
}

/// The process's current soft `RLIMIT_NOFILE` (the node raises it to the hard limit at startup).
pub fn nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    limit.rlim_cur
}

struct DescriptorCache {
    capacity: usize,
    clock: u64,
    /// Handle id → (last use, the open file).
    entries: HashMap<u64, (u64, SegmentFile)>,
    /// Last use → handle id, oldest first: the eviction order.
    by_use: BTreeMap<u64, u64>,
}

impl DescriptorCache {
    fn new(capacity: usize) -> DescriptorCache {
        DescriptorCache {
            capacity,
            clock: 0,
            entries: HashMap::new(),
            by_use: BTreeMap::new(),
        }
    }

    fn get(&mut self, id: u64) -> Option<SegmentFile> {
        self.clock += 1;
        let clock = self.clock;
        let (used, file) = self.entries.get_mut(&id)?;
        self.by_use.remove(used);
        *used = clock;
        self.by_use.insert(clock, id);
        Some(file.clone())
    }

    fn insert(&mut self, id: u64, file: SegmentFile) -> SegmentFile {
        // Another task may have opened the same segment while this one awaited its open: keep the
        // first, so one segment never holds two cached descriptors.
        if let Some(existing) = self.get(id) {
            return existing;
        }
        self.clock += 1;
        self.entries.insert(id, (self.clock, file.clone()));
        self.by_use.insert(self.clock, id);
        self.evict_to_capacity();
        file
    }

    fn remove(&mut self, id: u64) -> Option<SegmentFile> {
        let (used, file) = self.entries.remove(&id)?;
        self.by_use.remove(&used);
        Some(file)
    }

    fn evict_to_capacity(&mut self) {
        // Bounded by the number of entries: each round removes one.
        while self.entries.len() > self.capacity {
            let Some((_, id)) = self.by_use.pop_first() else {
                break;
            };
            self.entries.remove(&id);
        }
    }
}

struct HandleInner {
    id: u64,
    path: PathBuf,
    base_offset: i64,
}

impl Drop for HandleInner {
    fn drop(&mut self) {
        // The segment is gone from its log (retention, deletion, close): its cached descriptor goes
        // too. `try_with`, because a log dropped while the thread ends may outlive the cache; the
        // removed file is dropped after the borrow ends, in case closing it ever calls back here.
        let removed = CACHE
            .try_with(|cache| {
                cache
                    .try_borrow_mut()
                    .ok()
                    .and_then(|mut c| c.remove(self.id))
            })
            .ok()
            .flatten();
        drop(removed);
    }
}

/// A segment's `.log` by name: cheap to clone, holds no descriptor itself. `open` returns the
/// cached `SegmentFile`, reopening the file if the cache evicted it.
#[derive(Clone)]
pub struct SegmentHandle {
    inner: Rc<HandleInner>,
}

impl SegmentHandle {
    /// A handle for the segment file at `path`; nothing is opened.
    pub fn new(path: PathBuf, base_offset: i64) -> SegmentHandle {
        let id = NEXT_ID.with(|next| {
            let id = next.get();
            next.set(id + 1);
            id
        });
        SegmentHandle {
            inner: Rc::new(HandleInner {
                id,
                path,
                base_offset,
            }),
        }
    }

    /// A handle for a file the caller has just opened (recovery, segment creation); the descriptor
    /// goes into the cache, so the next `open` needs no system call unless it was evicted since.
    pub fn adopt(file: File, path: PathBuf, base_offset: i64) -> (SegmentHandle, SegmentFile) {
        let handle = SegmentHandle::new(path.clone(), base_offset);
        let file = SegmentFile::new(file, path, base_offset);
        let file = CACHE.with(|cache| cache.borrow_mut().insert(handle.inner.id, file));
        (handle, file)
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Whether both handles name the same segment instance (not merely the same path: a cleaned
    /// segment swapped in under the old name is another instance).
    pub fn same(&self, other: &SegmentHandle) -> bool {
        Rc::ptr_eq(&self.inner, &other.inner)
    }

    pub fn base_offset(&self) -> i64 {
        self.inner.base_offset
    }

    /// The open file if the cache holds it, without any system call.
    pub fn cached(&self) -> Option<SegmentFile> {
        CACHE.with(|cache| cache.borrow_mut().get(self.inner.id))
    }

    /// The open file, reopened (read-write, never created) if the cache evicted it.
    pub async fn open(&self, disk: &Disk) -> Result<SegmentFile, StorageError> {
        self.open_io(disk)
            .await
            .map_err(|source| StorageError::io("open", &self.inner.path, source))
    }

    /// `open` for callers that handle the `io::Error` themselves (and keep its errno).
    pub async fn open_io(&self, disk: &Disk) -> std::io::Result<SegmentFile> {
        self.open_with(disk, false).await
    }

    /// `open_io`, creating the file if it does not exist (small per-partition files written in
    /// place, such as the recovery point).
    pub async fn open_creating(&self, disk: &Disk) -> std::io::Result<SegmentFile> {
        self.open_with(disk, true).await
    }

    async fn open_with(&self, disk: &Disk, create: bool) -> std::io::Result<SegmentFile> {
        if let Some(file) = self.cached() {
            return Ok(file);
        }
        let file = disk.open_rw(&self.inner.path, create).await?;
        let file = SegmentFile::new(file, self.inner.path.clone(), self.inner.base_offset);
        Ok(CACHE.with(|cache| cache.borrow_mut().insert(self.inner.id, file)))
    }
}

impl std::fmt::Debug for SegmentHandle {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("SegmentHandle")
            .field("path", &self.inner.path)
            .field("cached", &self.cached().is_some())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    /// Whether descriptor `fd` is open on `path` (another test thread may reuse the number once it
    /// is closed, so the number alone proves nothing).
    fn fd_is_open_on(fd: i32, path: &Path) -> bool {
        std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok_and(|target| target == path)
    }

    #[test]
    fn the_cache_stays_bounded_and_reopens_evicted_segments() {
        compio::runtime::Runtime::new().unwrap().block_on(async {
            set_capacity(MIN_CAPACITY);
            let dir = tempfile::tempdir().unwrap();
            let disk = Disk::real();
            let mut handles = Vec::new();
            for index in 0..(MIN_CAPACITY * 4) {
                let path = dir.path().join(format!("{index:020}.log"));
                std::fs::write(&path, format!("segment {index}")).unwrap();
                let handle = SegmentHandle::new(path, index as i64);
                handle.open(&disk).await.unwrap();
                handles.push(handle);
                assert!(cached_count() <= MIN_CAPACITY);
            }
            // The first segments were evicted; opening them again works and reads their bytes.
            assert!(handles[0].cached().is_none());
            let file = handles[0].open(&disk).await.unwrap();
            let bytes = disk.read_at(file.file(), 9, 0).await.unwrap();
            assert_eq!(bytes, b"segment 0");
            drop(handles);
            assert_eq!(
                cached_count(),
                0,
                "dropped handles release their descriptors"
            );
        });
    }

    #[test]
    fn eviction_never_closes_a_descriptor_in_use() {
        compio::runtime::Runtime::new().unwrap().block_on(async {
            set_capacity(MIN_CAPACITY);
            let dir = tempfile::tempdir().unwrap();
            let disk = Disk::real();
            let first_path = dir.path().join("first.log");
            std::fs::write(&first_path, b"still readable").unwrap();
            let first = SegmentHandle::new(first_path.clone(), 0);
            // A reader (a fetch splicing) holds the file while the cache churns past it.
            let in_use = first.open(&disk).await.unwrap();
            let fd = in_use.as_raw_fd();
            let mut others = Vec::new();
            for index in 0..(MIN_CAPACITY * 2) {
                let path = dir.path().join(format!("{index}.log"));
                std::fs::write(&path, b"x").unwrap();
                let handle = SegmentHandle::new(path, 0);
                handle.open(&disk).await.unwrap();
                others.push(handle);
            }
            assert!(first.cached().is_none(), "the first segment was evicted");
            assert!(
                fd_is_open_on(fd, &first_path),
                "an evicted descriptor in use stays open"
            );
            let bytes = disk.read_at(in_use.file(), 14, 0).await.unwrap();
            assert_eq!(bytes, b"still readable");
            drop(in_use);
            assert!(
                !fd_is_open_on(fd, &first_path),
                "the last user's drop closes it"
            );
        });
    }

    #[test]
    fn default_capacity_leaves_room_for_other_descriptors() {
        assert_eq!(default_capacity(1024, 1), 256);
        assert_eq!(default_capacity(1024, 2), 128);
        assert_eq!(default_capacity(64, 8), MIN_CAPACITY);
    }
}
