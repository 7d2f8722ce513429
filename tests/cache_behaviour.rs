//! CachedVerifier against an in-process backend that counts calls and fails, stalls
//! or changes its mind on command. Short TTLs; every wait is bounded.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use keygate::{
    ApiKey, CacheStats, CachedVerifier, CachedVerifierBuilder, FailurePolicy, Principal, Reason, StaticVerifier,
    Verdict, Verifier, VerifyError,
};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::time::timeout;

/// A backend: a StaticVerifier plus a call counter, a failure switch, a delay and a gate.
struct Backend {
    keys: StaticVerifier,
    calls: AtomicUsize,
    failing: AtomicBool,
    delay: Duration,
    gate: watch::Sender<bool>,
}

impl Backend {
    fn new(delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            keys: StaticVerifier::new(),
            calls: AtomicUsize::new(0),
            failing: AtomicBool::new(false),
            delay,
            gate: watch::channel(true).0,
        })
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
    fn fail(&self, on: bool) {
        self.failing.store(on, Ordering::SeqCst);
    }
    fn add(&self, key_id: &str) -> ApiKey {
        let key = ApiKey::generate("kg").unwrap();
        self.keys.insert(&key, Principal::builder(key_id).owner("acme").build());
        key
    }
}

impl Verifier for Backend {
    async fn verify(&self, key: &ApiKey) -> Result<Verdict, VerifyError> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut gate = self.gate.subscribe();
        let _ = gate.wait_for(|open| *open).await;
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        if self.failing.load(Ordering::SeqCst) {
            return Err(VerifyError::Unreachable("backend down".into()));
        }
        self.keys.verify(key).await
    }
}

const SHORT: Duration = Duration::from_millis(200);
const LIMIT: Duration = Duration::from_secs(10);

fn cache(backend: &Arc<Backend>) -> CachedVerifierBuilder<Arc<Backend>> {
    CachedVerifier::builder(Arc::clone(backend))
        .positive_ttl(SHORT)
        .negative_ttl(SHORT)
        .stale_if_error(Duration::from_secs(1))
        .stale_retry_interval(Duration::ZERO)
}

