//! Consumer groups with librdkafka: queue semantics inside a group, publish-subscribe across groups,
//! rebalances on join, leave and session expiry, committed offsets across consumer and broker
//! restarts, auto.offset.reset, and static membership.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message;

use support::Broker;
use support::kafka::{create_topic, produce_all, producer, records};

const GROUP_OVERRIDES: &[&str] = &[
    "group.initial.rebalance.delay.ms=0",
    "group.min.session.timeout.ms=1000",
];

/// Counts rebalance events and remembers the current assignment.
#[derive(Clone, Default)]
struct Tracker {
    rebalances: Arc<AtomicUsize>,
    assigned: Arc<Mutex<BTreeSet<i32>>>,
}

impl ClientContext for Tracker {}

impl ConsumerContext for Tracker {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.rebalances.fetch_add(1, Ordering::SeqCst);
        let mut assigned = self.assigned.lock().unwrap();
        match rebalance {
            Rebalance::Assign(list) => {
                *assigned = list.elements().iter().map(|e| e.partition()).collect();
            }
            Rebalance::Revoke(_) => assigned.clear(),
            Rebalance::Error(_) => {}
        }
    }
}

/// A record as one group member saw it.
#[derive(Clone, Debug)]
struct Seen {
    member: usize,
    partition: i32,
    value: Vec<u8>,
}

/// A group member polling on its own thread until stopped.
struct Member {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    tracker: Tracker,
}

impl Member {
    fn start(
        bootstrap: &str,
        group: &str,
        topic: &str,
        id: usize,
        seen: Arc<Mutex<Vec<Seen>>>,
        extra: &[(&str, &str)],
    ) -> Member {
        let tracker = Tracker::default();
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("session.timeout.ms", "6000")
            .set("heartbeat.interval.ms", "500")
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "200")
            .set("fetch.wait.max.ms", "100");
        for (key, value) in extra {
            config.set(*key, *value);
        }
        let consumer: BaseConsumer<Tracker> = config
            .create_with_context(tracker.clone())
            .expect("consumer");
        consumer.subscribe(&[topic]).expect("subscribe");
        let stop = Arc::new(AtomicBool::new(false));
        let stop_flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop_flag.load(Ordering::SeqCst) && Instant::now() < deadline {
                match consumer.poll(Duration::from_millis(50)) {
                    Some(Ok(message)) => seen.lock().unwrap().push(Seen {
                        member: id,
                        partition: message.partition(),
                        value: message.payload().unwrap_or_default().to_vec(),
                    }),
                    Some(Err(error)) => eprintln!("member {id}: {error}"),
                    None => {}
                }
            }
            let _ = consumer.commit_consumer_state(CommitMode::Sync);
            // Dropping the consumer closes it: it leaves the group (unless static).
        });
        Member {
            stop,
            handle: Some(handle),
            tracker,
        }
    }

    fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            handle.join().unwrap();
        }
    }

    fn assigned(&self) -> BTreeSet<i32> {
        self.tracker.assigned.lock().unwrap().clone()
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

fn distinct_values(seen: &[Seen]) -> BTreeSet<Vec<u8>> {
    seen.iter().map(|s| s.value.clone()).collect()
}

/// Three members share six partitions: each record is consumed once in total, and no partition is
/// read by two members. A second group independently receives every record too.
#[test]
fn a_group_shares_partitions_and_two_groups_each_see_everything() {
    let broker = Broker::start(2, GROUP_OVERRIDES);
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap, "shared", 6, &[]);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let members: Vec<Member> = (0..3)
        .map(|i| Member::start(&bootstrap, "queue", "shared", i, seen.clone(), &[]))
        .collect();
    wait_until(
        "three members with two partitions each",
        Duration::from_secs(30),
        || members.iter().all(|m| m.assigned().len() == 2),
    );
    let all: BTreeSet<i32> = members.iter().flat_map(|m| m.assigned()).collect();
    assert_eq!(all, (0..6).collect(), "every partition is assigned once");

    let other_seen = Arc::new(Mutex::new(Vec::new()));
    let other = Member::start(&bootstrap, "pubsub", "shared", 9, other_seen.clone(), &[]);

    let sent = records(600, "shared");
    produce_all(
        &producer(&bootstrap, &[("acks", "all")]),
        "shared",
        None,
        &sent,
    );
    wait_until(
        "the group to consume every record",
        Duration::from_secs(30),
        || seen.lock().unwrap().len() >= 600,
    );
    wait_until(
        "the second group to consume every record",
        Duration::from_secs(30),
        || other_seen.lock().unwrap().len() >= 600,
    );
    std::thread::sleep(Duration::from_millis(500));
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 600, "exactly once in total inside the group");
    assert_eq!(distinct_values(&seen).len(), 600);
    let mut readers: BTreeMap<i32, BTreeSet<usize>> = BTreeMap::new();
    for s in &seen {
        readers.entry(s.partition).or_default().insert(s.member);
    }
    assert!(
        readers.values().all(|r| r.len() == 1),
        "one member per partition: {readers:?}"
    );
    assert_eq!(
        distinct_values(&other_seen.lock().unwrap()).len(),
        600,
        "publish-subscribe across groups"
    );
    other.stop();
    for member in members {
        member.stop();
    }
}

