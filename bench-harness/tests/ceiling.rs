//! `ringbench ceiling` on this machine: every figure is measured (positive and finite) and the
//! disk test cleans up after itself.

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
    assert!(result.table().contains("loopback TCP"));
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "the disk test file was removed"
    );
}
