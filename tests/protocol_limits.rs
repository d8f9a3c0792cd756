//! Hostile frames against `ringbroker::protocol::decode_request`: wire counts and lengths far
//! larger than the frame must fail with a typed error and without a large allocation. A
//! counting allocator records the largest single allocation made by the test's own thread.

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::ApiKey;
use ringbroker::protocol::{DecodeError, decode_request};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Wraps the system allocator and remembers, per thread, the largest allocation requested
/// since the last [`largest_allocation_during`] began.
struct LargestAllocation;

thread_local! {
    // `const` initialisation: reading it never allocates, so the allocator can use it.
    static LARGEST_BYTES: Cell<usize> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for LargestAllocation {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn note(size_bytes: usize) {
    // `try_with`: during thread teardown the slot may be gone; then there is nothing to note.
    let _ = LARGEST_BYTES.try_with(|largest| largest.set(largest.get().max(size_bytes)));
}

#[global_allocator]
static ALLOCATOR: LargestAllocation = LargestAllocation;

/// Runs `f` and returns its result with the largest single allocation it made.
fn largest_allocation_during<T>(f: impl FnOnce() -> T) -> (T, usize) {
    LARGEST_BYTES.with(|largest| largest.set(0));
    let out = f();
    (out, LARGEST_BYTES.with(Cell::get))
}

/// A request header (v1 or v2 by `flexible`) followed by `body`.
fn frame(api_key: ApiKey, version: i16, body: &[u8]) -> Bytes {
    let mut buf = BytesMut::new();
    buf.put_i16(api_key as i16);
    buf.put_i16(version);
    buf.put_i32(99);
    buf.put_i16(1);
    buf.put_u8(b'c');
    if api_key.request_header_version(version) >= 2 {
        buf.put_u8(0);
    }
    buf.put_slice(body);
    buf.freeze()
}

/// Decoding must fail as a malformed body, and allocate no more than this.
const ALLOCATION_LIMIT_BYTES: usize = 64 * 1024;

fn check_refused(name: &str, frame: Bytes) {
    let (result, largest_bytes) = largest_allocation_during(|| decode_request(frame));
    match result {
        Err(DecodeError::MalformedBody {
            correlation_id: 99, ..
        }) => {}
        other => panic!("{name}: expected a malformed body, got {other:?}"),
    }
    assert!(
        largest_bytes <= ALLOCATION_LIMIT_BYTES,
        "{name}: allocated {largest_bytes} bytes at once"
    );
}

#[test]
fn metadata_topic_count_of_i32_max_in_a_tiny_frame() {
    check_refused(
        "Metadata v4 topics=0x7fffffff",
        frame(ApiKey::Metadata, 4, &[0x7f, 0xff, 0xff, 0xff, 0, 1]),
    );
}

#[test]
fn compact_array_count_of_u32_max() {
    // Metadata v9+ is flexible: the topic count is an unsigned varint, count + 1.
    check_refused(
        "Metadata v12 topics=uvarint(u32::MAX)",
        frame(
            ApiKey::Metadata,
            12,
            &[0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 0],
        ),
    );
}

#[test]
fn produce_topic_and_partition_counts() {
    // transactional_id null, acks -1, timeout, then topic_data count i32::MAX.
    let mut body = BytesMut::new();
    body.put_i16(-1);
    body.put_i16(-1);
    body.put_i32(1000);
    body.put_i32(i32::MAX);
    check_refused(
        "Produce v3 topics=i32::MAX",
        frame(ApiKey::Produce, 3, &body),
    );

    // One topic "t" with a partition count of i32::MAX.
    let mut body = BytesMut::new();
    body.put_i16(-1);
    body.put_i16(-1);
    body.put_i32(1000);
    body.put_i32(1);
    body.put_i16(1);
    body.put_u8(b't');
    body.put_i32(i32::MAX);
    check_refused(
        "Produce v3 partitions=i32::MAX",
        frame(ApiKey::Produce, 3, &body),
    );

    // Flexible: records length uvarint near u32::MAX.
    let mut body = BytesMut::new();
    body.put_u8(0); // transactional_id null (compact)
    body.put_i16(-1);
    body.put_i32(1000);
    body.put_u8(2); // one topic
    body.put_u8(2);
    body.put_u8(b't');
    body.put_u8(2); // one partition
    body.put_i32(0);
    body.put_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f]); // records length
    body.put_slice(&[0; 4]);
    check_refused(
        "Produce v9 records=u32::MAX",
        frame(ApiKey::Produce, 9, &body),
    );
}

#[test]
fn fetch_partition_count() {
    let mut body = BytesMut::new();
    body.put_i32(-1); // replica_id
    body.put_i32(500); // max_wait_ms
    body.put_i32(1); // min_bytes
    body.put_i32(1 << 20); // max_bytes (v3+)
    body.put_i8(0); // isolation_level (v4+)
    body.put_i32(1); // one topic
    body.put_i16(1);
    body.put_u8(b't');
    body.put_i32(0x7fff_fff0); // partitions
    body.put_slice(&[0; 8]);
    check_refused("Fetch v4 partitions", frame(ApiKey::Fetch, 4, &body));
}

#[test]
fn create_topics_nested_counts() {
    // One topic "t", 1 partition, rf 1, then assignments count i32::MAX.
    let mut body = BytesMut::new();
    body.put_i32(1);
    body.put_i16(1);
    body.put_u8(b't');
    body.put_i32(1);
    body.put_i16(1);
    body.put_i32(i32::MAX);
    check_refused(
        "CreateTopics v2 assignments",
        frame(ApiKey::CreateTopics, 2, &body),
    );
}

#[test]
fn tagged_field_count_and_sizes() {
    // Metadata v12: zero topics (count 1 = empty), two booleans, then a tagged-field section
    // claiming u32::MAX fields, and one claiming a field of u32::MAX bytes.
    check_refused(
        "Metadata v12 tagged count",
        frame(
            ApiKey::Metadata,
            12,
            &[1, 1, 0, 0xff, 0xff, 0xff, 0xff, 0x0f],
        ),
    );
    check_refused(
        "Metadata v12 tagged size",
        frame(
            ApiKey::Metadata,
            12,
            &[1, 1, 0, 1, 5, 0xff, 0xff, 0xff, 0xff, 0x0f, 0],
        ),
    );
}

#[test]
fn string_lengths() {
    // DescribeConfigs v1: one resource, type 2, name length i16::MAX with 3 bytes behind it.
    let mut body = BytesMut::new();
    body.put_i32(1);
    body.put_i8(2);
    body.put_i16(i16::MAX);
    body.put_slice(b"abc");
    check_refused(
        "DescribeConfigs v1 name",
        frame(ApiKey::DescribeConfigs, 1, &body),
    );
}

#[test]
fn the_allocation_counter_sees_allocations() {
    // Without this, a broken counter would make every check above pass vacuously.
    let (buffer, largest_bytes) = largest_allocation_during(|| vec![1u8; 100_000]);
    assert_eq!(buffer.len(), 100_000);
    assert!(largest_bytes >= 100_000, "{largest_bytes}");
}