/// Closes the backend's gate, starts a lookup and waits until the backend holds its
/// call: the lookup's answer is then in flight for as long as the test keeps the gate shut.
async fn spawn_held(
    backend: &Arc<Backend>,
    v: &CachedVerifier<Arc<Backend>>,
    key: &ApiKey,
) -> tokio::task::JoinHandle<Result<Verdict, VerifyError>> {
    backend.gate.send_replace(false);
    let handle = tokio::spawn({
        let (v, key) = (v.clone(), key.clone());
        async move { v.verify(&key).await }
    });
    timeout(LIMIT, async {
        while backend.calls() == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    handle
}

fn is_valid(r: &Result<Verdict, VerifyError>) -> bool {
    matches!(r, Ok(Verdict::Valid(p)) if !p.is_fail_open())
}

fn is_invalid(r: &Result<Verdict, VerifyError>, reason: Reason) -> bool {
    matches!(r, Ok(Verdict::Invalid { reason: got, .. }) if *got == reason)
}

async fn verify<V: Verifier>(v: &CachedVerifier<V>, key: &ApiKey) -> Result<Verdict, VerifyError> {
    timeout(LIMIT, v.verify(key)).await.expect("verify hung")
}

#[tokio::test]
async fn valid_verdicts_are_served_from_cache_until_the_ttl() {
    let backend = Backend::new(Duration::ZERO);
    let key = backend.add("k1");
    let v = cache(&backend).build();
    assert!(is_valid(&verify(&v, &key).await));
    for _ in 0..10 {
        assert!(is_valid(&verify(&v, &key).await));
    }
    assert_eq!(backend.calls(), 1);
    let s = v.stats();
    assert_eq!((s.misses, s.hits), (1, 10));
    tokio::time::sleep(SHORT + Duration::from_millis(50)).await;
    assert!(is_valid(&verify(&v, &key).await));
    assert_eq!(backend.calls(), 2);
}

#[tokio::test]
async fn the_ttl_never_outlives_expires_at() {
    let backend = Backend::new(Duration::ZERO);
    let key = ApiKey::generate("kg").unwrap();
    let expires = OffsetDateTime::now_utc() + Duration::from_millis(300);
    backend.keys.insert(&key, Principal::builder("k1").expires_at(Some(expires)).build());
    let v = cache(&backend).positive_ttl(Duration::from_secs(600)).stale_if_error(Duration::from_secs(600)).build();
    assert!(is_valid(&verify(&v, &key).await));
    assert!(is_valid(&verify(&v, &key).await));
    assert_eq!(backend.calls(), 1);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(is_invalid(&verify(&v, &key).await, Reason::Expired));
    assert_eq!(backend.calls(), 2);

    // Nor does the stale window: past expires_at a failing backend gives an error.
    let key2 = ApiKey::generate("kg").unwrap();
    let expires = OffsetDateTime::now_utc() + Duration::from_millis(300);
    backend.keys.insert(&key2, Principal::builder("k2").expires_at(Some(expires)).build());
    assert!(is_valid(&verify(&v, &key2).await));
    backend.fail(true);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(verify(&v, &key2).await.is_err());
    assert_eq!(v.stats().stale_served, 0);
}

#[tokio::test]
async fn invalid_verdicts_are_cached_for_the_negative_ttl() {
    let backend = Backend::new(Duration::ZERO);
    let unknown = ApiKey::generate("kg").unwrap();
    let v = cache(&backend).build();
    assert!(is_invalid(&verify(&v, &unknown).await, Reason::NotFound));
    assert!(is_invalid(&verify(&v, &unknown).await, Reason::NotFound));
    assert_eq!(backend.calls(), 1);
    assert_eq!(v.stats().negative_hits, 1);
    tokio::time::sleep(SHORT + Duration::from_millis(50)).await;
    assert!(is_invalid(&verify(&v, &unknown).await, Reason::NotFound));
    assert_eq!(backend.calls(), 2);
}

#[tokio::test]
async fn errors_are_never_cached() {
    let backend = Backend::new(Duration::ZERO);
    let key = backend.add("k1");
    backend.fail(true);
    let v = cache(&backend).build();
    for _ in 0..3 {
        assert!(matches!(verify(&v, &key).await, Err(VerifyError::Unreachable(_))));
    }
    assert_eq!(backend.calls(), 3);
    assert_eq!(v.stats().remote_errors, 3);
    backend.fail(false);
    assert!(is_valid(&verify(&v, &key).await));
}

async fn thousand_at_once<V: Verifier>(v: &CachedVerifier<V>, key: &ApiKey) -> Vec<Result<Verdict, VerifyError>> {
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let v = v.clone();
            let key = key.clone();
            tokio::spawn(async move { v.verify(&key).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(timeout(LIMIT, t).await.expect("hung").expect("panicked"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_misses_make_one_call() {
    let backend = Backend::new(Duration::from_millis(50));
    let key = backend.add("k1");
    let v = cache(&backend).positive_ttl(Duration::from_secs(60)).negative_ttl(Duration::from_secs(60)).build();
    let results = thousand_at_once(&v, &key).await;
    assert!(results.iter().all(is_valid));
    assert_eq!(backend.calls(), 1);
    let s = v.stats();
    assert_eq!(s.coalesced_waits + s.hits + s.misses, 1000 + s.misses - 1, "{s:?}");

    let unknown = ApiKey::generate("kg").unwrap();
    let results = thousand_at_once(&v, &unknown).await;
    assert!(results.iter().all(|r| is_invalid(r, Reason::NotFound)));
    assert_eq!(backend.calls(), 2);

    // Errors are shared by the waiters of one call too.
    let failing_key = backend.add("k2");
    backend.fail(true);
    let results = thousand_at_once(&v, &failing_key).await;
    assert!(results.iter().all(Result::is_err));
    assert!(backend.calls() < 2 + 20, "calls: {}", backend.calls());
}

#[tokio::test]
async fn stale_verdicts_are_served_only_inside_the_window() {
    let backend = Backend::new(Duration::ZERO);
    let key = backend.add("k1");
    let v = cache(&backend).build();
    assert!(is_valid(&verify(&v, &key).await));
    backend.fail(true);
    tokio::time::sleep(SHORT + Duration::from_millis(50)).await;
    assert!(is_valid(&verify(&v, &key).await));
    assert!(is_valid(&verify(&v, &key).await));
    assert_eq!(v.stats().stale_served, 2);
    // A key never seen gets the error, not a stale verdict of another key.
    let other = backend.add("k2");
    assert!(verify(&v, &other).await.is_err());
    // Past TTL + window: the error.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(verify(&v, &key).await.is_err());
    assert_eq!(v.stats().stale_served, 2);
    // Recovery refreshes the entry.
    backend.fail(false);
    assert!(is_valid(&verify(&v, &key).await));
}

#[tokio::test]
async fn a_failed_refresh_is_not_retried_on_every_request() {
    let backend = Backend::new(Duration::ZERO);
    let key = backend.add("k1");
    let v = cache(&backend).stale_retry_interval(Duration::from_millis(300)).build();
    assert!(is_valid(&verify(&v, &key).await));
    backend.fail(true);
    tokio::time::sleep(SHORT + Duration::from_millis(50)).await;
    assert!(is_valid(&verify(&v, &key).await));
    assert_eq!(backend.calls(), 2);
    for _ in 0..5 {
        assert!(is_valid(&verify(&v, &key).await));
    }
    assert_eq!(backend.calls(), 2, "served stale without asking again");
    assert_eq!(v.stats().stale_served, 6);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert!(is_valid(&verify(&v, &key).await));
    assert_eq!(backend.calls(), 3);
}

#[tokio::test]
async fn an_invalid_answer_removes_the_stale_entry() {
    let backend = Backend::new(Duration::ZERO);
    let key = backend.add("k1");
    let v = cache(&backend).build();
    assert!(is_valid(&verify(&v, &key).await));
    backend.keys.revoke("k1");
    tokio::time::sleep(SHORT + Duration::from_millis(50)).await;
    assert!(is_invalid(&verify(&v, &key).await, Reason::Revoked));
    backend.fail(true);
    assert!(is_invalid(&verify(&v, &key).await, Reason::Revoked), "negative hit");
    tokio::time::sleep(SHORT + Duration::from_millis(50)).await;
    // The negative entry is gone and the valid one was removed: error, never stale.
    assert!(verify(&v, &key).await.is_err());
    assert_eq!(v.stats().stale_served, 0);
}

#[tokio::test]
async fn invalidate_key_id_removes_every_digest_of_that_key() {
    let backend = Backend::new(Duration::ZERO);
    let old = backend.add("k1");
    let new = backend.add("k1"); // a rotated key: same id, two secrets
    let other = backend.add("k2");
    let v = cache(&backend).positive_ttl(Duration::from_secs(60)).build();
    for k in [&old, &new, &other] {
        assert!(is_valid(&verify(&v, k).await));
    }
    assert_eq!(backend.calls(), 3);
    assert_eq!(v.invalidate_key_id("k1").await, 2);
    assert_eq!(v.invalidate_key_id("k1").await, 0);
    for k in [&old, &new, &other] {
        assert!(is_valid(&verify(&v, k).await));
    }
    assert_eq!(backend.calls(), 5);
}

#[tokio::test]
async fn invalidated_entries_are_never_served_stale() {
    let backend = Backend::new(Duration::ZERO);
    let key = backend.add("k1");
    let v = cache(&backend).build();
    assert!(is_valid(&verify(&v, &key).await));
    backend.fail(true);
    tokio::time::sleep(SHORT + Duration::from_millis(50)).await;
    v.invalidate_key_id("k1").await;
    assert!(verify(&v, &key).await.is_err());

    backend.fail(false);
    assert!(is_valid(&verify(&v, &key).await));
    backend.fail(true);
    tokio::time::sleep(SHORT + Duration::from_millis(50)).await;
    v.invalidate_all();
    assert!(verify(&v, &key).await.is_err());
    assert_eq!(v.stats().stale_served, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_from_before_an_invalidation_is_not_cached() {
    let backend = Backend::new(Duration::ZERO);
    let key = backend.add("k1");
    let v = cache(&backend).positive_ttl(Duration::from_secs(60)).build();
    let pending = spawn_held(&backend, &v, &key).await;
    // The key is revoked while the backend's (older) answer is on its way.
    v.invalidate_key_id("k1").await;
    backend.gate.send_replace(true);
    assert!(is_valid(&timeout(LIMIT, pending).await.unwrap().unwrap()));
    assert!(is_valid(&verify(&v, &key).await));
    assert_eq!(backend.calls(), 2, "the answer from before the invalidation was not cached");
    assert!(is_valid(&verify(&v, &key).await));
    assert_eq!(backend.calls(), 2);
}

#[tokio::test]
async fn invalidate_all_drops_valid_and_invalid_verdicts() {
    let backend = Backend::new(Duration::ZERO);
    let key = backend.add("k1");
    let unknown = ApiKey::generate("kg").unwrap();
    let v = cache(&backend).positive_ttl(Duration::from_secs(60)).negative_ttl(Duration::from_secs(60)).build();
    verify(&v, &key).await.unwrap();
    verify(&v, &unknown).await.unwrap();
    v.invalidate_all();
    verify(&v, &key).await.unwrap();
    verify(&v, &unknown).await.unwrap();
    assert_eq!(backend.calls(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_invalid_keys_cannot_evict_valid_ones() {
    let backend = Backend::new(Duration::ZERO);
    let valid: Vec<ApiKey> = (0..200).map(|i| backend.add(&format!("k{i}"))).collect();
    let v = cache(&backend)
        .positive_ttl(Duration::from_secs(60))
        .negative_ttl(Duration::from_secs(60))
        .max_capacity(1_000)
        .negative_capacity(100)
        // Eviction is what this test is about; the budget would stop the flood first.
        .miss_budget(keygate::MissBudget::unlimited())
        .build();
    for _ in 0..2 {
        for k in &valid {
            assert!(is_valid(&verify(&v, k).await));
        }
    }
    assert_eq!(backend.calls(), 200);
    for _ in 0..20_000 {
        let junk = ApiKey::generate("kg").unwrap();
        assert!(is_invalid(&verify(&v, &junk).await, Reason::NotFound));
    }
    v.run_pending_tasks().await;
    assert!(v.entry_count() <= 1_000 + 100, "entries: {}", v.entry_count());
    let calls = backend.calls();
    for k in &valid {
        assert!(is_valid(&verify(&v, k).await));
    }
    assert_eq!(backend.calls(), calls, "every valid key was still cached");
}

#[tokio::test]
async fn fail_open_is_explicit_and_flagged() {
    let backend = Backend::new(Duration::ZERO);
    let key = backend.add("k1");
    let unknown = ApiKey::generate("kg").unwrap();
    let closed = cache(&backend).build();
    let open = cache(&backend).failure_policy(FailurePolicy::FailOpen).build();
    assert!(
        is_invalid(&verify(&open, &unknown).await, Reason::NotFound),
        "fail open never turns a denial into a grant"
    );
    backend.fail(true);
    assert!(verify(&closed, &key).await.is_err());
    match verify(&open, &key).await {
        Ok(Verdict::Valid(p)) => {
            assert!(p.is_fail_open());
            assert!(p.scopes().is_empty());
        }
        other => panic!("expected the fail-open principal, got {other:?}"),
    }
    assert_eq!(open.stats().fail_open, 1);
    let s: CacheStats = closed.stats();
    assert_eq!((s.misses, s.remote_errors, s.fail_open), (1, 1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_caller_hands_the_call_over() {
    let backend = Backend::new(Duration::ZERO);
    let key = backend.add("k1");
    let v = cache(&backend).build();
    let leader = spawn_held(&backend, &v, &key).await;
    let waiter = tokio::spawn({
        let (v, key) = (v.clone(), key.clone());
        async move { v.verify(&key).await }
    });
    timeout(LIMIT, async {
        while v.stats().coalesced_waits == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap();
    leader.abort();
    let _ = leader.await;
    backend.gate.send_replace(true);
    assert!(is_valid(&timeout(LIMIT, waiter).await.unwrap().unwrap()));
    assert_eq!(backend.calls(), 2);
    // Nothing is left behind: the next lookup is a plain hit.
    assert!(is_valid(&verify(&v, &key).await));
    assert_eq!(backend.calls(), 2);
}

#[tokio::test]
async fn clones_share_one_cache_and_debug_shows_no_secrets() {
    let backend = Backend::new(Duration::ZERO);
    let key = backend.add("k1");
    let a = cache(&backend).build();
    let b = a.clone();
    verify(&a, &key).await.unwrap();
    verify(&b, &key).await.unwrap();
    assert_eq!(backend.calls(), 1);
    assert_eq!(b.stats().hits, 1);
    let debug = format!("{a:?}");
    assert!(!debug.contains(&key.expose_secret()[3..]));
    assert!(debug.contains("positive_ttl"));
}

/// A backend whose answer is decided when the call arrives, then held at a gate: an
/// answer computed before a revocation and delivered after it.
struct Snapshot {
    keys: StaticVerifier,
    calls: AtomicUsize,
    gate: watch::Sender<bool>,
}

impl Verifier for Snapshot {
    async fn verify(&self, key: &ApiKey) -> Result<Verdict, VerifyError> {
        let verdict = self.keys.verify(key).await;
        self.calls.fetch_add(1, Ordering::SeqCst);
        let mut gate = self.gate.subscribe();
        let _ = gate.wait_for(|open| *open).await;
        verdict
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lookup_after_an_invalidation_does_not_join_a_call_from_before_it() {
    let backend =
        Arc::new(Snapshot { keys: StaticVerifier::new(), calls: AtomicUsize::new(0), gate: watch::channel(false).0 });
    let key = ApiKey::generate("kg").unwrap();
    backend.keys.insert(&key, Principal::builder("k1").build());
    let v = CachedVerifier::builder(Arc::clone(&backend)).build();
    let calls = |n: usize| {
        let backend = Arc::clone(&backend);
        async move {
            timeout(LIMIT, async {
                while backend.calls.load(Ordering::SeqCst) < n {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await
            .expect("the backend was not asked")
        }
    };
    // A lookup is in flight with the backend's answer from before the revocation.
    let before = tokio::spawn({
        let (v, key) = (v.clone(), key.clone());
        async move { v.verify(&key).await }
    });
    calls(1).await;
    backend.keys.revoke("k1");
    v.invalidate_key_id("k1").await;
    // A lookup that starts after the invalidation returned must ask again.
    let after = tokio::spawn({
        let (v, key) = (v.clone(), key.clone());
        async move { v.verify(&key).await }
    });
    let asked_again = timeout(Duration::from_millis(500), calls(2)).await.is_ok();
    backend.gate.send_replace(true);
    let _ = timeout(LIMIT, before).await.unwrap().unwrap();
    let after = timeout(LIMIT, after).await.unwrap().unwrap();
    assert!(asked_again, "the later lookup joined the call made before the invalidation");
    assert!(is_invalid(&after, Reason::Revoked), "a revoked key was served as {after:?}");
}

#[tokio::test]
async fn invalidating_a_key_id_drops_its_refusals_too() {
    let backend = Backend::new(Duration::ZERO);
    let key = backend.add("k1");
    let other = backend.add("k2");
    backend.keys.set_disabled("k1", true);
    backend.keys.set_disabled("k2", true);
    let v = cache(&backend).negative_ttl(Duration::from_secs(60)).build();
    assert!(is_invalid(&v.verify(&key).await, Reason::Disabled));
    assert!(is_invalid(&v.verify(&other).await, Reason::Disabled));
    assert!(is_invalid(&v.verify(&key).await, Reason::Disabled));
    assert_eq!(backend.calls(), 2, "the refusals were cached");

    // Enabled again and announced: the next lookup asks again and passes at once,
    // while the other key's refusal stays cached.
    backend.keys.set_disabled("k1", false);
    v.invalidate_key_id("k1").await;
    assert!(is_valid(&v.verify(&key).await));
    assert!(is_invalid(&v.verify(&other).await, Reason::Disabled));
    assert_eq!(backend.calls(), 3);
}

/// A thread of its own, with its own per-thread copies of hot verdicts: it answers
/// each key it is sent with what the cache says on that thread.
struct OtherThread {
    ask: std::sync::mpsc::Sender<ApiKey>,
    answers: std::sync::mpsc::Receiver<(bool, Result<Verdict, VerifyError>)>,
}

impl OtherThread {
    fn start(v: CachedVerifier<Arc<Backend>>) -> Self {
        let (ask, keys) = std::sync::mpsc::channel::<ApiKey>();
        let (reply, answers) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            for key in keys {
                // `verify_now` answers only from what is held fresh (copy or moka).
                let held = matches!(v.verify_now(&key), Some(Ok(Verdict::Valid(_))));
                let full = rt.block_on(async { timeout(LIMIT, v.verify(&key)).await.expect("verify hung") });
                if reply.send((held, full)).is_err() {
                    return;
                }
            }
        });
        Self { ask, answers }
    }

    fn check(&self, key: &ApiKey) -> (bool, Result<Verdict, VerifyError>) {
        self.ask.send(key.clone()).unwrap();
        self.answers.recv_timeout(LIMIT).expect("the other thread answers")
    }
}

#[tokio::test]
async fn another_threads_copies_are_retired_by_invalidate_key_id() {
    let backend = Backend::new(Duration::ZERO);
    let key = backend.add("k1");
    let v = cache(&backend).positive_ttl(Duration::from_secs(600)).build();
    let other = OtherThread::start(v.clone());
    // The other thread sees the key several times: it now holds its own copy.
    for _ in 0..5 {
        let (held, full) = other.check(&key);
        assert!(is_valid(&full));
        let _ = held;
    }
    assert!(other.check(&key).0, "held fresh on the other thread");
    assert_eq!(backend.calls(), 1);
    backend.keys.revoke("k1");
    assert_eq!(v.invalidate_key_id("k1").await, 1);
    // The very next lookup on that thread refuses the key, although its copy would
    // still be fresh for ten minutes.
    let (held, full) = other.check(&key);
    assert!(!held, "a retired copy is not served");
    assert!(is_invalid(&full, Reason::Revoked));
    assert_eq!(backend.calls(), 2);
}

#[tokio::test]
async fn another_threads_copies_are_retired_by_invalidate_all() {
    let backend = Backend::new(Duration::ZERO);
    let key = backend.add("k1");
    let v = cache(&backend).positive_ttl(Duration::from_secs(600)).build();
    let other = OtherThread::start(v.clone());
    for _ in 0..5 {
        assert!(is_valid(&other.check(&key).1));
    }
    assert!(other.check(&key).0);
    backend.keys.revoke("k1");
    v.invalidate_all();
    let (held, full) = other.check(&key);
    assert!(!held);
    assert!(is_invalid(&full, Reason::Revoked));
}

#[tokio::test]
async fn copies_are_never_shared_between_caches() {
    // Two caches, one thread: the key is valid for the first cache's backend only.
    let backend = Backend::new(Duration::ZERO);
    let key = backend.add("k1");
    let a = cache(&backend).positive_ttl(Duration::from_secs(600)).build();
    let b = cache(&Backend::new(Duration::ZERO)).positive_ttl(Duration::from_secs(600)).build();
    for _ in 0..5 {
        assert!(is_valid(&verify(&a, &key).await));
    }
    assert!(matches!(a.verify_now(&key), Some(Ok(Verdict::Valid(_)))));
    assert!(b.verify_now(&key).is_none(), "b has never seen the key");
    assert!(is_invalid(&verify(&b, &key).await, Reason::NotFound));
    assert!(is_valid(&verify(&a, &key).await));
}

#[tokio::test]
async fn copies_keep_the_ttl_and_the_counters() {
    for copies in [true, false] {
        let backend = Backend::new(Duration::ZERO);
        let key = backend.add("k1");
        let v = cache(&backend).thread_copies(copies).build();
        for _ in 0..100 {
            assert!(is_valid(&verify(&v, &key).await));
        }
        let s = v.stats();
        assert_eq!((s.misses, s.hits), (1, 99), "copies: {copies}");
        tokio::time::sleep(SHORT + Duration::from_millis(50)).await;
        assert!(v.verify_now(&key).is_none(), "past the TTL nothing is fresh (copies: {copies})");
        assert!(is_valid(&verify(&v, &key).await));
        assert_eq!(backend.calls(), 2, "copies: {copies}");
    }
}
