//! Unit tests of the job queue's rules against a real redb file.

use uuid::Uuid;

use super::*;
use crate::store::Store;

const RETAIN: i64 = 3_600_000;

fn new_job(owner: u64, run_at_ms: i64) -> NewJob {
    NewJob {
        id: Uuid::now_v7(),
        kind: if owner == 0 {
            JobKind::Noop
        } else {
            JobKind::Plugin {
                config: owner,
                name: "j".into(),
            }
        },
        payload: "{}".into(),
        run_at_ms,
        max_attempts: 3,
        timeout_ms: 0,
        idempotency_key: None,
        after: Vec::new(),
    }
}

fn claim_all(store: &Store, now: i64) -> Vec<Job> {
    store
        .finish_and_claim(Vec::new(), now, RETAIN, 1000, &|_| usize::MAX)
        .unwrap()
        .jobs
}

fn finish(store: &Store, id: JobId, outcome: Outcome, now: i64) {
    store
        .finish_and_claim(vec![(id, outcome)], now, RETAIN, 0, &|_| 0)
        .unwrap();
}

#[test]
fn a_failing_job_retries_at_its_time_then_becomes_a_dead_letter_and_can_be_requeued() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let id = store
        .enqueue_jobs(vec![new_job(7, 1000)], 1000, RETAIN)
        .unwrap()[0];
    assert!(claim_all(&store, 999).is_empty(), "not due yet");
    for attempt in 1..=3 {
        let now = 1000 * attempt;
        let claimed = claim_all(&store, now);
        assert_eq!(claimed.len(), 1, "attempt {attempt}");
        assert_eq!(store.job(id).unwrap().unwrap().state, JobState::Running);
        let outcome = Outcome::Retry {
            error: format!("boom {attempt}"),
            retry_at_ms: now + 1000,
        };
        finish(&store, id, outcome, now);
        assert!(claim_all(&store, now + 999).is_empty(), "backoff respected");
    }
    let dead = store.job(id).unwrap().unwrap();
    assert_eq!(dead.state, JobState::Dead);
    assert_eq!(dead.attempts, 3);
    let errors: Vec<_> = dead.history.iter().map(|a| a.error.as_str()).collect();
    assert_eq!(errors, ["boom 1", "boom 2", "boom 3"]);
    assert!(
        claim_all(&store, 10_000).is_empty(),
        "dead letters do not run"
    );
    assert_eq!(store.list_jobs(Some(JobState::Dead), 10).unwrap().len(), 1);

    store.requeue_job(id, 20_000).unwrap();
    assert_eq!(claim_all(&store, 20_000).len(), 1);
    finish(
        &store,
        id,
        Outcome::Succeeded {
            follow_ups: vec![],
            export: None,
        },
        20_000,
    );
    assert!(
        store.job(id).unwrap().is_none(),
        "succeeded jobs are removed"
    );
}

#[test]
fn an_idempotency_key_deduplicates_within_its_retention() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let keyed = |key: &str| NewJob {
        idempotency_key: Some(key.into()),
        ..new_job(1, 0)
    };
    let first = store.enqueue_jobs(vec![keyed("k")], 0, RETAIN).unwrap()[0];
    let again = store
        .enqueue_jobs(vec![keyed("k"), keyed("other")], 10, RETAIN)
        .unwrap();
    assert_eq!(again[0], first);
    assert_ne!(again[1], first);
    // Even after the job succeeded and is gone, the key still answers.
    let claimed = claim_all(&store, 10);
    assert_eq!(claimed.len(), 2);
    finish(
        &store,
        first,
        Outcome::Succeeded {
            follow_ups: vec![],
            export: None,
        },
        20,
    );
    assert_eq!(
        store.enqueue_jobs(vec![keyed("k")], 30, RETAIN).unwrap()[0],
        first
    );
    // Past the retention window the key is free again.
    let later = store
        .enqueue_jobs(vec![keyed("k")], RETAIN + 1, RETAIN)
        .unwrap()[0];
    assert_ne!(later, first);
    assert_eq!(
        store.purge_job_keys(RETAIN).unwrap(),
        1,
        "only 'other' was older"
    );
}

#[test]
fn a_join_runs_only_when_all_its_parents_succeeded_and_follow_ups_commit_with_success() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (a, b) = (new_job(1, 0), new_job(1, 0));
    let join = NewJob {
        after: vec![a.id, b.id],
        ..new_job(1, 0)
    };
    let join_id = join.id;
    store
        .enqueue_jobs(vec![a.clone(), b.clone(), join], 0, RETAIN)
        .unwrap();
    assert_eq!(
        store.job(join_id).unwrap().unwrap().state,
        JobState::Waiting
    );
    let claimed: Vec<JobId> = claim_all(&store, 0).iter().map(|j| j.id).collect();
    assert_eq!(claimed.len(), 2);
    assert!(!claimed.contains(&join_id));
    let follow_up = new_job(1, 0);
    let follow_up_id = follow_up.id;
    finish(
        &store,
        a.id,
        Outcome::Succeeded {
            follow_ups: vec![follow_up],
            export: None,
        },
        1,
    );
    let next: Vec<JobId> = claim_all(&store, 1).iter().map(|j| j.id).collect();
    assert_eq!(next, [follow_up_id], "the join still waits for b");
    finish(
        &store,
        b.id,
        Outcome::Succeeded {
            follow_ups: vec![],
            export: None,
        },
        2,
    );
    let next: Vec<JobId> = claim_all(&store, 2).iter().map(|j| j.id).collect();
    assert_eq!(next, [join_id]);

    // A failed attempt enqueues none of its follow-ups.
    let failing = store.enqueue_jobs(vec![new_job(1, 3)], 3, RETAIN).unwrap()[0];
    claim_all(&store, 3);
    finish(&store, failing, Outcome::Failed { error: "no".into() }, 3);
    assert!(claim_all(&store, 100).is_empty());
}