/// Members joining and leaving trigger rebalances; consumption continues with no record lost.
#[test]
fn join_and_leave_rebalance_without_losing_records() {
    let broker = Broker::start(2, GROUP_OVERRIDES);
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap, "churn", 4, &[]);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let producer = producer(&bootstrap, &[("acks", "all")]);
    let first = Member::start(&bootstrap, "churners", "churn", 0, seen.clone(), &[]);
    wait_until(
        "first member owns all partitions",
        Duration::from_secs(30),
        || first.assigned().len() == 4,
    );
    produce_all(&producer, "churn", None, &records(200, "phase1"));
    let second = Member::start(&bootstrap, "churners", "churn", 1, seen.clone(), &[]);
    wait_until(
        "the partitions to be split",
        Duration::from_secs(30),
        || first.assigned().len() == 2 && second.assigned().len() == 2,
    );
    produce_all(&producer, "churn", None, &records(200, "phase2"));
    second.stop();
    wait_until(
        "the first member to own everything again",
        Duration::from_secs(30),
        || first.assigned().len() == 4,
    );
    produce_all(&producer, "churn", None, &records(200, "phase3"));
    wait_until("all 600 records", Duration::from_secs(30), || {
        distinct_values(&seen.lock().unwrap()).len() >= 600
    });
    assert_eq!(
        distinct_values(&seen.lock().unwrap()).len(),
        600,
        "no gap, no loss"
    );
    first.stop();
}

