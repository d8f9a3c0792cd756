//! InitProducerId: producer ids for idempotent producers. The controller (shard 0) owns the one
//! allocator; other shards forward the request to it through `ShardContext::run_on` (InitProducerId
//! is sent once per producer instance, so the cross-core hop costs nothing that matters, and one
//! allocator needs no coordination between shards).
//!
//! Ids come from blocks of `BLOCK_SIZE` that are persisted before any id of them is handed out
//! (`<log.dir>/producer-id-block`: the next block's start, written to a temporary file, fdatasync'ed
//! and renamed, as Kafka's `ProducerIdManager` reserves blocks in its metadata log). After a crash
//! the allocator resumes at the persisted end, skipping whatever was left of the block in use: ids
//! are never reused, at the cost of at most `BLOCK_SIZE` ids per restart out of 2^63.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use futures_util::lock::Mutex;
use kafka_protocol::messages::ProducerId;
use kafka_protocol::messages::init_producer_id_request::InitProducerIdRequest;
use kafka_protocol::messages::init_producer_id_response::InitProducerIdResponse;
use tracing::{info, warn};

use super::errors::code;
use super::{ShardBroker, current, now_ms};
use crate::storage::Disk;

/// Ids reserved per persisted block.
pub const BLOCK_SIZE: i64 = 1000;
/// The file in `log.dir` holding the start of the next block not yet handed to the allocator.
pub const BLOCK_FILE: &str = "producer-id-block";
/// How many producers the allocator remembers for epoch bumps; beyond this the least recently
/// initialised one is forgotten (it then gets a fresh id if it re-initialises, which is what Kafka
/// gives every non-transactional producer anyway).
const ISSUED_MAX: usize = 100_000;

/// The allocator's view of one producer id it handed out.
#[derive(Debug, Clone, Copy)]
struct Issued {
    epoch: i16,
    issued_ms: i64,
}

#[derive(Debug)]
struct Allocation {
    next_id: i64,
    /// Exclusive end of the persisted block.
    block_end: i64,
    issued: HashMap<i64, Issued>,
}

/// Why InitProducerId failed, as a Kafka error code (the response has no message field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InitError(pub i16);

/// The producer-id allocator; lives on shard 0 only.
pub struct ProducerIdManager {
    path: PathBuf,
    disk: Disk,
    state: RefCell<Allocation>,
    /// Serialises block reservations (an await on the file write sits between reading and moving
    /// `block_end`).
    reserving: Mutex<()>,
}

impl ProducerIdManager {
    /// Loads the persisted block end from `log_dir`. A missing file starts at id 0; an unreadable
    /// one stops startup, because guessing could hand out an id twice.
    pub fn open(log_dir: &Path) -> anyhow::Result<ProducerIdManager> {
        let path = log_dir.join(BLOCK_FILE);
        let next_block = match std::fs::read_to_string(&path) {
            Ok(text) => parse_block_file(&text).ok_or_else(|| {
                anyhow::anyhow!(
                    "{} is malformed (expected \"version=1\\nnext.block.start=<id>\\n\"); \
                     refusing to guess the next producer id",
                    path.display()
                )
            })?,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => 0,
            Err(error) => {
                return Err(anyhow::anyhow!("reading {}: {error}", path.display()));
            }
        };
        info!(next_block, "producer id allocator loaded");
        Ok(ProducerIdManager {
            path,
            disk: Disk::real(),
            state: RefCell::new(Allocation {
                next_id: next_block,
                block_end: next_block,
                issued: HashMap::new(),
            }),
            reserving: Mutex::new(()),
        })
    }

    /// A fresh producer id, reserving (and persisting) a new block first if the current one is
    /// used up.
    async fn allocate(&self) -> Result<i64, InitError> {
        // Bounded: a round either returns an id or extends the block, after which the next round
        // returns (other tasks can take ids meanwhile only by extending it further).
        for _ in 0..16 {
            {
                let mut state = self.state.borrow_mut();
                if state.next_id < state.block_end {
                    let id = state.next_id;
                    state.next_id += 1;
                    return Ok(id);
                }
            }
            let _reserving = self.reserving.lock().await;
            let new_end = {
                let state = self.state.borrow();
                if state.next_id < state.block_end {
                    continue;
                }
                state
                    .block_end
                    .checked_add(BLOCK_SIZE)
                    .ok_or(InitError(code::UNKNOWN_SERVER_ERROR))?
            };
            let text = format!("version=1\nnext.block.start={new_end}\n");
            if let Err(error) = self
                .disk
                .write_file_atomically(&self.path, text.into_bytes())
                .await
            {
                warn!(path = %self.path.display(), %error, "could not reserve a producer id block");
                return Err(InitError(code::KAFKA_STORAGE_ERROR));
            }
            self.state.borrow_mut().block_end = new_end;
        }
        Err(InitError(code::UNKNOWN_SERVER_ERROR))
    }

