//! storage_write_mode: uncached appends (`ringbroker.log.write.mode`). The startup probe, the
//! fallback to buffered writes where the kernel or file system refuses `RWF_DONTCACHE` (injected
//! EOPNOTSUPP/EINVAL through the storage::Disk fault seam), and proof that uncached appends really
//! leave the page cache once written back while reading back byte-identical.

mod storage_support;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use ringbroker::storage::write_mode::{self, KEY_LOG_WRITE_MODE, PROBE_FILE_NAME};
use ringbroker::storage::{Disk, Fault, FaultInjector, IoKind, LogConfig, PartitionLog, WriteMode};
use storage_support::{as_stored, batch, run, small_config};

/// The log dirs of these tests live beside the build output, not in /tmp: /tmp may be a tmpfs,
/// which refuses `RWF_DONTCACHE`.
fn disk_tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap()
}

/// Pages of `path` resident in the page cache, and the file's page count (mincore on a mapping).
fn resident_pages(path: &Path) -> (usize, usize) {
    let file = File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    let page = 4096usize;
    let pages = len.div_ceil(page);
    if pages == 0 {
        return (0, 0);
    }
    // SAFETY: a read-only shared mapping of a file we keep open for the mapping's life; unmapped below.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED, "mmap {}", path.display());
        let mut vec = vec![0u8; pages];
        assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0);
        libc::munmap(map, len);
        (vec.iter().filter(|b| *b & 1 == 1).count(), pages)
    }
}

/// Appends `count` batches of about 16 KiB, returning (base offset, stored bytes) of each.
async fn fill(log: &PartitionLog, count: u64) -> Vec<(i64, Vec<u8>)> {
    let mut stored = Vec::new();
    for seed in 0..count {
        let client = batch(16, 1000, 1_000, seed);
        let info = log.append(client.clone(), 0).await.expect("append");
        stored.push((info.base_offset, as_stored(&client, info.base_offset)));
    }
    stored
}

async fn check_reads(log: &PartitionLog, expected: &[(i64, Vec<u8>)]) {
    for (offset, bytes) in expected {
        let read = log
            .read_copy(*offset, bytes.len() as u32, true)
            .await
            .expect("read");
        assert_eq!(read.as_ref(), bytes.as_slice(), "offset {offset} changed");
    }
}

fn config() -> LogConfig {
    LogConfig {
        segment_bytes: 64 << 20,
        ..small_config()
    }
}

#[test]
fn probe_finds_dontcache_on_this_file_system_and_leaves_no_file() {
    let dir = disk_tempdir();
    run(async {
        let supported = write_mode::probe_uncached(&Disk::real(), dir.path())
            .await
            .unwrap();
        // The machines this project runs on are Linux >= 6.14 on ext4; say so loudly if not.
        assert!(
            supported,
            "RWF_DONTCACHE refused in {}",
            dir.path().display()
        );
        let resolved = write_mode::resolve(&Disk::real(), dir.path(), WriteMode::Auto)
            .await
            .unwrap();
        assert_eq!(resolved, WriteMode::Uncached);
    });
    assert!(!dir.path().join(PROBE_FILE_NAME).exists());
}

#[test]
fn refused_flag_makes_auto_buffered_and_uncached_a_startup_error() {
    for refusal in [libc::EOPNOTSUPP, libc::EINVAL] {
        let dir = disk_tempdir();
        run(async {
            let faults = FaultInjector::new();
            let disk = Disk::with_faults(faults.clone());
            faults.inject(IoKind::Write, 0, Fault::Errno(refusal), 1);
            let supported = write_mode::probe_uncached(&disk, dir.path()).await.unwrap();
            assert!(!supported, "errno {refusal} must read as a refusal");

            faults.inject(IoKind::Write, 0, Fault::Errno(refusal), 1);
            let auto = write_mode::resolve(&disk, dir.path(), WriteMode::Auto)
                .await
                .unwrap();
            assert_eq!(auto, WriteMode::Buffered);

            faults.inject(IoKind::Write, 0, Fault::Errno(refusal), 1);
            let error = write_mode::resolve(&disk, dir.path(), WriteMode::Uncached)
                .await
                .unwrap_err();
            let message = error.to_string();
            assert!(
                message.contains(KEY_LOG_WRITE_MODE) && message.contains("uncached"),
                "{message}"
            );

            // Buffered never probes.
            let writes = faults.count(IoKind::Write);
            let buffered = write_mode::resolve(&disk, dir.path(), WriteMode::Buffered)
                .await
                .unwrap();
            assert_eq!(buffered, WriteMode::Buffered);
            assert_eq!(faults.count(IoKind::Write), writes);
        });
        assert!(!dir.path().join(PROBE_FILE_NAME).exists());
    }
}

#[test]
fn probe_reports_a_real_io_error_instead_of_falling_back() {
    let dir = disk_tempdir();
    run(async {
        let faults = FaultInjector::new();
        let disk = Disk::with_faults(faults.clone());
        faults.inject(IoKind::Write, 0, Fault::Errno(libc::EIO), 1);
        let error = write_mode::resolve(&disk, dir.path(), WriteMode::Auto)
            .await
            .unwrap_err();
        assert!(error.to_string().contains("cannot probe"), "{error}");
    });
}

#[test]
fn append_refused_at_run_time_falls_back_to_buffered_and_loses_nothing() {
    for refusal in [libc::EOPNOTSUPP, libc::EINVAL] {
        let dir = disk_tempdir();
        run(async {
            let faults = FaultInjector::new();
            let disk = Disk::with_faults(faults.clone()).with_uncached_appends(true);
            let log = PartitionLog::open_with_disk(dir.path(), config(), disk.clone())
                .await
                .unwrap();
            let mut expected = fill(&log, 3).await;
            assert!(disk.uncached_appends());
            faults.inject(IoKind::Write, 0, Fault::Errno(refusal), 1);
            expected.extend(fill(&log, 3).await);
            assert!(
                !disk.uncached_appends(),
                "a refusal must switch to buffered"
            );
            check_reads(&log, &expected).await;
            log.close().await.unwrap();
            let log = PartitionLog::open(dir.path(), config()).await.unwrap();
            check_reads(&log, &expected).await;
            assert_eq!(log.log_end_offset(), 6 * 16);
        });
    }
}

#[test]
fn uncached_appends_leave_the_page_cache_once_synced_and_read_back_identically() {
    let mut resident = Vec::new();
    for uncached in [false, true] {
        let dir = disk_tempdir();
        let config = LogConfig {
            uncached_appends: uncached,
            ..config()
        };
        run(async {
            let log = PartitionLog::open(dir.path(), config.clone())
                .await
                .unwrap();
            // 256 batches of ~16 KiB: 4 MiB.
            let expected = fill(&log, 256).await;
            log.close().await.unwrap();
            let segment = dir.path().join(format!("{:020}.log", 0));
            resident.push(resident_pages(&segment));
            let log = PartitionLog::open(dir.path(), config).await.unwrap();
            check_reads(&log, &expected).await;
        });
    }
    let (buffered, pages) = resident[0];
    let (uncached, _) = resident[1];
    assert!(pages >= 1000, "{pages} pages");
    assert!(
        buffered * 10 >= pages * 9,
        "buffered kept {buffered}/{pages}"
    );
    // A page two appends share (a batch boundary) was already cached when the second append came,
    // and the kernel only drops pages an uncached write created: about one page per batch stays
    // (measured: 208 of 1013 with 16 KiB batches), clean and reclaimable.
    assert!(uncached * 3 <= pages, "uncached kept {uncached}/{pages}");
}
