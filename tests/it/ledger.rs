//! The ledger conformance suite: every test runs against the Redis ledger and the in-process
//! ledger, which must agree on every figure.

use std::collections::BTreeMap;

use adapters::{Micros, Protocol};
use spendcap::identity::{AgentId, AgentToken, HoldId, TokenHash, TreeId};
use spendcap::ledger::LogEntry;
use spendcap::ledger::{
    Caller, HoldExpiry, HoldOutcome, HoldRequest, Idempotency, IdempotencyFinish, IdempotencyMode, Ledger, LedgerError,
    NewAgent, RefusalReason,
};
use spendcap::log::replay;

use crate::support::{ledger, Backend};

const T0: u64 = 1_800_000_000_000;

/// Defines one test per backend.
macro_rules! conformance {
    ($name:ident, $body:expr) => {
        mod $name {
            use super::*;
            #[test]
            fn memory() {
                run(Backend::Memory, $body);
            }
            #[test]
            fn redis() {
                run(Backend::Redis, $body);
            }
        }
    };
}

fn run<F, Fut>(backend: Backend, body: F)
where
    F: FnOnce(Ledger) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    runtime.block_on(async {
        let (ledger, _redis) = ledger(backend).await;
        body(ledger).await;
    });
}

struct TestAgent {
    id: AgentId,
    token: AgentToken,
}

impl TestAgent {
    fn caller(&self) -> Caller {
        Caller::Agent(self.token.hash())
    }
}

async fn create(ledger: &Ledger, handle: &str, cap: u64, parent: Option<&TestAgent>) -> TestAgent {
    let tree = parent.map(|p| p.id.tree().clone()).unwrap_or_else(TreeId::generate);
    let id = AgentId::generate(&tree);
    let token = AgentToken::generate(&id);
    let new = NewAgent {
        id: id.clone(),
        handle: format!("{handle}-{}", &tree.as_str()[..6]),
        parent: parent.map(|p| p.id.clone()),
        cap: Micros::new(cap).expect("cap"),
        expires_at_ms: None,
        labels: BTreeMap::new(),
        token_hash: token.hash(),
    };
    ledger.create_agent(T0, &new).await.expect("creates");
    TestAgent { id, token }
}

fn request(agent: &TestAgent, amount: u64, ttl_ms: u64, now: u64) -> HoldRequest {
    HoldRequest {
        agent: agent.id.clone(),
        caller: agent.caller(),
        hold_id: HoldId::generate(agent.id.tree()),
        amount: Micros::positive(amount).expect("amount"),
        expires: HoldExpiry::At(now + ttl_ms),
        task: "task-1".into(),
        service: "api.example.com".into(),
        protocol: Protocol::Generic,
        idempotency: None,
        details: String::new(),
        buckets: Vec::new(),
    }
}

async fn hold(ledger: &Ledger, agent: &TestAgent, amount: u64) -> HoldOutcome {
    ledger.hold(T0, &request(agent, amount, 60_000, T0)).await.expect("ledger answers")
}

fn granted(outcome: HoldOutcome) -> HoldId {
    match outcome {
        HoldOutcome::Granted(grant) => grant.hold_id,
        other => panic!("expected a grant, got {other:?}"),
    }
}

async fn figures(ledger: &Ledger, agent: &TestAgent, now: u64) -> (u64, u64, u64) {
    let b = ledger.balance(now, &agent.id, &Caller::Admin).await.expect("balance");
    (b.cap.get(), b.spent.get(), b.held.get())
}

async fn whole_log(ledger: &Ledger, tree: &TreeId) -> Vec<LogEntry> {
    ledger.read_log(tree, "0", 100_000).await.expect("log")
}

/// The log replays to exactly the stored balances of every agent of the tree.
async fn assert_replays(ledger: &Ledger, tree: &TreeId) {
    let replayed = replay(&whole_log(ledger, tree).await).expect("log replays");
    for agent in ledger.tree_agents(tree).await.expect("agents") {
        let r = replayed.agents.get(agent.id.as_str()).expect("agent in log");
        assert_eq!((r.cap, r.spent, r.held), (agent.cap.get(), agent.spent.get(), agent.held.get()), "{}", agent.id);
    }
}

conformance!(caps_refuse_exactly_at_the_boundary, |ledger: Ledger| async move {
    let agent = create(&ledger, "a", 1_000, None).await;
    granted(hold(&ledger, &agent, 999).await);
    match hold(&ledger, &agent, 2).await {
        HoldOutcome::Refused(r) => {
            assert_eq!(r.reason, RefusalReason::CapExceeded);
            assert_eq!(r.remaining.get(), 1);
            assert_eq!(r.requested.get(), 2);
        }
        other => panic!("expected refusal, got {other:?}"),
    }
    granted(hold(&ledger, &agent, 1).await);
    assert_eq!(figures(&ledger, &agent, T0).await, (1_000, 0, 1_000));
    let log = whole_log(&ledger, agent.id.tree()).await;
    let events: Vec<&str> = log.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(events, ["create", "hold", "refuse", "hold"]);
    assert_eq!(log[2].reason, "cap_exceeded");
    assert_eq!(log[2].remaining, Some(1));
    assert_replays(&ledger, agent.id.tree()).await;
});

conformance!(settle_spends_at_most_the_hold_and_releases_the_rest, |ledger: Ledger| async move {
    let agent = create(&ledger, "a", 1_000, None).await;
    let hold_id = granted(hold(&ledger, &agent, 600).await);
    let err = ledger.settle(T0, &agent.id, &agent.caller(), &hold_id, Micros::new(601).expect("m"), "").await;
    assert!(matches!(err, Err(LedgerError::AmountExceedsHold)), "{err:?}");
    let settled = ledger
        .settle(T0, &agent.id, &agent.caller(), &hold_id, Micros::new(450).expect("m"), "")
        .await
        .expect("settles");
    assert_eq!((settled.amount.get(), settled.released.get(), settled.replayed), (450, 150, false));
    assert_eq!(figures(&ledger, &agent, T0).await, (1_000, 450, 0));
    // The same settle again replays; another amount is a conflict; a void is too late.
    let again = ledger
        .settle(T0, &agent.id, &agent.caller(), &hold_id, Micros::new(450).expect("m"), "")
        .await
        .expect("replay");
    assert!(again.replayed);
    assert_eq!(again.seq, settled.seq);
    let other = ledger.settle(T0, &agent.id, &agent.caller(), &hold_id, Micros::new(400).expect("m"), "").await;
    assert!(matches!(other, Err(LedgerError::HoldSettled)), "{other:?}");
    let void = ledger.void(T0, &agent.id, &agent.caller(), &hold_id, "late").await;
    assert!(matches!(void, Err(LedgerError::HoldSettled)), "{void:?}");
    assert_eq!(figures(&ledger, &agent, T0).await, (1_000, 450, 0));
    let settles = whole_log(&ledger, agent.id.tree()).await.into_iter().filter(|e| e.event == "settle").count();
    assert_eq!(settles, 1, "a replayed settle writes no second log entry");
    assert_replays(&ledger, agent.id.tree()).await;
});

conformance!(void_releases_everything_once, |ledger: Ledger| async move {
    let agent = create(&ledger, "a", 1_000, None).await;
    let hold_id = granted(hold(&ledger, &agent, 700).await);
    let (released, replayed) =
        ledger.void(T0, &agent.id, &agent.caller(), &hold_id, "call_failed").await.expect("voids");
    assert_eq!((released.get(), replayed), (700, false));
    let (_, replayed) = ledger.void(T0, &agent.id, &agent.caller(), &hold_id, "call_failed").await.expect("replays");
    assert!(replayed);
    assert_eq!(figures(&ledger, &agent, T0).await, (1_000, 0, 0));
    let settle = ledger.settle(T0, &agent.id, &agent.caller(), &hold_id, Micros::new(1).expect("m"), "").await;
    assert!(matches!(settle, Err(LedgerError::HoldVoided)), "{settle:?}");
    let voids: Vec<LogEntry> =
        whole_log(&ledger, agent.id.tree()).await.into_iter().filter(|e| e.event == "void").collect();
    assert_eq!(voids.len(), 1);
    assert_eq!(voids[0].reason, "call_failed");
    assert_replays(&ledger, agent.id.tree()).await;
});

conformance!(holds_expire_without_any_sweeper, |ledger: Ledger| async move {
    let agent = create(&ledger, "a", 1_000, None).await;
    let short = ledger.hold(T0, &request(&agent, 800, 1_000, T0)).await.expect("answers");
    let short = granted(short);
    // Before expiry the money is held; one millisecond at the expiry it is back.
    assert_eq!(figures(&ledger, &agent, T0 + 999).await, (1_000, 0, 800));
    let later = T0 + 1_000;
    let refill = ledger.hold(later, &request(&agent, 900, 60_000, later)).await.expect("answers");
    granted(refill);
    let settle = ledger.settle(later, &agent.id, &agent.caller(), &short, Micros::new(1).expect("m"), "").await;
    assert!(matches!(settle, Err(LedgerError::HoldExpired)), "{settle:?}");
    let log = whole_log(&ledger, agent.id.tree()).await;
    let expiry = log.iter().find(|e| e.event == "expire").expect("expiry logged");
    assert_eq!((expiry.hold.as_str(), expiry.amount, expiry.ts_ms), (short.as_str(), Some(800), later));
    assert_replays(&ledger, agent.id.tree()).await;
});

conformance!(a_lifetime_is_measured_from_the_ledgers_clock, |ledger: Ledger| async move {
    let agent = create(&ledger, "a", 1_000, None).await;
    // `After`: the end is the ledger's now plus the lifetime, whatever time the caller would
    // have computed it from (here the ledger's clock is the caller's: a test-mode library).
    let mut asked = request(&agent, 300, 0, T0);
    asked.expires = HoldExpiry::After(2_000);
    let grant = match ledger.hold(T0 + 500, &asked).await.expect("answers") {
        HoldOutcome::Granted(grant) => grant,
        other => panic!("expected a grant, got {other:?}"),
    };
    assert_eq!(grant.expires_at_ms, T0 + 2_500);
    assert_eq!(figures(&ledger, &agent, T0 + 2_499).await, (1_000, 0, 300));
    assert_eq!(figures(&ledger, &agent, T0 + 2_500).await, (1_000, 0, 0));
    assert_replays(&ledger, agent.id.tree()).await;
});