    /// InitProducerId for a non-transactional producer. `existing` is the id and epoch a v3+
    /// request carries when a producer re-initialises (KIP-360): if it is the latest epoch this
    /// allocator issued for that id, the epoch is bumped (a new id when it would overflow); an
    /// older epoch is fenced. An id this allocator does not know (issued before a restart, or
    /// forgotten) gets a fresh id, which is what Kafka gives every non-transactional producer.
    pub async fn init(&self, existing: Option<(i64, i16)>) -> Result<(i64, i16), InitError> {
        let now = now_ms();
        if let Some((id, epoch)) = existing {
            let mut state = self.state.borrow_mut();
            match state.issued.get(&id).copied() {
                Some(issued) if epoch < issued.epoch => {
                    return Err(InitError(code::PRODUCER_FENCED));
                }
                // Kafka keeps the last epoch (Short.MaxValue) out of use and rotates the id instead.
                Some(issued) if epoch == issued.epoch && issued.epoch < i16::MAX - 1 => {
                    let bumped = issued.epoch + 1;
                    state.issued.insert(
                        id,
                        Issued {
                            epoch: bumped,
                            issued_ms: now,
                        },
                    );
                    return Ok((id, bumped));
                }
                Some(_) => {
                    state.issued.remove(&id);
                }
                None => {}
            }
        }
        let id = self.allocate().await?;
        let mut state = self.state.borrow_mut();
        if state.issued.len() >= ISSUED_MAX
            && let Some(oldest) = state
                .issued
                .iter()
                .min_by_key(|(_, issued)| issued.issued_ms)
                .map(|(id, _)| *id)
        {
            state.issued.remove(&oldest);
        }
        state.issued.insert(
            id,
            Issued {
                epoch: 0,
                issued_ms: now,
            },
        );
        Ok((id, 0))
    }

    /// Forgets producers initialised longer than `expiration_ms` ago: the partitions forget them
    /// after the same idle time, so a bump would find nothing to fence.
    pub fn expire(&self, now_ms: i64, expiration_ms: u64) {
        let expiration_ms = i64::try_from(expiration_ms).unwrap_or(i64::MAX);
        self.state
            .borrow_mut()
            .issued
            .retain(|_, issued| now_ms.saturating_sub(issued.issued_ms) < expiration_ms);
    }
}

fn parse_block_file(text: &str) -> Option<i64> {
    let mut lines = text.lines();
    if lines.next()? != "version=1" {
        return None;
    }
    let start: i64 = lines
        .next()?
        .strip_prefix("next.block.start=")?
        .parse()
        .ok()?;
    (start >= 0).then_some(start)
}

impl ShardBroker {
    /// InitProducerId, on whichever shard the client asked: the allocation runs on shard 0.
    pub(super) async fn init_producer_id(
        &self,
        request: InitProducerIdRequest,
        version: i16,
    ) -> InitProducerIdResponse {
        let result = if request.transactional_id.is_some() {
            // Transactions are not implemented and their APIs are not advertised; a client that
            // asks anyway is told plainly (UNSUPPORTED_VERSION is fatal for it, as it should be),
            // the same answer a transactional Produce gets.
            Err(InitError(code::UNSUPPORTED_VERSION))
        } else {
            let (id, epoch) = (request.producer_id.0, request.producer_epoch);
            // v0-2 carry no id (the fields default to -1). Kafka's rule: both or neither.
            if (id == -1) != (epoch == -1) || id < -1 || epoch < -1 {
                Err(InitError(code::INVALID_REQUEST))
            } else {
                let existing = (id >= 0).then_some((id, epoch));
                self.allocate_producer_id(existing).await
            }
        };
        match result {
            Ok((id, epoch)) => InitProducerIdResponse::default()
                .with_producer_id(ProducerId(id))
                .with_producer_epoch(epoch),
            Err(InitError(error)) => {
                // Before v4 clients do not know PRODUCER_FENCED; Kafka sends them the older
                // INVALID_PRODUCER_EPOCH, which they handle the same way.
                let error = if error == code::PRODUCER_FENCED && version < 4 {
                    code::INVALID_PRODUCER_EPOCH
                } else {
                    error
                };
                InitProducerIdResponse::default()
                    .with_error_code(error)
                    .with_producer_id(ProducerId(-1))
                    .with_producer_epoch(-1)
            }
        }
    }

