//! problems: the shard's rate limit on log lines about single connections (malformed, oversized
//! or stalled frames, idle closes, refused and failed accepts). A peer can cause such a problem
//! thousands of times a second; each is logged at most once per connection, and at most
//! `ringbroker.connection.log.lines.per.second` lines per shard per second, and whatever was held
//! back is reported as one "similar problems suppressed" line per second, so a misbehaving client
//! cannot fill the disk with the broker's log or slow the shard down with formatting.

use std::cell::RefCell;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// The window the per-second limit counts over.
const WINDOW: Duration = Duration::from_secs(1);

struct ProblemLog {
    shard: usize,
    lines_per_window: u32,
    window_started_at: Instant,
    lines_in_window: u32,
    suppressed_in_window: u64,
    /// Connections that have had their one line; an id leaves when its connection closes, so the
    /// set is never larger than the shard's live connections.
    connections_logged: HashSet<u64>,
}

impl ProblemLog {
    /// Starts a new window once the current one is over, first reporting what it held back.
    fn roll(&mut self, now: Instant) {
        if now.duration_since(self.window_started_at) < WINDOW {
            return;
        }
        if self.suppressed_in_window > 0 {
            tracing::warn!(
                shard = self.shard,
                suppressed = self.suppressed_in_window,
                "{} similar connection problems suppressed (at most one line per connection and \
                 ringbroker.connection.log.lines.per.second = {} per shard)",
                self.suppressed_in_window,
                self.lines_per_window
            );
        }
        self.window_started_at = now;
        self.lines_in_window = 0;
        self.suppressed_in_window = 0;
    }
}

thread_local! {
    static PROBLEM_LOG: RefCell<Option<ProblemLog>> = const { RefCell::new(None) };
}

/// Sets up this shard's limit; called once by `serve` on the shard's thread.
pub(crate) fn install(shard: usize, lines_per_second: u32) {
    PROBLEM_LOG.with(|cell| {
        *cell.borrow_mut() = Some(ProblemLog {
            shard,
            lines_per_window: lines_per_second,
            window_started_at: Instant::now(),
            lines_in_window: 0,
            suppressed_in_window: 0,
            connections_logged: HashSet::new(),
        })
    });
}

/// Whether a line about a problem of `connection` (a connection id, or `None` for the listener)
/// may be logged now; `false` counts it as suppressed. Always `true` outside a serving shard.
pub fn permit(connection: Option<u64>) -> bool {
    PROBLEM_LOG.with(|cell| {
        let mut cell = cell.borrow_mut();
        let Some(log) = cell.as_mut() else {
            return true;
        };
        log.roll(Instant::now());
        let repeated = connection.is_some_and(|id| log.connections_logged.contains(&id));
        if repeated || log.lines_in_window >= log.lines_per_window {
            log.suppressed_in_window += 1;
            return false;
        }
        log.lines_in_window += 1;
        if let Some(id) = connection {
            log.connections_logged.insert(id);
        }
        true
    })
}

/// Forgets a closed connection.
pub(crate) fn connection_closed(connection: u64) {
    PROBLEM_LOG.with(|cell| {
        if let Some(log) = cell.borrow_mut().as_mut() {
            log.connections_logged.remove(&connection);
        }
    });
}

/// Reports what the last window held back even if no further problem arrives; `serve` calls this
/// every second.
pub(crate) fn tick() {
    PROBLEM_LOG.with(|cell| {
        if let Some(log) = cell.borrow_mut().as_mut() {
            log.roll(Instant::now());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_connection_and_a_bounded_number_per_window() {
        install(0, 3);
        assert!(permit(Some(1)));
        assert!(
            !permit(Some(1)),
            "a connection's second problem is suppressed"
        );
        assert!(permit(Some(2)));
        assert!(permit(None));
        assert!(!permit(Some(3)), "the window's budget is spent");
        assert!(!permit(None));
        connection_closed(1);
        PROBLEM_LOG.with(|cell| {
            let mut cell = cell.borrow_mut();
            let log = cell.as_mut().unwrap();
            assert_eq!(log.suppressed_in_window, 3);
            assert!(!log.connections_logged.contains(&1));
            // The next window reports the suppressed lines and starts afresh.
            log.window_started_at -= WINDOW;
        });
        assert!(permit(Some(3)));
        PROBLEM_LOG
            .with(|cell| assert_eq!(cell.borrow().as_ref().unwrap().suppressed_in_window, 0));
    }
}