/// A member killed without leaving is expelled after its session timeout and its partitions move.
/// The victim is kcat (librdkafka) in a child process, killed with SIGKILL.
#[test]
fn a_killed_member_is_expelled_after_its_session_timeout() {
    let Ok(kcat) = which_kcat() else {
        panic!("kcat is required (scripts/install-test-deps installs it)");
    };
    let broker = Broker::start(1, GROUP_OVERRIDES);
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap, "expel", 2, &[]);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let survivor = Member::start(&bootstrap, "expellers", "expel", 0, seen.clone(), &[]);
    wait_until(
        "the survivor owns both partitions",
        Duration::from_secs(30),
        || survivor.assigned().len() == 2,
    );
    let mut victim = Command::new(kcat)
        .args([
            "-b",
            &bootstrap,
            "-G",
            "expellers",
            "-X",
            "session.timeout.ms=3000",
            "-q",
            "expel",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start kcat");
    wait_until(
        "the victim to take a partition",
        Duration::from_secs(30),
        || survivor.assigned().len() == 1,
    );
    let killed_at = Instant::now();
    victim.kill().unwrap();
    victim.wait().unwrap();
    wait_until(
        "the survivor to get both partitions back",
        Duration::from_secs(30),
        || survivor.assigned().len() == 2,
    );
    let took = killed_at.elapsed();
    assert!(
        took >= Duration::from_millis(2500),
        "not before the 3 s session timeout ({took:?})"
    );
    survivor.stop();
}

fn which_kcat() -> Result<String, ()> {
    for candidate in ["kcat", "kafkacat"] {
        if Command::new(candidate)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
        {
            return Ok(candidate.to_string());
        }
    }
    Err(())
}

/// A restarted consumer resumes from its committed offset, and committed offsets survive a clean
/// broker restart and a SIGKILL of the broker.
#[test]
fn committed_offsets_survive_consumer_and_broker_restarts() {
    let temp = tempfile::tempdir().unwrap();
    let data_dir = temp.path().join("data");
    let mut broker = Broker::start_on(&data_dir, 2, GROUP_OVERRIDES);
    create_topic(&broker.bootstrap(), "resume", 3, &[]);
    produce_all(
        &producer(&broker.bootstrap(), &[("acks", "all")]),
        "resume",
        None,
        &records(300, "a"),
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let member = Member::start(
        &broker.bootstrap(),
        "resumers",
        "resume",
        0,
        seen.clone(),
        &[],
    );
    wait_until("300 records", Duration::from_secs(30), || {
        seen.lock().unwrap().len() >= 300
    });
    member.stop();

    for restart in ["clean", "kill"] {
        if restart == "clean" {
            assert_eq!(broker.stop(), Some(0));
        } else {
            broker.kill();
        }
        broker = Broker::start_on(&data_dir, 2, GROUP_OVERRIDES);
        produce_all(
            &producer(&broker.bootstrap(), &[("acks", "all")]),
            "resume",
            None,
            &records(100, restart),
        );
        let after = Arc::new(Mutex::new(Vec::new()));
        let member = Member::start(
            &broker.bootstrap(),
            "resumers",
            "resume",
            1,
            after.clone(),
            &[],
        );
        wait_until("the new records", Duration::from_secs(30), || {
            after.lock().unwrap().len() >= 100
        });
        std::thread::sleep(Duration::from_millis(1000));
        member.stop();
        let after = after.lock().unwrap().clone();
        assert_eq!(
            after.len(),
            100,
            "after a {restart} restart only new records are read: {:?}",
            &after[..3.min(after.len())]
        );
        assert!(
            after
                .iter()
                .all(|s| s.value.starts_with(restart.as_bytes()))
        );
    }
}

/// With no committed offset, auto.offset.reset=latest skips existing records and earliest reads them.
#[test]
fn auto_offset_reset_earliest_and_latest() {
    let broker = Broker::start(1, GROUP_OVERRIDES);
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap, "reset", 1, &[]);
    let producer = producer(&bootstrap, &[("acks", "all")]);
    produce_all(&producer, "reset", None, &records(50, "old"));
    let latest_seen = Arc::new(Mutex::new(Vec::new()));
    let latest = Member::start(
        &bootstrap,
        "latest-group",
        "reset",
        0,
        latest_seen.clone(),
        &[("auto.offset.reset", "latest")],
    );
    let earliest_seen = Arc::new(Mutex::new(Vec::new()));
    let earliest = Member::start(
        &bootstrap,
        "earliest-group",
        "reset",
        1,
        earliest_seen.clone(),
        &[],
    );
    wait_until("assignments", Duration::from_secs(30), || {
        latest.assigned().len() == 1 && earliest.assigned().len() == 1
    });
    std::thread::sleep(Duration::from_millis(1000));
    produce_all(&producer, "reset", None, &records(10, "new"));
    wait_until(
        "earliest to read everything",
        Duration::from_secs(30),
        || earliest_seen.lock().unwrap().len() >= 60,
    );
    wait_until(
        "latest to read the new records",
        Duration::from_secs(30),
        || latest_seen.lock().unwrap().len() >= 10,
    );
    std::thread::sleep(Duration::from_millis(300));
    let latest_values = latest_seen.lock().unwrap().clone();
    assert_eq!(latest_values.len(), 10);
    assert!(latest_values.iter().all(|s| s.value.starts_with(b"new")));
    latest.stop();
    earliest.stop();
}

/// A static member (group.instance.id) that restarts within its session timeout gets its partitions
/// back without a rebalance: the other member sees no revocation. Both roles are restarted, the
/// group leader first (the first member to join leads), then the follower.
#[test]
fn static_members_rejoin_without_a_rebalance() {
    let broker = Broker::start(1, GROUP_OVERRIDES);
    let bootstrap = broker.bootstrap();
    create_topic(&bootstrap, "static", 4, &[]);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let start = |id: usize, instance: &'static str| {
        Member::start(
            &bootstrap,
            "statics",
            "static",
            id,
            seen.clone(),
            &[("group.instance.id", instance)],
        )
    };
    let leader = start(0, "leader");
    wait_until(
        "the leader to own everything",
        Duration::from_secs(30),
        || leader.assigned().len() == 4,
    );
    let follower = start(1, "follower");
    wait_until("a 2/2 split", Duration::from_secs(30), || {
        leader.assigned().len() == 2 && follower.assigned().len() == 2
    });
    std::thread::sleep(Duration::from_millis(1000));

    // Restart the leader: the follower keeps its partitions and sees no rebalance.
    let follower_rebalances = follower.tracker.rebalances.load(Ordering::SeqCst);
    let leader_partitions = leader.assigned();
    leader.stop();
    let leader = start(2, "leader");
    wait_until("the leader to come back", Duration::from_secs(30), || {
        leader.assigned().len() == 2
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        leader.assigned(),
        leader_partitions,
        "the leader gets the same partitions after its restart"
    );
    assert_eq!(
        follower.tracker.rebalances.load(Ordering::SeqCst),
        follower_rebalances,
        "the follower saw no rebalance when the leader restarted"
    );

    // Restart the follower: the (restarted) leader sees no rebalance.
    let leader_rebalances = leader.tracker.rebalances.load(Ordering::SeqCst);
    let follower_partitions = follower.assigned();
    follower.stop();
    let follower = start(3, "follower");
    wait_until("the follower to come back", Duration::from_secs(30), || {
        follower.assigned().len() == 2
    });
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        follower.assigned(),
        follower_partitions,
        "the follower gets the same partitions after its restart"
    );
    assert_eq!(
        leader.tracker.rebalances.load(Ordering::SeqCst),
        leader_rebalances,
        "the leader saw no rebalance when the follower restarted"
    );
    leader.stop();
    follower.stop();
}
