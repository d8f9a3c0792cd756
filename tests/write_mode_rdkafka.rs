//! write_mode_rdkafka: `ringbroker.log.write.mode` end to end with librdkafka. Records produced with
//! uncached appends read back byte-identical, in order, both by a consumer tailing the partition
//! while it is written and by one catching up from the start after a restart; and the segment
//! really leaves the page cache (it stays cached with buffered appends), which shows the mode is
//! wired from the config key to the log's writes.

mod support;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::Duration;

use rdkafka::Offset;

use support::Broker;
use support::kafka::{consume, consumer, create_topic, poll_records, produce_all, producer};

const TIMEOUT: Duration = Duration::from_secs(30);
const RECORDS: usize = 4000;

/// 1 KiB values whose bytes differ record by record, so a misplaced or torn byte is caught.
fn values() -> Vec<(Option<Vec<u8>>, Vec<u8>)> {
    (0..RECORDS)
        .map(|index| {
            let mut state = (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            let value = (0..1024)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state as u8
                })
                .collect();
            (None, value)
        })
        .collect()
}

/// Fraction of `path`'s pages resident in the page cache after an fdatasync (so writeback is done).
fn resident_fraction(path: &Path) -> f64 {
    let file = File::options().read(true).write(true).open(path).unwrap();
    file.sync_data().unwrap();
    let len = file.metadata().unwrap().len() as usize;
    let pages = len.div_ceil(4096);
    assert!(pages > 0, "{} is empty", path.display());
    // SAFETY: a read-only shared mapping of a file kept open for the mapping's life; unmapped below.
    let resident = unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(map, libc::MAP_FAILED);
        let mut vec = vec![0u8; pages];
        assert_eq!(libc::mincore(map, len, vec.as_mut_ptr()), 0);
        libc::munmap(map, len);
        vec.iter().filter(|b| *b & 1 == 1).count()
    };
    resident as f64 / pages as f64
}

/// Produces `RECORDS` 1 KiB records with `mode`, reading them with a tailing consumer if `tailing`,
/// then after a restart from the beginning; returns the fraction of the segment that was left in
/// the page cache before the restart.
fn produce_and_read_back(mode: &str, tailing: bool) -> f64 {
    // Beside the build output, not in /tmp: a tmpfs refuses RWF_DONTCACHE.
    let temp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let data = temp.path().join("data");
    let setting = format!("ringbroker.log.write.mode={mode}");
    let sent = values();
    let mut broker = Broker::start_on(&data, 1, &[&setting]);
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap, "t", 1, &[]);

    let tail = consumer(&bootstrap, &[]);
    let nothing = consume(
        &tail,
        "t",
        1,
        Offset::Beginning,
        1,
        Duration::from_millis(300),
    );
    assert!(nothing.is_empty());
    let producer = producer(&bootstrap, &[("acks", "1")]);
    let reports = produce_all(&producer, "t", Some(0), &sent);
    assert_eq!(reports.last(), Some(&(0, RECORDS as i64 - 1)));
    if tailing {
        let tailed = poll_records(&tail, RECORDS, TIMEOUT);
        assert_eq!(tailed.len(), RECORDS, "{mode}: tailing consumer");
        for (index, record) in tailed.iter().enumerate() {
            assert_eq!(record.offset, index as i64);
            assert_eq!(
                record.value, sent[index].1,
                "{mode}: offset {index} differs"
            );
        }
    }
    drop(tail);
    drop(producer);
    assert_eq!(broker.stop(), Some(0));
    let fraction = resident_fraction(&data.join("t-0").join(format!("{:020}.log", 0)));

    let broker = Broker::start_on(&data, 1, &[&setting]);
    let catch_up = consumer(&broker.bootstrap(), &[]);
    let read = consume(&catch_up, "t", 1, Offset::Beginning, RECORDS, TIMEOUT);
    assert_eq!(read.len(), RECORDS, "{mode}: catch-up consumer");
    for (index, record) in read.iter().enumerate() {
        assert_eq!(
            record.value, sent[index].1,
            "{mode}: offset {index} differs"
        );
    }
    fraction
}

/// Without a tailing reader, an uncached segment leaves the page cache once written back, and a
/// buffered one stays; both read back identically from the start after a restart.
#[test]
fn uncached_appends_leave_the_page_cache_and_read_back_identically() {
    let buffered = produce_and_read_back("buffered", false);
    let uncached = produce_and_read_back("uncached", false);
    assert!(buffered > 0.9, "buffered segment {buffered:.2} cached");
    assert!(uncached < 0.5, "uncached segment {uncached:.2} cached");
}

/// A consumer tailing an uncached log reads every record identically. (Its reads find the pages
/// still cached, and the kernel keeps pages a plain read touched, so no residency bound here.)
#[test]
fn tailing_consumer_reads_uncached_appends_identically() {
    produce_and_read_back("uncached", true);
}

#[test]
fn unknown_write_mode_stops_startup_naming_the_key() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ringbroker"))
        .args([
            "--override",
            "ringbroker.log.write.mode=direct",
            "--override",
            "listeners=PLAINTEXT://127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("ringbroker.log.write.mode") && stderr.contains("direct"),
        "{stderr}"
    );
}
