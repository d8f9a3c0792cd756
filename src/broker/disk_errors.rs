//! broker::disk_errors: the log-dir health of one shard, for the operator. A full disk (ENOSPC),
//! an exceeded quota (EDQUOT), a read-only file system (EROFS) or an IO error (EIO) is answered with
//! KAFKA_STORAGE_ERROR on every request it fails, but logged once at ERROR when the state starts
//! (naming the path, errno and partition) and once when an append succeeds again ("log dir writable
//! again"), so a full disk is neither silent nor a log flood.

use std::cell::RefCell;
use std::time::Instant;

use tracing::error;

use crate::storage::{AppendError, ReadError, StorageError};

/// The error numbers that describe the log dir rather than one request.
const DISK_ERRNOS: &[(i32, &str)] = &[
    (libc::ENOSPC, "ENOSPC"),
    (libc::EDQUOT, "EDQUOT"),
    (libc::EROFS, "EROFS"),
    (libc::EIO, "EIO"),
];

struct Failing {
    since: Instant,
    errno_name: &'static str,
    refused: u64,
}

thread_local! {
    /// One state per shard thread: shards share nothing, and each logs what it saw.
    static FAILING: RefCell<Option<Failing>> = const { RefCell::new(None) };
}

fn errno_name(error: &StorageError) -> Option<(i32, &'static str)> {
    let errno = error.raw_os_error()?;
    DISK_ERRNOS
        .iter()
        .find(|(candidate, _)| *candidate == errno)
        .copied()
}

/// Records a failed storage operation on `topic`-`partition`; logs at ERROR if it starts a disk
/// error state on this shard. Errors that say nothing about the disk are ignored here.
pub(super) fn note_storage_failure(topic: &str, partition: i32, error: &StorageError) {
    let Some((errno, name)) = errno_name(error) else {
        return;
    };
    let path = match error {
        StorageError::Io { path, .. } => path.display().to_string(),
        _ => String::new(),
    };
    FAILING.with(|failing| {
        let mut failing = failing.borrow_mut();
        match failing.as_mut() {
            Some(state) => state.refused += 1,
            None => {
                error!(
                    topic, partition, path = %path, errno, errno_name = name, %error,
                    "log dir not writable: storage requests fail with KAFKA_STORAGE_ERROR until it is"
                );
                *failing = Some(Failing {
                    since: Instant::now(),
                    errno_name: name,
                    refused: 1,
                });
            }
        }
    });
}

pub(super) fn note_append_failure(topic: &str, partition: i32, error: &AppendError) {
    if let AppendError::Storage(error) = error {
        note_storage_failure(topic, partition, error);
    }
}

pub(super) fn note_read_failure(topic: &str, partition: i32, error: &ReadError) {
    if let ReadError::Storage(error) = error {
        note_storage_failure(topic, partition, error);
    }
}

/// Records a successful append: ends a disk error state, logging that it ended.
pub(super) fn note_append_success(topic: &str, partition: i32) {
    FAILING.with(|failing| {
        if let Some(state) = failing.borrow_mut().take() {
            error!(
                topic,
                partition,
                errno_name = state.errno_name,
                failed_ms = state.since.elapsed().as_millis() as u64,
                refused = state.refused,
                "log dir writable again"
            );
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_disk_errnos_start_the_state_and_a_success_ends_it() {
        let other = StorageError::Io {
            op: "open",
            path: "/x".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        note_storage_failure("t", 0, &other);
        assert!(FAILING.with(|f| f.borrow().is_none()));
        let full = StorageError::Io {
            op: "write",
            path: "/x/00000000000000000000.log".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        note_storage_failure("t", 0, &full);
        note_storage_failure("t", 1, &full);
        assert_eq!(
            FAILING.with(|f| f.borrow().as_ref().map(|s| s.refused)),
            Some(2)
        );
        note_append_success("t", 0);
        assert!(FAILING.with(|f| f.borrow().is_none()));
    }
}