    async fn allocate_producer_id(
        &self,
        existing: Option<(i64, i16)>,
    ) -> Result<(i64, i16), InitError> {
        if let Some(manager) = &self.producer_ids {
            return manager.init(existing).await;
        }
        self.ctx
            .run_on(0, move || async move {
                match &current().producer_ids {
                    Some(manager) => manager.init(existing).await,
                    None => Err(InitError(code::UNKNOWN_SERVER_ERROR)),
                }
            })
            .await
            .unwrap_or(Err(InitError(code::COORDINATOR_NOT_AVAILABLE)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run<F: Future>(future: F) -> F::Output {
        compio::runtime::Runtime::new().unwrap().block_on(future)
    }

    #[test]
    fn ids_are_never_reused_across_restarts_and_blocks_are_persisted_first() {
        let dir = tempfile::tempdir().unwrap();
        let first: Vec<i64> = run(async {
            let manager = ProducerIdManager::open(dir.path()).unwrap();
            let mut ids = Vec::new();
            for _ in 0..(BLOCK_SIZE + 5) {
                ids.push(manager.init(None).await.unwrap().0);
            }
            ids
        });
        assert_eq!(first[0], 0);
        assert_eq!(*first.last().unwrap(), BLOCK_SIZE + 4);
        // The second block was reserved before its first id went out.
        let text = std::fs::read_to_string(dir.path().join(BLOCK_FILE)).unwrap();
        assert_eq!(parse_block_file(&text), Some(2 * BLOCK_SIZE));
        // A "crash" (no shutdown step exists): the next start skips the rest of the block.
        let after = run(async {
            let manager = ProducerIdManager::open(dir.path()).unwrap();
            manager.init(None).await.unwrap().0
        });
        assert_eq!(after, 2 * BLOCK_SIZE);
        assert!(!first.contains(&after));
    }

    #[test]
    fn a_known_producer_gets_its_epoch_bumped_and_an_old_epoch_is_fenced() {
        let dir = tempfile::tempdir().unwrap();
        run(async {
            let manager = ProducerIdManager::open(dir.path()).unwrap();
            let (id, epoch) = manager.init(None).await.unwrap();
            assert_eq!(epoch, 0);
            assert_eq!(manager.init(Some((id, 0))).await, Ok((id, 1)));
            assert_eq!(manager.init(Some((id, 1))).await, Ok((id, 2)));
            assert_eq!(
                manager.init(Some((id, 1))).await,
                Err(InitError(code::PRODUCER_FENCED))
            );
            // An id it never issued gets a fresh one.
            let (other, epoch) = manager.init(Some((777_777, 3))).await.unwrap();
            assert_ne!(other, id);
            assert_eq!(epoch, 0);
            // At the last usable epoch the id rotates.
            manager.state.borrow_mut().issued.insert(
                id,
                Issued {
                    epoch: i16::MAX - 1,
                    issued_ms: 0,
                },
            );
            let (rotated, epoch) = manager.init(Some((id, i16::MAX - 1))).await.unwrap();
            assert_ne!(rotated, id);
            assert_eq!(epoch, 0);
            // Expired producers are forgotten: a re-init then gets a new id.
            manager.expire(i64::MAX, 1);
            assert_ne!(manager.init(Some((rotated, 0))).await.unwrap().0, rotated);
        });
    }

    #[test]
    fn a_malformed_block_file_stops_startup() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(BLOCK_FILE), "garbage").unwrap();
        let error = ProducerIdManager::open(dir.path()).err().unwrap();
        assert!(error.to_string().contains(BLOCK_FILE), "{error}");
    }
}