conformance!(many_expired_holds_never_cause_a_false_refusal, |ledger: Ledger| async move {
    let agent = create(&ledger, "a", 100, None).await;
    for _ in 0..100 {
        granted(ledger.hold(T0, &request(&agent, 1, 10, T0)).await.expect("answers"));
    }
    let later = T0 + 10;
    // 100 expired holds, more than one expiry batch: the full cap must still be available.
    granted(ledger.hold(later, &request(&agent, 100, 60_000, later)).await.expect("answers"));
    assert_eq!(figures(&ledger, &agent, later).await, (100, 0, 100));
    assert_replays(&ledger, agent.id.tree()).await;
});

conformance!(budget_trees_charge_every_ancestor, |ledger: Ledger| async move {
    let root = create(&ledger, "root", 100, None).await;
    let a = create(&ledger, "a", 80, Some(&root)).await;
    let b = create(&ledger, "b", 80, Some(&root)).await;
    let grandchild = create(&ledger, "a1", 1_000, Some(&a)).await;
    granted(hold(&ledger, &grandchild, 50).await);
    granted(hold(&ledger, &b, 40).await);
    match hold(&ledger, &a, 20).await {
        HoldOutcome::Refused(r) => {
            assert_eq!(r.reason, RefusalReason::CapExceeded);
            assert_eq!(r.limited_by, root.id.to_string(), "the root has only 10 left");
            assert_eq!(r.remaining.get(), 10);
        }
        other => panic!("expected refusal, got {other:?}"),
    }
    assert_eq!(figures(&ledger, &root, T0).await, (100, 0, 90));
    assert_eq!(figures(&ledger, &a, T0).await, (80, 0, 50));
    assert_eq!(figures(&ledger, &grandchild, T0).await, (1_000, 0, 50));
    assert_replays(&ledger, root.id.tree()).await;
});

conformance!(trees_are_bounded_in_depth, |ledger: Ledger| async move {
    let mut chain = vec![create(&ledger, "l1", 10, None).await];
    for level in 2..=8 {
        let parent = chain.last().expect("parent");
        let child = create(&ledger, &format!("l{level}"), 10, Some(parent)).await;
        chain.push(child);
    }
    let parent = chain.last().expect("deepest");
    let id = AgentId::generate(parent.id.tree());
    let new = NewAgent {
        id: id.clone(),
        handle: format!("too-deep-{}", id.as_str()),
        parent: Some(parent.id.clone()),
        cap: Micros::new(10).expect("cap"),
        expires_at_ms: None,
        labels: BTreeMap::new(),
        token_hash: TokenHash::of("x"),
    };
    assert!(matches!(ledger.create_agent(T0, &new).await, Err(LedgerError::TreeTooDeep)));
    // The failed creation gave its handle back.
    let new = NewAgent { parent: Some(chain[0].id.clone()), ..new };
    ledger.create_agent(T0, &new).await.expect("the handle is free again");
});

conformance!(revocation_cascades_and_settles_still_work, |ledger: Ledger| async move {
    let root = create(&ledger, "root", 1_000, None).await;
    let child = create(&ledger, "child", 1_000, Some(&root)).await;
    let open = granted(hold(&ledger, &child, 100).await);
    let (_, already) = ledger.revoke(T0 + 5, &root.id, "runaway_loop").await.expect("revokes");
    assert!(!already);
    for agent in [&root, &child] {
        match hold(&ledger, agent, 1).await {
            HoldOutcome::Refused(r) => {
                assert_eq!(r.reason, RefusalReason::AgentRevoked);
                assert_eq!(r.limited_by, root.id.to_string());
            }
            other => panic!("expected refusal, got {other:?}"),
        }
    }
    // Money already committed can still be settled: nothing else stops working.
    ledger.settle(T0, &child.id, &child.caller(), &open, Micros::new(100).expect("m"), "").await.expect("settles");
    let (at, already) = ledger.revoke(T0 + 9, &root.id, "again").await.expect("idempotent");
    assert_eq!((at, already), (T0 + 5, true));
    let bad = ledger.revoke(T0, &root.id, "no spaces allowed").await;
    assert!(matches!(bad, Err(LedgerError::InvalidArgument(_))), "{bad:?}");
    let log = whole_log(&ledger, root.id.tree()).await;
    let revokes: Vec<&LogEntry> = log.iter().filter(|e| e.event == "revoke").collect();
    assert_eq!(revokes.len(), 1);
    assert_eq!((revokes[0].reason.as_str(), revokes[0].ts_ms), ("runaway_loop", T0 + 5));
    assert_replays(&ledger, root.id.tree()).await;
});

conformance!(expired_agents_are_refused, |ledger: Ledger| async move {
    let tree = TreeId::generate();
    let id = AgentId::generate(&tree);
    let token = AgentToken::generate(&id);
    let new = NewAgent {
        id: id.clone(),
        handle: format!("ttl-{tree}"),
        parent: None,
        cap: Micros::new(1_000).expect("cap"),
        expires_at_ms: Some(T0 + 1_000),
        labels: BTreeMap::new(),
        token_hash: token.hash(),
    };
    ledger.create_agent(T0, &new).await.expect("creates");
    let agent = TestAgent { id, token };
    granted(ledger.hold(T0 + 999, &request(&agent, 1, 10, T0 + 999)).await.expect("answers"));
    match ledger.hold(T0 + 1_000, &request(&agent, 1, 10, T0 + 1_000)).await.expect("answers") {
        HoldOutcome::Refused(r) => assert_eq!(r.reason, RefusalReason::AgentExpired),
        other => panic!("expected refusal, got {other:?}"),
    }
});