#[test]
fn one_owner_cannot_take_every_claim() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let mut jobs: Vec<NewJob> = (0..50).map(|i| new_job(5, i)).collect();
    jobs.push(new_job(6, 100));
    jobs.push(new_job(0, 200));
    store.enqueue_jobs(jobs, 0, RETAIN).unwrap();
    let room = |owner: u64| if owner == 0 { usize::MAX } else { 2 };
    let claimed = store
        .finish_and_claim(Vec::new(), 1000, RETAIN, 100, &room)
        .unwrap();
    let owners: Vec<u64> = claimed.jobs.iter().map(|j| j.kind.owner()).collect();
    assert_eq!(owners.iter().filter(|o| **o == 5).count(), 2);
    assert!(owners.contains(&6) && owners.contains(&0));
    assert_eq!(claimed.next_due_ms, Some(2), "owner 5's next job");
}

#[test]
fn claims_left_by_a_dead_server_run_again_without_counting_an_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = Store::open(dir.path()).unwrap();
    let id = store
        .enqueue_jobs(
            vec![NewJob {
                max_attempts: 1,
                ..new_job(1, 0)
            }],
            0,
            RETAIN,
        )
        .unwrap()[0];
    assert_eq!(store.live_jobs_of(1).unwrap(), 1);
    for stop in 1..=tables::MAX_INTERRUPTIONS as i64 {
        assert_eq!(claim_all(&store, stop * 10).len(), 1, "stop {stop}");
        drop(store);
        store = Store::open(dir.path()).unwrap();
        assert!(claim_all(&store, stop * 10 + 1).is_empty(), "still leased");
        assert_eq!(
            store.recover_leases(stop * 10 + 2, stop * 10 + 2).unwrap(),
            1
        );
        let job = store.job(id).unwrap().unwrap();
        assert_eq!(job.attempts, 0, "a server stop is not the job's failure");
        if stop < tables::MAX_INTERRUPTIONS as i64 {
            assert_eq!(job.state, JobState::Retrying);
        } else {
            assert_eq!(
                job.state,
                JobState::Dead,
                "a job that keeps being interrupted is set aside"
            );
            assert_eq!(store.live_jobs_of(1).unwrap(), 0);
        }
    }
}

#[test]
fn dead_and_cancelled_jobs_are_purged_after_their_retention() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let ids = store
        .enqueue_jobs(vec![new_job(1, 0), new_job(1, 5000)], 0, RETAIN)
        .unwrap();
    let claimed = claim_all(&store, 0);
    finish(
        &store,
        claimed[0].id,
        Outcome::Failed { error: "no".into() },
        100,
    );
    store.control_job(ids[1], Control::Cancel, 200).unwrap();
    assert_eq!(store.live_jobs_of(1).unwrap(), 0);
    assert_eq!(
        store.purge_final_jobs(150).unwrap(),
        1,
        "the dead letter of 100"
    );
    assert!(store.job(ids[0]).unwrap().is_none());
    assert!(store.job(ids[1]).unwrap().is_some());
    store.requeue_job(ids[1], 300).unwrap();
    assert_eq!(store.live_jobs_of(1).unwrap(), 1);
    assert_eq!(
        store.purge_final_jobs(1000).unwrap(),
        0,
        "a re-queued job is live again"
    );
}

#[test]
fn cancelling_a_queued_job_cancels_its_dependents_and_a_running_one_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let parent = new_job(1, 1000);
    let child = NewJob {
        after: vec![parent.id],
        ..new_job(1, 0)
    };
    let (parent_id, child_id) = (parent.id, child.id);
    let running = store
        .enqueue_jobs(vec![parent, child, new_job(2, 0)], 0, RETAIN)
        .unwrap()[2];
    assert_eq!(claim_all(&store, 0).len(), 1);
    assert_eq!(
        store.control_job(parent_id, Control::Cancel, 1).unwrap(),
        JobState::Cancelled
    );
    assert_eq!(
        store.job(child_id).unwrap().unwrap().state,
        JobState::Cancelled
    );
    assert!(claim_all(&store, 5000).is_empty());
    assert_eq!(
        store.control_job(running, Control::Terminate, 2).unwrap(),
        JobState::Running
    );
    assert_eq!(
        store.job_controls().unwrap(),
        [(running, Control::Terminate)]
    );
    finish(
        &store,
        running,
        Outcome::Cancelled {
            reason: "terminated".into(),
        },
        3,
    );
    assert!(store.job_controls().unwrap().is_empty());
    assert!(store.control_job(running, Control::Cancel, 4).is_err());
}
