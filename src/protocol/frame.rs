//! Request framing: the 4-byte size prefix in front of every Kafka request, checked against
//! `socket.request.max.bytes` before a single byte of the body is buffered.

use thiserror::Error;

/// Why a size prefix was refused. Either way the connection cannot be resynchronised (the
/// next frame boundary is unknown), so the caller closes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The prefix is a negative i32. Kafka raises `InvalidReceiveException` and closes.
    #[error("request size {size_bytes} is negative")]
    Negative {
        /// The size as sent.
        size_bytes: i32,
    },
    /// The prefix asks for more than `socket.request.max.bytes`. Checking this before
    /// allocating is what keeps a 4-byte prefix from reserving gigabytes.
    #[error("request size {size_bytes} exceeds socket.request.max.bytes = {max_bytes}")]
    TooLarge {
        /// The size as sent.
        size_bytes: i32,
        /// The configured limit.
        max_bytes: u32,
    },
}

/// Reads a request's size prefix (big-endian i32, the length of what follows) and checks it
/// against `max_bytes` (`socket.request.max.bytes`; Kafka's default is 100 MiB).
///
/// A zero size is allowed here, as in Kafka; such a frame then fails header decoding with
/// [`DecodeError::MalformedHeader`](super::DecodeError::MalformedHeader).
pub fn frame_length(prefix: [u8; 4], max_bytes: u32) -> Result<usize, FrameError> {
    let size_bytes = i32::from_be_bytes(prefix);
    if size_bytes < 0 {
        return Err(FrameError::Negative { size_bytes });
    }
    // Non-negative i32 always fits in u32 and usize (usize is at least 32 bits on every
    // target this broker builds for).
    let size = size_bytes.unsigned_abs();
    if size > max_bytes {
        return Err(FrameError::TooLarge {
            size_bytes,
            max_bytes,
        });
    }
    Ok(size as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(prefix: [u8; 4], max_bytes: u32, expect: Result<usize, FrameError>) {
        assert_eq!(
            frame_length(prefix, max_bytes),
            expect,
            "prefix {prefix:02x?}"
        );
    }

    #[test]
    fn sizes_within_and_beyond_the_limit() {
        check([0, 0, 0, 0], 100, Ok(0));
        check([0, 0, 0, 100], 100, Ok(100));
        check(
            [0, 0, 0, 101],
            100,
            Err(FrameError::TooLarge {
                size_bytes: 101,
                max_bytes: 100,
            }),
        );
        check([0x7f, 0xff, 0xff, 0xff], u32::MAX, Ok(i32::MAX as usize));
        check(
            [0xff, 0xff, 0xff, 0xff],
            u32::MAX,
            Err(FrameError::Negative { size_bytes: -1 }),
        );
        check(
            [0x80, 0, 0, 0],
            u32::MAX,
            Err(FrameError::Negative {
                size_bytes: i32::MIN,
            }),
        );
    }
}