conformance!(idempotency_has_stripe_semantics, |ledger: Ledger| async move {
    let agent = create(&ledger, "a", 1_000, None).await;
    let keyed = |fingerprint: &str, mode| {
        let mut r = request(&agent, 300, 60_000, T0);
        r.idempotency = Some(Idempotency { key: "key-1".into(), fingerprint: fingerprint.into(), mode });
        r
    };
    let first = granted(ledger.hold(T0, &keyed("fp-a", IdempotencyMode::Final)).await.expect("answers"));
    match ledger.hold(T0, &keyed("fp-a", IdempotencyMode::Final)).await.expect("answers") {
        HoldOutcome::Granted(g) => {
            assert_eq!(g.hold_id, first);
            assert!(g.replayed);
        }
        other => panic!("expected the first grant, got {other:?}"),
    }
    assert_eq!(figures(&ledger, &agent, T0).await, (1_000, 0, 300), "debited once");
    let conflict = ledger.hold(T0, &keyed("fp-b", IdempotencyMode::Final)).await;
    assert!(matches!(conflict, Err(LedgerError::IdempotencyConflict)), "{conflict:?}");

    // Pending operations: a duplicate waits (in flight) until the first finishes.
    let pending_mode = IdempotencyMode::Pending { lease_ms: 5_000 };
    let mut pending = request(&agent, 100, 60_000, T0);
    pending.idempotency = Some(Idempotency { key: "key-2".into(), fingerprint: "fp".into(), mode: pending_mode });
    let pending_hold = granted(ledger.hold(T0, &pending).await.expect("answers"));
    let mut duplicate = pending.clone();
    duplicate.hold_id = HoldId::generate(agent.id.tree());
    assert!(matches!(ledger.hold(T0, &duplicate).await, Err(LedgerError::IdempotencyInFlight)));
    // After the lease runs out (the first caller died), a duplicate takes over the same hold.
    match ledger.hold(T0 + 5_000, &duplicate).await.expect("answers") {
        HoldOutcome::Granted(g) => assert_eq!((g.hold_id, g.replayed), (pending_hold.clone(), true)),
        other => panic!("expected the same hold, got {other:?}"),
    }
    assert!(matches!(ledger.hold(T0 + 5_001, &duplicate).await, Err(LedgerError::IdempotencyInFlight)));
    // Released (outcome unknown): a retry gets the hold back at once.
    ledger.finish_idempotent(&agent.id, "key-2", &IdempotencyFinish::Release).await.expect("releases");
    match ledger.hold(T0 + 5_002, &duplicate).await.expect("answers") {
        HoldOutcome::Granted(g) => assert_eq!(g.hold_id, pending_hold),
        other => panic!("expected the same hold, got {other:?}"),
    }
    let done = IdempotencyFinish::Done(r#"{"status":200}"#.into());
    ledger.finish_idempotent(&agent.id, "key-2", &done).await.expect("finishes");
    match ledger.hold(T0, &duplicate).await.expect("answers") {
        HoldOutcome::Finished { response } => assert_eq!(response, r#"{"status":200}"#),
        other => panic!("expected the stored response, got {other:?}"),
    }
    let info = ledger.hold_info(&agent.id, &pending_hold).await.expect("hold info");
    assert_eq!((info.amount.get(), info.state.as_str(), info.service.as_str()), (100, "open", "api.example.com"));
    assert_eq!(figures(&ledger, &agent, T0).await, (1_000, 0, 400));
    assert_eq!(whole_log(&ledger, agent.id.tree()).await.iter().filter(|e| e.event == "hold").count(), 2);
});

conformance!(tokens_are_checked_inside_the_ledger_and_rotate_at_once, |ledger: Ledger| async move {
    let agent = create(&ledger, "a", 1_000, None).await;
    let other = create(&ledger, "b", 1_000, None).await;
    let mut forged = request(&agent, 1, 60_000, T0);
    forged.caller = other.caller();
    assert!(matches!(ledger.hold(T0, &forged).await, Err(LedgerError::Unauthorized)));
    let rotated = AgentToken::generate(&agent.id);
    ledger.rotate_token(T0, &agent.id, &rotated.hash()).await.expect("rotates");
    assert!(matches!(ledger.hold(T0, &request(&agent, 1, 60_000, T0)).await, Err(LedgerError::Unauthorized)));
    let mut fresh = request(&agent, 1, 60_000, T0);
    fresh.caller = Caller::Agent(rotated.hash());
    granted(ledger.hold(T0, &fresh).await.expect("answers"));
    assert_eq!(figures(&ledger, &agent, T0).await, (1_000, 0, 1), "refused attempts changed nothing");
});

conformance!(caps_cannot_drop_below_what_is_committed, |ledger: Ledger| async move {
    let agent = create(&ledger, "a", 1_000, None).await;
    let h = granted(hold(&ledger, &agent, 400).await);
    ledger.settle(T0, &agent.id, &agent.caller(), &h, Micros::new(300).expect("m"), "").await.expect("settles");
    granted(hold(&ledger, &agent, 200).await);
    let low = ledger.set_cap(T0, &agent.id, Micros::new(499).expect("m")).await;
    assert!(matches!(low, Err(LedgerError::CapBelowCommitted { committed: 500 })), "{low:?}");
    let previous = ledger.set_cap(T0, &agent.id, Micros::new(500).expect("m")).await.expect("sets");
    assert_eq!(previous.get(), 1_000);
    assert_eq!(figures(&ledger, &agent, T0).await, (500, 300, 200));
    assert_replays(&ledger, agent.id.tree()).await;
});

conformance!(unknown_agents_and_holds_are_errors, |ledger: Ledger| async move {
    let agent = create(&ledger, "a", 1_000, None).await;
    let ghost = AgentId::generate(agent.id.tree());
    assert!(matches!(ledger.balance(T0, &ghost, &Caller::Admin).await, Err(LedgerError::UnknownAgent)));
    let mut r = request(&agent, 1, 1_000, T0);
    r.agent = ghost.clone();
    assert!(matches!(ledger.hold(T0, &r).await, Err(LedgerError::UnknownAgent)));
    let missing = HoldId::generate(agent.id.tree());
    let settle = ledger.settle(T0, &agent.id, &agent.caller(), &missing, Micros::new(1).expect("m"), "").await;
    assert!(matches!(settle, Err(LedgerError::UnknownHold)), "{settle:?}");
    // Another agent's hold is unknown to this one.
    let other = create(&ledger, "b", 1_000, Some(&agent)).await;
    let theirs = granted(hold(&ledger, &other, 5).await);
    let void = ledger.void(T0, &agent.id, &agent.caller(), &theirs, "x").await;
    assert!(matches!(void, Err(LedgerError::UnknownHold)), "{void:?}");
    assert!(matches!(ledger.set_cap(T0, &ghost, Micros::ZERO).await, Err(LedgerError::UnknownAgent)));
    assert!(matches!(ledger.revoke(T0, &ghost, "x").await, Err(LedgerError::UnknownAgent)));
});

conformance!(budget_buckets_are_charged_atomically_with_the_caps, |ledger: Ledger| async move {
    let root = create(&ledger, "root", 1_000_000, None).await;
    let a = create(&ledger, "a", 1_000_000, Some(&root)).await;
    let b = create(&ledger, "b", 1_000_000, Some(&root)).await;
    // A $100 budget owned by the root, charged by holds of both children.
    assert!(ledger
        .create_bucket(T0, &root.id, "mandate:m1", Micros::new(100).expect("m"), false, "open mandate", "")
        .await
        .expect("creates"));
    assert!(!ledger
        .create_bucket(T0, &root.id, "mandate:m1", Micros::new(100).expect("m"), false, "again", "")
        .await
        .expect("same terms"));
    let other_terms =
        ledger.create_bucket(T0, &root.id, "mandate:m1", Micros::new(99).expect("m"), false, "", "").await;
    assert!(matches!(other_terms, Err(LedgerError::BucketExists)), "{other_terms:?}");
    let with = |agent: &TestAgent, amount: u64, buckets: &[&str]| {
        let mut r = request(agent, amount, 60_000, T0);
        r.buckets = buckets.iter().map(|b| b.to_string()).collect();
        r
    };
    let first = granted(ledger.hold(T0, &with(&a, 60, &["mandate:m1"])).await.expect("answers"));
    match ledger.hold(T0, &with(&b, 60, &["mandate:m1"])).await.expect("answers") {
        HoldOutcome::Refused(r) => {
            assert_eq!(
                (r.reason, r.limited_by.as_str(), r.remaining.get()),
                (RefusalReason::BudgetExceeded, "mandate:m1", 40)
            );
        }
        other => panic!("expected a budget refusal, got {other:?}"),
    }
    granted(ledger.hold(T0, &with(&b, 40, &["mandate:m1"])).await.expect("answers"));
    ledger.settle(T0, &a.id, &a.caller(), &first, Micros::new(50).expect("m"), "").await.expect("settles");
    let bucket = ledger.bucket(root.id.tree(), "mandate:m1").await.expect("reads").expect("exists");
    assert_eq!((bucket.spent.get(), bucket.held.get(), bucket.open_holds), (50, 40, 1));
    granted(ledger.hold(T0, &with(&a, 10, &["mandate:m1"])).await.expect("answers"));
    // A bucket of another agent's subtree cannot be charged.
    assert!(ledger
        .create_bucket(T0, &b.id, "mandate:b-only", Micros::new(10).expect("m"), false, "", "")
        .await
        .expect("creates"));
    let foreign = ledger.hold(T0, &with(&a, 1, &["mandate:b-only"])).await;
    assert!(matches!(foreign, Err(LedgerError::UnknownBucket)), "{foreign:?}");

    // Exclusive: one outstanding hold at a time; expiry frees it with no sweeper.
    assert!(ledger
        .create_bucket(T0, &a.id, "mandate:x", Micros::new(1_000).expect("m"), true, "", "")
        .await
        .expect("creates"));
    let mut short = with(&a, 5, &["mandate:x"]);
    short.expires = HoldExpiry::At(T0 + 100);
    granted(ledger.hold(T0, &short).await.expect("answers"));
    match ledger.hold(T0 + 99, &with(&a, 5, &["mandate:x"])).await.expect("answers") {
        HoldOutcome::Refused(r) => assert_eq!(r.reason, RefusalReason::BudgetBusy),
        other => panic!("expected busy, got {other:?}"),
    }
    let mut later = with(&a, 5, &["mandate:x"]);
    later.expires = HoldExpiry::At(T0 + 60_000);
    granted(ledger.hold(T0 + 100, &later).await.expect("answers"));

    let replayed = replay(&whole_log(&ledger, root.id.tree()).await).expect("replays");
    for id in ["mandate:m1", "mandate:x", "mandate:b-only"] {
        let stored = ledger.bucket(root.id.tree(), id).await.expect("reads").expect("exists");
        let r = replayed.buckets.get(id).expect("bucket in log");
        assert_eq!(
            (r.cap, r.spent, r.held, r.open_holds),
            (stored.cap.get(), stored.spent.get(), stored.held.get(), stored.open_holds),
            "{id}"
        );
    }
    assert_replays(&ledger, root.id.tree()).await;
});

conformance!(attributes_are_set_once_and_notes_change_nothing, |ledger: Ledger| async move {
    let agent = create(&ledger, "a", 1_000, None).await;
    assert_eq!(ledger.attr(&agent.id, "ap2_key").await.expect("reads"), None);
    assert_eq!(ledger.attr_set_once(T0, &agent.id, "ap2_key", "first").await.expect("sets"), "first");
    assert_eq!(ledger.attr_set_once(T0, &agent.id, "ap2_key", "second").await.expect("keeps"), "first");
    assert_eq!(ledger.attr(&agent.id, "ap2_key").await.expect("reads").as_deref(), Some("first"));
    let h = granted(hold(&ledger, &agent, 10).await);
    ledger
        .note(T0, &agent.id, &agent.caller(), &h, "payment_rejected", r#"{"why":"insufficient_funds"}"#)
        .await
        .expect("notes");
    assert_eq!(figures(&ledger, &agent, T0).await, (1_000, 0, 10));
    let log = whole_log(&ledger, agent.id.tree()).await;
    let note = log.iter().find(|e| e.event == "note").expect("note logged");
    assert_eq!((note.hold.as_str(), note.reason.as_str()), (h.as_str(), "payment_rejected"));
    assert_replays(&ledger, agent.id.tree()).await;
});

conformance!(generic_endpoints_cannot_end_another_protocols_hold, |ledger: Ledger| async move {
    let agent = create(&ledger, "a", 1_000, None).await;
    let mut x402 = request(&agent, 100, 60_000, T0);
    x402.protocol = Protocol::X402;
    let h = granted(ledger.hold(T0, &x402).await.expect("answers"));
    let one = Micros::new(1).expect("m");
    let settle =
        ledger.settle_presigned(Some(Protocol::Generic), T0, &agent.id, &agent.caller(), &h, one, "", None).await;
    assert!(matches!(settle, Err(LedgerError::HoldProtocolMismatch)), "{settle:?}");
    let void = ledger.void_as(Protocol::Generic, T0, &agent.id, &agent.caller(), &h, "x").await;
    assert!(matches!(void, Err(LedgerError::HoldProtocolMismatch)), "{void:?}");
    assert_eq!(figures(&ledger, &agent, T0).await, (1_000, 0, 100), "nothing changed");
    ledger
        .settle_presigned(Some(Protocol::X402), T0, &agent.id, &agent.caller(), &h, one, "", None)
        .await
        .expect("its own protocol settles");
    assert_eq!(figures(&ledger, &agent, T0).await, (1_000, 1, 0));
});

conformance!(a_refused_pending_purchase_is_decided_afresh_on_retry, |ledger: Ledger| async move {
    let agent = create(&ledger, "a", 100, None).await;
    let mut purchase = request(&agent, 150, 60_000, T0);
    purchase.idempotency = Some(Idempotency {
        key: "buy-1".into(),
        fingerprint: "fp".into(),
        mode: IdempotencyMode::Pending { lease_ms: 5_000 },
    });
    assert!(matches!(ledger.hold(T0, &purchase).await.expect("answers"), HoldOutcome::Refused(_)));
    ledger.set_cap(T0, &agent.id, Micros::new(200).expect("m")).await.expect("raises");
    let mut retry = purchase.clone();
    retry.hold_id = HoldId::generate(agent.id.tree());
    let hold = granted(ledger.hold(T0, &retry).await.expect("answers"));
    assert_eq!(hold, retry.hold_id, "the retry made its own hold");
    // A refused final-mode hold, by contrast, is its own result (Stripe's rule).
    let mut final_hold = request(&agent, 150, 60_000, T0);
    final_hold.idempotency =
        Some(Idempotency { key: "h-1".into(), fingerprint: "fp".into(), mode: IdempotencyMode::Final });
    assert!(matches!(ledger.hold(T0, &final_hold).await.expect("answers"), HoldOutcome::Refused(_)));
    ledger.set_cap(T0, &agent.id, Micros::new(1_000).expect("m")).await.expect("raises");
    match ledger.hold(T0, &final_hold).await.expect("answers") {
        HoldOutcome::Refused(r) => assert!(r.replayed),
        other => panic!("expected the stored refusal, got {other:?}"),
    }
});

// ---- Spending controls (issue 6): the same semantics in both ledgers. ----

use spendcap::ledger::{AgentControls, AgentSetup, AlertRead, Controls, Crossing, Period};

const DAY: u64 = 86_400_000;

async fn create_with(
    ledger: &Ledger,
    handle: &str,
    cap: u64,
    parent: Option<&TestAgent>,
    setup: AgentSetup,
) -> TestAgent {
    let tree = parent.map(|p| p.id.tree().clone()).unwrap_or_else(TreeId::generate);
    let id = AgentId::generate(&tree);
    let token = AgentToken::generate(&id);
    let new = NewAgent {
        id: id.clone(),
        handle: format!("{handle}-{}-{}", &tree.as_str()[..6], &id.as_str()[20..]),
        parent: parent.map(|p| p.id.clone()),
        cap: Micros::new(cap).expect("cap"),
        expires_at_ms: None,
        labels: BTreeMap::new(),
        token_hash: token.hash(),
    };
    ledger.create_agent_with(T0, &new, &setup).await.expect("creates");
    TestAgent { id, token }
}

fn controlled(controls: Controls) -> AgentSetup {
    AgentSetup { controls, ..AgentSetup::default() }
}

/// A hold at `now` of `amount` for `task` to `service`, expiring in ten days.
fn ask(agent: &TestAgent, amount: u64, now: u64, task: &str, service: &str) -> HoldRequest {
    let mut r = request(agent, amount, 10 * DAY, now);
    r.task = task.into();
    r.service = service.into();
    r
}

fn refused(outcome: HoldOutcome) -> spendcap::ledger::Refusal {
    match outcome {
        HoldOutcome::Refused(r) => r,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// The log replays to the stored balances and to every period counter's figures.
async fn assert_counters_replay(ledger: &Ledger, agent: &TestAgent) {
    assert_replays(ledger, agent.id.tree()).await;
    let replayed = replay(&whole_log(ledger, agent.id.tree()).await).expect("replays");
    for usage in ledger.periods(&agent.id, 100).await.expect("periods") {
        let id = format!("p:{}:{}:{}", agent.id, usage.period.as_str(), usage.start_ms);
        let r = replayed.counters.get(&id).unwrap_or_else(|| panic!("counter {id} in the log"));
        assert_eq!((r.spent, r.held), (usage.spent.get(), usage.held.get()), "{id}");
    }
}

conformance!(daily_limits_refuse_exactly_at_the_boundary_and_roll_over_at_utc_midnight, |ledger: Ledger| async move {
    let day = T0 / DAY * DAY;
    let agent =
        create_with(&ledger, "d", 10_000, None, controlled(Controls { daily: Some(1_000), ..Controls::default() }))
            .await;
    // limit - 1, then 2 more (limit + 1) is refused, then exactly the limit.
    let late = day + DAY - 2;
    let first = granted(ledger.hold(late, &ask(&agent, 999, late, "t", "svc")).await.expect("answers"));
    let r = refused(ledger.hold(late, &ask(&agent, 2, late, "t", "svc")).await.expect("answers"));
    assert_eq!(
        (r.reason, r.remaining.get(), r.limited_by.as_str()),
        (RefusalReason::DailyLimitExceeded, 1, agent.id.as_str())
    );
    granted(ledger.hold(late, &ask(&agent, 1, late, "t", "svc")).await.expect("answers"));
    // Settling in the next day keeps the spend in the day it was held.
    let next = day + DAY;
    ledger.settle(next, &agent.id, &agent.caller(), &first, Micros::new(500).expect("m"), "").await.expect("settles");
    // One millisecond later it is a new UTC day: the old day's spend does not count.
    granted(ledger.hold(next, &ask(&agent, 1_000, next, "t", "svc")).await.expect("answers"));
    let r = refused(ledger.hold(next, &ask(&agent, 1, next, "t", "svc")).await.expect("answers"));
    assert_eq!(r.reason, RefusalReason::DailyLimitExceeded);
    let periods = ledger.periods(&agent.id, 10).await.expect("periods");
    let shown: Vec<(Period, u64, Option<u64>, u64, u64)> =
        periods.iter().map(|p| (p.period, p.start_ms, p.end_ms, p.spent.get(), p.held.get())).collect();
    assert_eq!(
        shown,
        vec![(Period::Daily, day + DAY, Some(day + 2 * DAY), 0, 1_000), (Period::Daily, day, Some(day + DAY), 500, 1)],
        "the old day stays reportable"
    );
    assert_counters_replay(&ledger, &agent).await;
});

conformance!(the_most_restrictive_period_wins_and_ancestors_limit_their_subtree, |ledger: Ledger| async move {
    let limits = Controls {
        per_payment: Some(300),
        daily: Some(500),
        weekly: Some(800),
        monthly: Some(2_000),
        all_time: Some(5_000),
        ..Controls::default()
    };
    let root = create_with(&ledger, "r", 100_000, None, controlled(limits)).await;
    let child = create(&ledger, "c", 100_000, Some(&root)).await;
    let r = refused(ledger.hold(T0, &ask(&child, 301, T0, "t", "s")).await.expect("answers"));
    assert_eq!((r.reason, r.remaining.get()), (RefusalReason::PerPaymentLimitExceeded, 300));
    granted(ledger.hold(T0, &ask(&child, 300, T0, "t", "s")).await.expect("answers"));
    let grant = match ledger.hold(T0, &ask(&child, 150, T0, "t", "s")).await.expect("answers") {
        HoldOutcome::Granted(g) => g,
        other => panic!("{other:?}"),
    };
    assert_eq!(grant.remaining.get(), 50, "the daily limit is now the tightest");
    let r = refused(ledger.hold(T0, &ask(&child, 51, T0, "t", "s")).await.expect("answers"));
    assert_eq!(
        (r.reason, r.limited_by.as_str(), r.remaining.get()),
        (RefusalReason::DailyLimitExceeded, root.id.as_str(), 50)
    );
    // Next day: the weekly limit (800 - 450 = 350) is tighter than the per-payment one, unless
    // the next day starts a new ISO week.
    let next = T0 + DAY;
    let same_week = Period::Weekly.start_ms(next) == Period::Weekly.start_ms(T0);
    granted(ledger.hold(next, &ask(&child, 300, next, "t", "s")).await.expect("answers"));
    let r = refused(ledger.hold(next, &ask(&child, 200, next, "t", "s")).await.expect("answers"));
    assert!(same_week, "T0 is a Friday");
    assert_eq!((r.reason, r.remaining.get()), (RefusalReason::WeeklyLimitExceeded, 50));
    assert_counters_replay(&ledger, &root).await;
});

conformance!(per_task_caps_count_each_task_and_sub_agents_inherit_what_remains, |ledger: Ledger| async move {
    let parent =
        create_with(&ledger, "p", 100_000, None, controlled(Controls { task_cap: Some(1_500), ..Controls::default() }))
            .await;
    granted(ledger.hold(T0, &ask(&parent, 1_000, T0, "research-1", "s")).await.expect("answers"));
    granted(ledger.hold(T0, &ask(&parent, 1_500, T0, "research-2", "s")).await.expect("answers"));
    let r = refused(ledger.hold(T0, &ask(&parent, 1, T0, "research-2", "s")).await.expect("answers"));
    assert_eq!((r.reason, r.remaining.get()), (RefusalReason::TaskCapExceeded, 0));
    // A sub-agent created for research-1 spends what remains of it (500), whatever its own
    // task labels are, and nothing more.
    let setup = AgentSetup { task_of: Some("research-1".into()), ..AgentSetup::default() };
    let sub = create_with(&ledger, "sub", 100_000, Some(&parent), setup).await;
    granted(ledger.hold(T0, &ask(&sub, 499, T0, "step-a", "s")).await.expect("answers"));
    let r = refused(ledger.hold(T0, &ask(&sub, 2, T0, "step-b", "s")).await.expect("answers"));
    assert_eq!(
        (r.reason, r.remaining.get(), r.limited_by.as_str()),
        (RefusalReason::TaskCapExceeded, 1, parent.id.as_str())
    );
    granted(ledger.hold(T0, &ask(&sub, 1, T0, "step-b", "s")).await.expect("answers"));
    let (spent, held) = ledger.task_usage(&parent.id, "research-1").await.expect("reads").expect("counter");
    assert_eq!((spent.get(), held.get()), (0, 1_500));
    assert_eq!(ledger.agent(&sub.id).await.expect("agent").task_of.as_deref(), Some("research-1"));
    let replayed = replay(&whole_log(&ledger, parent.id.tree()).await).expect("replays");
    let id = format!("t:{}:{}", parent.id, hex::encode("research-1"));
    assert_eq!(replayed.counters.get(&id).map(|c| (c.spent, c.held)), Some((0, 1_500)));
    assert_replays(&ledger, parent.id.tree()).await;
});

conformance!(allow_and_deny_lists_match_services_payees_and_protocols, |ledger: Ledger| async move {
    let controls = Controls {
        services_allow: vec!["*.openai.com".into(), "0x209693bc6afc0c5328ba36faf03c514ef312287c".into()],
        services_deny: vec!["evil.openai.com".into()],
        protocols_deny: vec!["acp".into()],
        ..Controls::default()
    };
    let root = create_with(&ledger, "l", 100_000, None, controlled(controls)).await;
    let agent = create(&ledger, "la", 100_000, Some(&root)).await;
    granted(ledger.hold(T0, &ask(&agent, 1, T0, "t", "API.openai.com")).await.expect("answers"));
    let r = refused(ledger.hold(T0, &ask(&agent, 1, T0, "t", "evil.openai.com")).await.expect("answers"));
    assert_eq!(
        (r.reason, r.limited_by.as_str(), r.remaining.get()),
        (RefusalReason::ServiceDenied, root.id.as_str(), 0)
    );
    let r = refused(ledger.hold(T0, &ask(&agent, 1, T0, "t", "example.com")).await.expect("answers"));
    assert_eq!(r.reason, RefusalReason::ServiceDenied);
    // An x402 payment to an allowed payTo address passes whatever its host.
    let mut x402 = ask(&agent, 1, T0, "t", "weather.example.com");
    x402.protocol = Protocol::X402;
    x402.details = r#"{"pay_to":"0x209693Bc6afc0C5328bA36FaF03C514EF312287C"}"#.into();
    granted(ledger.hold(T0, &x402).await.expect("answers"));
    let mut acp = ask(&agent, 1, T0, "t", "api.openai.com");
    acp.protocol = Protocol::Acp;
    assert_eq!(refused(ledger.hold(T0, &acp).await.expect("answers")).reason, RefusalReason::ProtocolDenied);
    let log = whole_log(&ledger, root.id.tree()).await;
    let reasons: Vec<&str> = log.iter().filter(|e| e.event == "refuse").map(|e| e.reason.as_str()).collect();
    assert_eq!(reasons, ["service_denied", "service_denied", "protocol_denied"]);
    assert!(log.iter().filter(|e| e.event == "refuse").all(|e| e.limited_by == root.id.as_str()));
});

conformance!(the_breaker_suspends_a_loop_at_its_threshold_and_reinstating_starts_afresh, |ledger: Ledger| async move {
    let breaker = Controls { max_holds: Some(5), window_ms: Some(1_000), max_repeats: Some(3), ..Controls::default() };
    let agent = create_with(&ledger, "b", 1_000_000, None, controlled(breaker)).await;
    // Three identical payments in a row pass; a different one resets the streak.
    for i in 0..3 {
        granted(ledger.hold(T0 + i, &ask(&agent, 10_000, T0 + i, "t", "loop.example.com")).await.expect("answers"));
    }
    granted(ledger.hold(T0 + 3, &ask(&agent, 10_001, T0 + 3, "t", "loop.example.com")).await.expect("answers"));
    granted(ledger.hold(T0 + 4, &ask(&agent, 10_000, T0 + 4, "t", "loop.example.com")).await.expect("answers"));
    // Five holds in (T0 - 1000, T0 + 4]: a sixth within the window suspends (velocity)...
    let r = refused(ledger.hold(T0 + 999, &ask(&agent, 7, T0 + 999, "t", "x")).await.expect("answers"));
    assert_eq!((r.reason, r.limited_by.as_str()), (RefusalReason::AgentSuspended, agent.id.as_str()));
    let record = ledger.agent(&agent.id).await.expect("agent");
    assert_eq!((record.suspended.as_deref(), record.suspended_at_ms), (Some("velocity"), Some(T0 + 999)));
    // ... and nothing is held after it.
    let r = refused(ledger.hold(T0 + 5_000, &ask(&agent, 7, T0 + 5_000, "t", "x")).await.expect("answers"));
    assert_eq!(r.reason, RefusalReason::AgentSuspended);
    assert_eq!(ledger.reinstate(T0 + 6_000, &agent.id).await.expect("reinstates").as_deref(), Some("velocity"));
    assert_eq!(ledger.reinstate(T0 + 6_001, &agent.id).await.expect("idempotent"), None);
    // Afresh: the window is exact at its edge (a hold exactly `window` later is outside it).
    let at = T0 + 10_000;
    for i in 0..5 {
        granted(ledger.hold(at, &ask(&agent, 100 + i, at, "t", "x")).await.expect("answers"));
    }
    granted(ledger.hold(at + 1_000, &ask(&agent, 200, at + 1_000, "t", "x")).await.expect("answers"));
    // The repeat rule: the fourth identical payment in a row suspends (`repeat`).
    let later = T0 + 100_000;
    for _ in 0..2 {
        granted(ledger.hold(later, &ask(&agent, 200, later, "t", "x")).await.expect("answers"));
    }
    let r = refused(ledger.hold(later, &ask(&agent, 200, later, "t", "x")).await.expect("answers"));
    assert_eq!(r.reason, RefusalReason::AgentSuspended);
    assert_eq!(ledger.agent(&agent.id).await.expect("agent").suspended.as_deref(), Some("repeat"));
    let log = whole_log(&ledger, agent.id.tree()).await;
    let suspends: Vec<(&str, u64)> =
        log.iter().filter(|e| e.event == "suspend").map(|e| (e.reason.as_str(), e.ts_ms)).collect();
    assert_eq!(suspends, [("velocity", T0 + 999), ("repeat", later)]);
    let rule: serde_json::Value =
        serde_json::from_str(&log.iter().find(|e| e.event == "suspend").expect("s").detail).expect("json");
    assert_eq!(rule, serde_json::json!({"rule": "holds", "max_holds": 5, "window_ms": 1000}));
    assert_eq!(log.iter().filter(|e| e.event == "reinstate").count(), 1);
    let replayed = replay(&log).expect("replays");
    assert!(replayed.agents[agent.id.as_str()].suspended);
    assert_replays(&ledger, agent.id.tree()).await;
});

conformance!(the_spend_rate_rule_counts_exactly_what_was_held_in_its_window, |ledger: Ledger| async move {
    let breaker = Controls {
        max_holds: Some(100),
        window_ms: Some(10_000),
        max_spend: Some(1_000),
        spend_window_ms: Some(5_000),
        ..Controls::default()
    };
    let agent = create_with(&ledger, "rate", 1_000_000, None, controlled(breaker)).await;
    granted(ledger.hold(T0, &ask(&agent, 600, T0, "t", "a")).await.expect("answers"));
    granted(ledger.hold(T0 + 1, &ask(&agent, 400, T0 + 1, "t", "b")).await.expect("answers"));
    // 1,000 held within 5 s: one more micro-dollar 5 s after the first is outside its window.
    granted(ledger.hold(T0 + 5_000, &ask(&agent, 600, T0 + 5_000, "t", "c")).await.expect("answers"));
    let r = refused(ledger.hold(T0 + 5_000, &ask(&agent, 1, T0 + 5_000, "t", "d")).await.expect("answers"));
    assert_eq!(r.reason, RefusalReason::AgentSuspended);
    let log = whole_log(&ledger, agent.id.tree()).await;
    let suspend = log.iter().find(|e| e.event == "suspend").expect("suspended");
    assert_eq!(suspend.reason, "velocity");
    assert!(suspend.detail.contains(r#""rule":"spend""#), "{}", suspend.detail);
});

conformance!(holds_record_each_threshold_crossing_once, |ledger: Ledger| async move {
    let setup = AgentSetup {
        controls: Controls { daily: Some(400), ..Controls::default() },
        alerts: vec![50, 80, 100],
        task_of: None,
        by: String::new(),
    };
    let agent = create_with(&ledger, "x", 1_000, None, setup).await;
    let a = granted(hold(&ledger, &agent, 200).await); // 20 % of the cap, 50 % of the day
    granted(hold(&ledger, &agent, 120).await); // 80 % of the day
    ledger.void(T0, &agent.id, &agent.caller(), &a, "x").await.expect("voids");
    granted(hold(&ledger, &agent, 200).await); // back over 50 % and 80 %: already alerted
    granted(hold(&ledger, &agent, 1).await);
    let log = whole_log(&ledger, agent.id.tree()).await;
    let crossings: Vec<Vec<Crossing>> = log
        .iter()
        .filter(|e| e.event == "hold")
        .map(|e| if e.crossings.is_empty() { Vec::new() } else { serde_json::from_str(&e.crossings).expect("json") })
        .collect();
    let day = T0 / DAY * DAY;
    let daily = |percent, used| Crossing {
        agent: agent.id.to_string(),
        limit: "daily".into(),
        period_start_ms: Some(day),
        task: None,
        percent,
        limit_micros: 400,
        used_micros: used,
    };
    assert_eq!(crossings, vec![vec![daily(50, 200)], vec![daily(80, 320)], vec![], vec![]]);
    ledger.set_cap(T0, &agent.id, Micros::new(800).expect("m")).await.expect("sets");
    let r = refused(hold(&ledger, &agent, 80).await);
    assert_eq!(r.reason, RefusalReason::DailyLimitExceeded);
    let next = T0 + DAY;
    granted(ledger.hold(next, &ask(&agent, 400, next, "t", "s")).await.expect("answers"));
    let last = whole_log(&ledger, agent.id.tree()).await.into_iter().rev().find(|e| e.event == "hold").expect("hold");
    let last: Vec<Crossing> = serde_json::from_str(&last.crossings).expect("json");
    let percents: Vec<(String, u8)> = last.iter().map(|c| (c.limit.clone(), c.percent)).collect();
    assert_eq!(
        percents,
        [("cap".to_owned(), 50), ("daily".to_owned(), 50), ("daily".to_owned(), 80), ("daily".to_owned(), 100)],
        "yesterday's holds expired; 400 of 800 is half the cap and the whole new day"
    );
});

conformance!(bad_controls_change_nothing_and_changes_are_logged, |ledger: Ledger| async move {
    let good = AgentControls { controls: Controls { daily: Some(100), ..Controls::default() }, alerts: vec![50, 100] };
    let agent = create(&ledger, "cfg", 1_000, None).await;
    ledger.set_controls(T0, &agent.id, &good).await.expect("sets");
    for bad in [
        AgentControls {
            controls: Controls { daily: Some(100), weekly: Some(50), ..Controls::default() },
            alerts: vec![],
        },
        AgentControls {
            controls: Controls {
                max_holds: Some(5),
                window_ms: Some(1_000),
                max_spend: Some(1),
                spend_window_ms: Some(2_000),
                ..Controls::default()
            },
            alerts: vec![],
        },
        AgentControls { controls: Controls::default(), alerts: vec![80, 50] },
        AgentControls {
            controls: Controls { protocols_allow: vec!["paypal".into()], ..Controls::default() },
            alerts: vec![],
        },
    ] {
        let result = ledger.set_controls(T0, &agent.id, &bad).await;
        assert!(matches!(result, Err(LedgerError::InvalidArgument(_))), "{bad:?}: {result:?}");
    }
    assert_eq!(ledger.controls(&agent.id).await.expect("reads"), good, "nothing changed");
    let r = refused(hold(&ledger, &agent, 101).await);
    assert_eq!(r.reason, RefusalReason::DailyLimitExceeded);
    // Expiry can be set and lifted.
    assert_eq!(ledger.set_expiry(T0, &agent.id, Some(T0 + 10)).await.expect("sets"), None);
    let r = refused(ledger.hold(T0 + 10, &request(&agent, 1, 10, T0 + 10)).await.expect("answers"));
    assert_eq!(r.reason, RefusalReason::AgentExpired);
    assert_eq!(ledger.set_expiry(T0 + 10, &agent.id, None).await.expect("lifts"), Some(T0 + 10));
    granted(ledger.hold(T0 + 10, &request(&agent, 1, 10, T0 + 10)).await.expect("answers"));
    let events: Vec<String> = whole_log(&ledger, agent.id.tree()).await.into_iter().map(|e| e.event).collect();
    assert_eq!(events, ["create", "controls", "refuse", "expiry", "refuse", "expiry", "hold"]);
});

conformance!(the_alerts_group_hands_each_entry_to_one_consumer_until_acknowledged, |ledger: Ledger| async move {
    let agent = create(&ledger, "g", 1_000, None).await;
    let tree = agent.id.tree().clone();
    ledger.ensure_alert_group(&tree).await.expect("creates");
    ledger.ensure_alert_group(&tree).await.expect("idempotent: an existing group is not an error");
    granted(hold(&ledger, &agent, 1).await);
    let first = ledger.read_alerts(&tree, "one", AlertRead::New, 10).await.expect("reads");
    assert_eq!(first.iter().map(|e| e.event.as_str()).collect::<Vec<_>>(), ["create", "hold"]);
    assert!(ledger.read_alerts(&tree, "two", AlertRead::New, 10).await.expect("reads").is_empty());
    ledger.ack_alerts(&tree, &[first[0].id.clone()]).await.expect("acks");
    let pending = ledger.read_alerts(&tree, "one", AlertRead::Pending, 10).await.expect("reads");
    assert_eq!(pending.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), [first[1].id.clone()]);
    // Another consumer takes over what the first left unacknowledged.
    let claimed = ledger.read_alerts(&tree, "two", AlertRead::Stale { min_idle_ms: 0 }, 10).await.expect("claims");
    assert_eq!(claimed.iter().map(|e| e.id.clone()).collect::<Vec<_>>(), [first[1].id.clone()]);
    ledger.ack_alerts(&tree, &[first[1].id.clone()]).await.expect("acks");
    assert!(ledger.read_alerts(&tree, "two", AlertRead::Pending, 10).await.expect("reads").is_empty());
});

/// A receipt the daemon signs before the settle (it granted the hold and knows the chain head)
/// is linked by the settle itself only when it is exactly that settle's receipt; when its facts,
/// its sequence number or its predecessor are off, the settle ignores it and the receipt is
/// signed and linked after the settle as usual. Either way the chain is whole and verifies.
#[tokio::test]
async fn presigned_receipts_are_linked_by_the_settle_only_when_exactly_right() {
    use spendcap::receipt::{issue, issue_settled, verify_chain, HeldFacts, Receipt, ReceiptSigner};
    let (ledger, _redis) = ledger(Backend::Redis).await;
    let signer = ReceiptSigner::generate();
    let agent = create(&ledger, "a", 1_000_000, None).await;
    let tree = agent.id.tree().clone();
    let facts = |task: &str| HeldFacts {
        agent: agent.id.to_string(),
        held: Micros::new(10).expect("m"),
        task: task.to_owned(),
        service: "api.example.com".into(),
        protocol: "generic".into(),
        details: String::new(),
    };
    let settle = |hold: HoldId, presigned: Option<spendcap::ledger::ReceiptLink>| {
        let (ledger, agent) = (&ledger, &agent);
        async move {
            ledger
                .settle_presigned(
                    None,
                    T0,
                    &agent.id,
                    &agent.caller(),
                    &hold,
                    Micros::new(7).expect("m"),
                    "",
                    presigned.as_ref(),
                )
                .await
                .expect("settles")
        }
    };
    let mut returned: Vec<Receipt> = Vec::new();

    // The tree's first receipt: the daemon knows no head yet, so nothing is signed ahead.
    let first = granted(hold(&ledger, &agent, 10).await);
    signer.remember_hold(&first, facts("task-1"));
    assert!(signer.presign(&signer.settling(&tree), &first, T0, Micros::new(7).expect("m"), "").is_none());
    let settled = settle(first, None).await;
    returned.push(issue(&ledger, &signer, &settled).await.expect("issues"));

    // Exactly right: linked in the settle.
    let right = granted(hold(&ledger, &agent, 10).await);
    signer.remember_hold(&right, facts("task-1"));
    let presigned =
        signer.presign(&signer.settling(&tree), &right, T0, Micros::new(7).expect("m"), "").expect("signs ahead");
    let settled = settle(right, Some(presigned.link.clone())).await;
    assert!(settled.linked, "the settle links the receipt signed ahead");
    assert_eq!(ledger.chain_head(&tree).await.expect("head").seq, 2);
    returned.push(issue_settled(&ledger, &signer, &settled, Some(presigned)).await.expect("issues"));

    // Facts that are not the hold's (another task): ignored.
    let other = granted(hold(&ledger, &agent, 10).await);
    signer.remember_hold(&other, facts("another-task"));
    let presigned =
        signer.presign(&signer.settling(&tree), &other, T0, Micros::new(7).expect("m"), "").expect("signs ahead");
    let settled = settle(other, Some(presigned.link.clone())).await;
    assert!(!settled.linked, "a receipt stating other facts is not linked");
    assert_eq!(ledger.chain_head(&tree).await.expect("head").seq, 2);
    let receipt = issue_settled(&ledger, &signer, &settled, Some(presigned)).await.expect("issues");
    assert_eq!(receipt.receipt.task, "task-1", "the receipt states the hold's own facts");
    returned.push(receipt);

    // A wrong predecessor: ignored.
    let wrong_prev = granted(hold(&ledger, &agent, 10).await);
    signer.remember_hold(&wrong_prev, facts("task-1"));
    let mut presigned =
        signer.presign(&signer.settling(&tree), &wrong_prev, T0, Micros::new(7).expect("m"), "").expect("signs ahead");
    presigned.link.prev_hash = "00".repeat(32);
    let settled = settle(wrong_prev, Some(presigned.link.clone())).await;
    assert!(!settled.linked, "a receipt naming another predecessor is not linked");
    returned.push(issue_settled(&ledger, &signer, &settled, Some(presigned)).await.expect("issues"));

    // A stale guess: another daemon settled in between and died before linking, so the settle
    // assigns a later sequence number than the one signed.
    let stale = granted(hold(&ledger, &agent, 10).await);
    signer.remember_hold(&stale, facts("task-1"));
    let presigned =
        signer.presign(&signer.settling(&tree), &stale, T0, Micros::new(7).expect("m"), "").expect("signs ahead");
    let between = granted(hold(&ledger, &agent, 10).await);
    settle(between, None).await;
    let settled = settle(stale, Some(presigned.link.clone())).await;
    assert!(!settled.linked, "a receipt with another sequence number is not linked");
    assert_eq!(settled.seq, presigned.link.facts.seq + 1);
    returned.push(issue_settled(&ledger, &signer, &settled, Some(presigned)).await.expect("issues"));

    let head = ledger.chain_head(&tree).await.expect("head");
    assert_eq!(head.seq, 6, "every receipt, the dead daemon's too, is linked");
    let mut chain = Vec::new();
    for seq in 1..=head.seq {
        let signed = ledger.receipt(&tree, seq).await.expect("reads").and_then(|f| f.signed).expect("signed");
        chain.push(serde_json::from_str::<Receipt>(&signed).expect("receipt JSON"));
    }
    assert_eq!(verify_chain(&chain, &signer.verifying_key()).expect("the chain verifies").receipts, 6);
    for receipt in returned {
        assert_eq!(
            chain[(receipt.receipt.seq - 1) as usize],
            receipt,
            "what a settle returned is what the chain holds"
        );
    }
}

conformance!(receipt_chains_survive_concurrent_settles_and_dead_daemons, |ledger: Ledger| async move {
    use spendcap::receipt::{issue, verify_chain, Receipt, ReceiptSigner};
    let ledger = std::sync::Arc::new(ledger);
    let signer = std::sync::Arc::new(ReceiptSigner::generate());
    let agent = std::sync::Arc::new(create(&ledger, "a", 1_000_000, None).await);
    let mut holds = Vec::new();
    for _ in 0..40 {
        holds.push(granted(hold(&ledger, &agent, 10).await));
    }
    // Three settles whose daemon "died" before signing: their receipts stay unlinked.
    for h in holds.drain(..3) {
        ledger.settle(T0, &agent.id, &agent.caller(), &h, Micros::new(5).expect("m"), "").await.expect("settles");
    }
    // The rest settle concurrently, each issuing its receipt.
    let tasks: Vec<_> = holds
        .into_iter()
        .map(|h| {
            let (ledger, signer, agent) = (ledger.clone(), signer.clone(), agent.clone());
            tokio::spawn(async move {
                let settled = ledger
                    .settle(T0, &agent.id, &agent.caller(), &h, Micros::new(7).expect("m"), "")
                    .await
                    .expect("settles");
                issue(&ledger, &signer, &settled).await.expect("issues")
            })
        })
        .collect();
    let mut returned: Vec<Receipt> = Vec::new();
    for task in tasks {
        returned.push(task.await.expect("task"));
    }
    let tree = agent.id.tree();
    let head = ledger.chain_head(tree).await.expect("head");
    assert_eq!(head.seq, 40, "every receipt, including the dead daemon's three, is linked");
    let mut chain = Vec::new();
    for seq in 1..=40 {
        let signed = ledger.receipt(tree, seq).await.expect("reads").and_then(|f| f.signed).expect("signed");
        chain.push(serde_json::from_str::<Receipt>(&signed).expect("receipt JSON"));
    }
    assert_eq!(verify_chain(&chain, &signer.verifying_key()).expect("the chain verifies").receipts, 40);
    for receipt in returned {
        assert_eq!(
            chain[(receipt.receipt.seq - 1) as usize],
            receipt,
            "what a settle returned is what the chain holds"
        );
    }
});

// ---- Outcome-unknown holds and the precheck (issue 13). ----

conformance!(unknown_holds_stay_counted_never_expire_and_resolve_by_settle_or_void, |ledger: Ledger| async move {
    let root =
        create_with(&ledger, "u", 1_000, None, controlled(Controls { daily: Some(1_000), ..Controls::default() }))
            .await;
    let agent = create(&ledger, "ua", 500, Some(&root)).await;
    assert!(ledger
        .create_bucket(T0, &root.id, "ub", Micros::new(400).expect("m"), true, "", "")
        .await
        .expect("creates"));
    let mut ask = request(&agent, 300, 1_000, T0);
    ask.buckets = vec!["ub".into()];
    let lost = granted(ledger.hold(T0, &ask).await.expect("answers"));

    let marked = ledger.mark_unknown(T0 + 10, &lost, "x402: no answer to the paid retry").await.expect("marks");
    assert_eq!((marked.agent.as_str(), marked.amount.get(), marked.replayed), (agent.id.as_str(), 300, false));
    assert!(ledger.mark_unknown(T0 + 20, &lost, "again").await.expect("marks again").replayed);

    // A day later (far past the hold's expiry), the money is still counted everywhere.
    let later = T0 + DAY;
    assert_eq!(ledger.expire(later, root.id.tree()).await.expect("sweeps"), 0);
    assert_eq!(figures(&ledger, &agent, later).await, (500, 0, 300));
    assert_eq!(figures(&ledger, &root, later).await, (1_000, 0, 300));
    let bucket = ledger.bucket(root.id.tree(), "ub").await.expect("reads").expect("bucket");
    assert_eq!((bucket.held.get(), bucket.open_holds), (300, 1));
    assert_eq!(
        refused(ledger.hold(later, &request(&agent, 201, 1_000, later)).await.expect("answers")).reason,
        RefusalReason::CapExceeded
    );
    let info = ledger.hold_info(&agent.id, &lost).await.expect("hold");
    assert_eq!(
        (info.state.as_str(), info.unknown_reason.as_str(), info.unknown_since_ms),
        ("unknown", "x402: no answer to the paid retry", Some(T0 + 10))
    );
    let listed = ledger.unknown_holds(root.id.tree()).await.expect("lists");
    assert_eq!(listed.iter().map(|h| h.hold_id.to_string()).collect::<Vec<_>>(), [lost.to_string()]);
    assert!(ledger.open_holds(root.id.tree()).await.expect("lists").is_empty());
    let log = whole_log(&ledger, root.id.tree()).await;
    let unknown: Vec<&LogEntry> = log.iter().filter(|e| e.event == "unknown").collect();
    assert_eq!(unknown.len(), 1, "one unknown entry, however often it is marked");
    assert_eq!(
        (unknown[0].hold.as_str(), unknown[0].amount, unknown[0].reason.as_str()),
        (lost.as_str(), Some(300), "x402: no answer to the paid retry")
    );
    assert!(log.iter().all(|e| e.event != "expire"), "an unknown hold never expires");
    assert_counters_replay(&ledger, &agent).await;
    let audit = spendcap::audit::check(&ledger).await.expect("audits");
    assert!(audit.is_clean(), "{:?}", audit.differences);
    assert_eq!((audit.open_holds, audit.unknown_holds), (0, 1));

    // A known charge resolves it: settled, the rest released, the bucket freed.
    let settled = ledger
        .settle(later, &agent.id, &Caller::Admin, &lost, Micros::new(200).expect("m"), r#"{"resolved_by":"admin"}"#)
        .await
        .expect("settles an unknown hold");
    assert_eq!((settled.amount.get(), settled.released.get()), (200, 100));
    assert_eq!(figures(&ledger, &root, later).await, (1_000, 200, 0));
    assert!(ledger.unknown_holds(root.id.tree()).await.expect("lists").is_empty());
    let again = ledger.mark_unknown(later, &lost, "late").await;
    assert!(matches!(again, Err(LedgerError::HoldSettled)), "{again:?}");

    // Knowing that no money moved resolves one by a void.
    let second = granted(ledger.hold(later, &request(&agent, 100, 1_000, later)).await.expect("answers"));
    ledger.mark_unknown(later, &second, "lost").await.expect("marks");
    let (released, replayed) = ledger
        .void_detailed(later + DAY, &agent.id, &Caller::Admin, &second, "admin_resolved", r#"{"reason":"no charge"}"#)
        .await
        .expect("voids an unknown hold");
    assert_eq!((released.get(), replayed), (100, false));
    assert_eq!(figures(&ledger, &agent, later + DAY).await, (500, 200, 0));
    let log = whole_log(&ledger, root.id.tree()).await;
    let void = log.iter().find(|e| e.event == "void").expect("void entry");
    assert_eq!((void.reason.as_str(), void.detail.as_str()), ("admin_resolved", r#"{"reason":"no charge"}"#));
    assert_counters_replay(&ledger, &agent).await;
    assert!(spendcap::audit::check(&ledger).await.expect("audits").is_clean());
    let missing = ledger.mark_unknown(later, &HoldId::generate(root.id.tree()), "x").await;
    assert!(matches!(missing, Err(LedgerError::UnknownHold)), "{missing:?}");
});

conformance!(the_precheck_refuses_what_a_hold_would_without_an_amount_and_logs_it, |ledger: Ledger| async move {
    let controls = Controls {
        services_deny: vec!["evil.example".into()],
        protocols_deny: vec!["acp".into()],
        ..Controls::default()
    };
    let root = create_with(&ledger, "p", 1_000, None, controlled(controls)).await;
    let agent = create(&ledger, "pa", 500, Some(&root)).await;
    let tree = root.id.tree().clone();
    let entries = whole_log(&ledger, &tree).await.len();
    let pass = ledger.precheck(T0, &agent.id, &agent.caller(), Protocol::X402, "api.example.com", "t").await;
    assert_eq!(pass.expect("answers"), None);
    assert_eq!(whole_log(&ledger, &tree).await.len(), entries, "a pass writes nothing");

    let check = |protocol: Protocol, service: &'static str| {
        let (ledger, agent) = (&ledger, &agent);
        async move { ledger.precheck(T0, &agent.id, &agent.caller(), protocol, service, "t").await.expect("answers") }
    };
    let r = check(Protocol::Acp, "shop.example").await.expect("refused");
    assert_eq!(
        (r.reason, r.limited_by.as_str(), r.requested.get()),
        (RefusalReason::ProtocolDenied, root.id.as_str(), 0)
    );
    assert_eq!(check(Protocol::X402, "evil.example").await.expect("refused").reason, RefusalReason::ServiceDenied);
    let wrong = ledger.precheck(T0, &agent.id, &Caller::Agent(TokenHash::of("nope")), Protocol::X402, "a", "t").await;
    assert!(matches!(wrong, Err(LedgerError::Unauthorized)), "{wrong:?}");

    ledger.set_expiry(T0, &agent.id, Some(T0)).await.expect("sets expiry");
    assert_eq!(check(Protocol::X402, "api.example.com").await.expect("refused").reason, RefusalReason::AgentExpired);
    ledger.revoke(T0, &root.id, "compromised").await.expect("revokes");
    let r = check(Protocol::Generic, "api.example.com").await.expect("refused");
    assert_eq!((r.reason, r.limited_by.as_str()), (RefusalReason::AgentRevoked, root.id.as_str()));

    let log = whole_log(&ledger, &tree).await;
    let refusals: Vec<(&str, &str, &str, Option<u64>)> = log
        .iter()
        .filter(|e| e.event == "refuse")
        .map(|e| (e.reason.as_str(), e.protocol.as_str(), e.service.as_str(), e.amount))
        .collect();
    assert_eq!(
        refusals,
        [
            ("protocol_denied", "acp", "shop.example", Some(0)),
            ("service_denied", "x402", "evil.example", Some(0)),
            ("agent_expired", "x402", "api.example.com", Some(0)),
            ("agent_revoked", "generic", "api.example.com", Some(0)),
        ]
    );
    assert!(log.iter().filter(|e| e.event == "refuse").all(|e| e.task == "t" && e.agent == agent.id.as_str()));
    assert_replays(&ledger, &tree).await;
});

conformance!(an_unacknowledged_hold_is_forgotten_unless_a_duplicate_got_it, |ledger: Ledger| async move {
    let agent = create(&ledger, "forget", 10_000, None).await;
    let keyed = |key: &str| HoldRequest {
        idempotency: Some(Idempotency { key: key.into(), fingerprint: "fp".into(), mode: IdempotencyMode::Final }),
        ..request(&agent, 100, 60_000, T0)
    };
    // The daemon re-asking with the same hold id (its answer was lost) is not a duplicate.
    let first = keyed("k");
    assert_eq!(granted(ledger.hold(T0, &first).await.expect("holds")), first.hold_id);
    assert_eq!(granted(ledger.hold(T0, &first).await.expect("re-asks")), first.hold_id);
    assert!(ledger.forget_unacknowledged(&agent.id, "k").await.expect("forgets"));
    // Forgotten: the key runs afresh, a second hold.
    let fresh = keyed("k");
    assert_eq!(granted(ledger.hold(T0, &fresh).await.expect("holds")), fresh.hold_id);
    assert_eq!(figures(&ledger, &agent, T0).await, (10_000, 0, 200));
    // A duplicate got the answer: the hold is the agent's, the record stays.
    assert_eq!(granted(ledger.hold(T0, &keyed("k")).await.expect("replays")), fresh.hold_id);
    assert!(!ledger.forget_unacknowledged(&agent.id, "k").await.expect("keeps"));
    assert_eq!(granted(ledger.hold(T0, &keyed("k")).await.expect("replays")), fresh.hold_id);
    assert_eq!(figures(&ledger, &agent, T0).await, (10_000, 0, 200));
});

conformance!(a_purchase_ends_in_the_call_that_ends_its_hold, |ledger: Ledger| async move {
    use spendcap::ledger::EndsPurchase;
    use spendcap::receipt::{HeldFacts, ReceiptSigner};

    let agent = create(&ledger, "a", 10_000, None).await;
    let pending = |key: &str, amount: u64| {
        let mut request = request(&agent, amount, 60_000, T0);
        request.idempotency = Some(Idempotency {
            key: key.into(),
            fingerprint: "fp".into(),
            mode: IdempotencyMode::Pending { lease_ms: 5_000 },
        });
        request
    };
    let duplicate =
        |request: &HoldRequest| HoldRequest { hold_id: HoldId::generate(agent.id.tree()), ..request.clone() };
    let ends = |key: &'static str, response: &'static str| Some(EndsPurchase { key, response });

    // A new hold's reply names the tree's receipt chain head, so its receipt can be signed ahead.
    let paid = pending("buy-1", 300);
    let (outcome, head) = ledger.hold_with_head(T0, &paid, true).await.expect("answers");
    let hold = granted(outcome);
    let head = head.expect("a new grant names the chain head");
    assert_eq!(head.seq, 0, "no receipt yet");
    let signer = ReceiptSigner::generate();
    signer.learn_head(agent.id.tree(), &head);
    signer.remember_hold(
        &hold,
        HeldFacts {
            agent: agent.id.to_string(),
            held: Micros::new(300).expect("m"),
            task: paid.task.clone(),
            service: paid.service.clone(),
            protocol: paid.protocol.as_str().to_owned(),
            details: String::new(),
        },
    );
    let amount = Micros::new(250).expect("m");
    let presigned = signer.presign(&signer.settling(hold.tree()), &hold, T0, amount, "").expect("signed ahead");
    let (settled, finished) = ledger
        .settle_finishing(
            None,
            T0,
            &agent.id,
            &agent.caller(),
            &hold,
            amount,
            "",
            Some(&presigned.link),
            ends("buy-1", "answer-1"),
        )
        .await
        .expect("settles");
    assert!(settled.linked && finished, "the receipt linked and the purchase finished in the settle");
    assert_eq!(ledger.chain_head(agent.id.tree()).await.expect("head").seq, 1);
    match ledger.hold(T0, &duplicate(&paid)).await.expect("answers") {
        HoldOutcome::Finished { response } => assert_eq!(response, "answer-1"),
        other => panic!("expected the stored answer, got {other:?}"),
    }

    // Without a receipt the settle links, its answer is not stored: the record stays in flight.
    let unlinked = pending("buy-2", 100);
    let unlinked_hold = granted(ledger.hold(T0, &unlinked).await.expect("answers"));
    let (settled, finished) = ledger
        .settle_finishing(
            None,
            T0,
            &agent.id,
            &agent.caller(),
            &unlinked_hold,
            amount_of(100),
            "",
            None,
            ends("buy-2", "no"),
        )
        .await
        .expect("settles");
    assert!(!settled.linked && !finished);
    assert!(matches!(ledger.hold(T0, &duplicate(&unlinked)).await, Err(LedgerError::IdempotencyInFlight)));

    // A void stores the purchase's answer in the same call; a record of another hold is untouched.
    let voided = pending("buy-3", 100);
    let voided_hold = granted(ledger.hold(T0, &voided).await.expect("answers"));
    let other = pending("buy-4", 100);
    let other_hold = granted(ledger.hold(T0, &other).await.expect("answers"));
    let reason = "merchant_declined";
    let caller = agent.caller();
    let void = ledger.void_finishing(T0, &agent.id, &caller, &voided_hold, reason, ends("buy-4", "wrong")).await;
    assert_eq!(void.expect("voids"), (amount_of(100), false, false), "buy-4 is another hold's purchase");
    let void = ledger.void_finishing(T0, &agent.id, &caller, &voided_hold, reason, ends("buy-3", "answer-3")).await;
    assert_eq!(void.expect("replays"), (amount_of(100), true, true));
    match ledger.hold(T0, &duplicate(&voided)).await.expect("answers") {
        HoldOutcome::Finished { response } => assert_eq!(response, "answer-3"),
        other => panic!("expected the stored answer, got {other:?}"),
    }

    // Marking a hold unknown releases its purchase: a retry gets the same hold back at once.
    let (marked, released) =
        ledger.mark_unknown_releasing(T0, &other_hold, "no answer", Some("buy-4")).await.expect("marks");
    assert!(released && !marked.replayed);
    match ledger.hold(T0, &duplicate(&other)).await.expect("answers") {
        HoldOutcome::Granted(grant) => assert_eq!((grant.hold_id, grant.replayed), (other_hold, true)),
        other => panic!("expected the same hold, got {other:?}"),
    }
    // A note about a payment whose hold stays (a rejected x402 authorization) releases its
    // purchase in the same call; another hold's record is untouched.
    let noted = pending("buy-5", 100);
    let noted_hold = granted(ledger.hold(T0, &noted).await.expect("answers"));
    let note = ledger.note_releasing(T0, &agent.id, &caller, &noted_hold, "rejected", "", Some("buy-1")).await;
    assert!(!note.expect("notes"), "buy-1 is another hold's purchase");
    let note = ledger.note_releasing(T0, &agent.id, &caller, &noted_hold, "rejected", "", Some("buy-5")).await;
    assert!(note.expect("notes"), "the note released buy-5");
    match ledger.hold(T0, &duplicate(&noted)).await.expect("answers") {
        HoldOutcome::Granted(grant) => assert_eq!((grant.hold_id, grant.replayed), (noted_hold, true)),
        other => panic!("expected the same hold, got {other:?}"),
    }
    assert_eq!(figures(&ledger, &agent, T0).await, (10_000, 350, 200), "settled 250 + 100; buy-4 and buy-5 held");
    let log = whole_log(&ledger, agent.id.tree()).await;
    let events: Vec<&str> = log.iter().map(|e| e.event.as_str()).collect();
    let expected =
        ["create", "hold", "settle", "hold", "settle", "hold", "hold", "void", "unknown", "hold", "note", "note"];
    assert_eq!(events, expected, "one entry per change");
});

fn amount_of(micros: u64) -> Micros {
    Micros::new(micros).expect("micros")
}

conformance!(a_hold_settles_in_parts_keeps_the_rest_held_and_ends_once, |ledger: Ledger| async move {
    let parent = create(&ledger, "p", 2_000, None).await;
    let agent = create(&ledger, "a", 1_500, Some(&parent)).await;
    let hold_id = granted(hold(&ledger, &agent, 1_000).await);
    let part = |amount: u64, total: u64| {
        let (ledger, agent, hold_id) = (&ledger, &agent, &hold_id);
        async move {
            ledger
                .settle_part(
                    T0,
                    &agent.id,
                    &agent.caller(),
                    hold_id,
                    Micros::new(amount).expect("m"),
                    Micros::new(total).expect("m"),
                    "{\"voucher\":1}",
                    None,
                )
                .await
        }
    };
    let first = part(100, 100).await.expect("settles part");
    assert_eq!((first.remaining.get(), first.part_settled.get(), first.replayed), (900, 100, false));
    // The same increment again (same total) moves nothing.
    assert!(part(100, 100).await.expect("replays").replayed);
    assert_eq!(figures(&ledger, &agent, T0).await, (1_500, 100, 900));
    assert_eq!(figures(&ledger, &parent, T0).await, (2_000, 100, 900));
    // An increment that does not follow on, or more than is held, is refused and changes nothing.
    assert!(matches!(part(100, 300).await, Err(LedgerError::InvalidArgument(_))));
    assert!(matches!(part(901, 1_001).await, Err(LedgerError::AmountExceedsHold)));
    // The whole deposit stays counted: the agent cannot hold more than its cap meanwhile.
    assert!(matches!(hold(&ledger, &agent, 501).await, HoldOutcome::Refused(_)));
    // A revoked agent's voucher already sent is still settled (a known charge).
    ledger.revoke(T0, &agent.id, "test").await.expect("revokes");
    let second = part(250, 350).await.expect("settles part after revocation");
    assert_eq!((second.remaining.get(), second.part_settled.get()), (650, 350));
    // Closing settles the last increment and releases the rest, once.
    let closed =
        ledger.settle(T0, &agent.id, &agent.caller(), &hold_id, Micros::new(50).expect("m"), "").await.expect("closes");
    assert_eq!((closed.amount.get(), closed.released.get()), (50, 600));
    assert_eq!(figures(&ledger, &agent, T0).await, (1_500, 400, 0));
    assert_eq!(figures(&ledger, &parent, T0).await, (2_000, 400, 0));
    assert!(matches!(part(10, 360).await, Err(LedgerError::HoldSettled)));
    let log = whole_log(&ledger, agent.id.tree()).await;
    let parts: Vec<u64> = log.iter().filter(|e| e.event == "psettle").filter_map(|e| e.amount).collect();
    assert_eq!(parts, [100, 250]);
    assert_replays(&ledger, agent.id.tree()).await;
    assert!(spendcap::audit::check(&ledger).await.expect("audits").is_clean());
});
