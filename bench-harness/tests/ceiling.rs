//! `ringbench ceiling` on this machine: every figure is measured (positive and finite) and the
//! disk test cleans up after itself, including the O_DIRECT and uncached write bandwidth tests.

use ringbench::ceiling::{CeilingOptions, measure};

#[test]
fn ceiling_measures_loopback_and_disk() {
    let dir = tempfile::tempdir().unwrap();
    let result = measure(&CeilingOptions {
        dir: dir.path().to_path_buf(),
        bytes: 16 << 20,
    })
    .unwrap();
    assert!(result.loopback_tcp_gb_per_s.is_finite() && result.loopback_tcp_gb_per_s > 0.0);
    assert!(result.loopback_round_trips > 0);
    assert!(result.loopback_round_trip.p50_ms > 0.0);
    assert!(
        result.disk_buffered_append_mb_per_s > 0.0 && result.disk_fdatasync_1mib_mb_per_s > 0.0
    );
    assert!(result.disk_fdatasync_4kib.count > 0 && result.disk_fdatasync_4kib_ops_per_s > 0.0);
    // This machine (Linux >= 6.14 on ext4; /tmp is on the same ext4) takes both O_DIRECT and
    // RWF_DONTCACHE; the table names both.
    assert!(
        result
            .disk_direct_append_mb_per_s
            .is_some_and(|mb| mb > 0.0)
    );
    assert!(
        result
            .disk_uncached_append_mb_per_s
            .is_some_and(|mb| mb > 0.0)
    );
    assert!(result.disk_append_cpu_s_per_gb.iter().all(Option::is_some));
    let table = result.table();
    assert!(table.contains("loopback TCP"));
    assert!(table.contains("O_DIRECT append") && table.contains("uncached append"));
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the disk test file was removed"
    );
}
