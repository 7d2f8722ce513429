//! A verdict cached while `invalidate_all` runs on another thread must still be
//! removable by key id: `RevocationListener` drops the whole cache on every
//! (re)connect, and a revocation arriving just after must not miss an entry stored
//! during that drop. Two OS threads, bounded loops, then one revocation per key.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use keygate::{ApiKey, CachedVerifier, MissBudget, Principal, Reason, StaticVerifier, Verdict, Verifier};

const ROUNDS: usize = 100_000;
const KEYS: usize = 32;
/// Every this many rounds the verifying thread also revokes the key it just cached.
/// Not every round: until moka's housekeeping retires a key id's predicate every read
/// tests it, which is slow in an unoptimised build. Coprime with KEYS, so the checks
/// visit every key.
const CHECK_EVERY: usize = 251;

fn key_id(i: usize) -> String {
    format!("key_{i}")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

#[test]
fn a_verdict_cached_during_invalidate_all_is_still_removable_by_key_id() {
    let backend = Arc::new(StaticVerifier::new());
    let keys: Vec<ApiKey> = (0..KEYS)
        .map(|i| {
            let key = ApiKey::generate("kg").unwrap();
            backend.insert(&key, Principal::builder(key_id(i)).build());
            key
        })
        .collect();
    // Long TTLs: whatever the loop leaves cached would be served for ten minutes.
    let v = CachedVerifier::builder(Arc::clone(&backend))
        .positive_ttl(Duration::from_secs(600))
        .negative_ttl(Duration::from_secs(600))
        // Every lookup here is a miss by design: the budget for floods of unknown keys
        // would refuse them.
        .miss_budget(MissBudget::unlimited())
        .build();

    // Each round the verifying thread caches one key's verdict while the other thread
    // may be dropping the cache; now and then it revokes that key by id at once: a
    // verdict still held after that is a survivor.
    let survivors_in_loop = AtomicUsize::new(0);
    let done = AtomicBool::new(false);
    let drops = std::thread::scope(|s| {
        let dropper = s.spawn(|| {
            // As long as the verifying thread runs (at most ROUNDS rounds), so that the
            // two overlap for the whole loop.
            let mut drops = 0;
            while drops < ROUNDS && !done.load(Ordering::Relaxed) {
                v.invalidate_all();
                drops += 1;
            }
            drops
        });
        s.spawn(|| {
            // Stops the dropper even when an assertion below fails.
            struct Done<'a>(&'a AtomicBool);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.store(true, Ordering::Relaxed);
                }
            }
            let _done = Done(&done);
            runtime().block_on(async {
                for round in 0..ROUNDS {
                    let i = round % KEYS;
                    let verdict = v.verify(&keys[i]).await;
                    assert!(matches!(verdict, Ok(Verdict::Valid(_))), "round {round}: {verdict:?}");
                    if round % CHECK_EVERY == 0 {
                        v.invalidate_key_id(&key_id(i)).await;
                        if matches!(v.verify_now(&keys[i]), Some(Ok(Verdict::Valid(_)))) {
                            survivors_in_loop.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            });
        });
        dropper.join().unwrap()
    });
    assert!(drops > 0);
    let survivors_in_loop = survivors_in_loop.into_inner();

    // Then, with both threads stopped, every key is revoked at the source and announced
    // by key id: nothing the loop left cached may still be served.
    let survivors = runtime().block_on(async {
        for i in 0..KEYS {
            assert_eq!(backend.revoke(&key_id(i)), 1);
        }
        let mut survivors = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            v.invalidate_key_id(&key_id(i)).await;
            let held = matches!(v.verify_now(key), Some(Ok(Verdict::Valid(_))));
            let verdict = v.verify(key).await;
            let refused = matches!(verdict, Ok(Verdict::Invalid { reason: Reason::Revoked, .. }));
            if held || !refused {
                survivors.push(key_id(i));
            }
        }
        survivors
    });
    assert_eq!(survivors_in_loop, 0, "verdicts still held after their key id was invalidated, in {ROUNDS} rounds");
    assert!(survivors.is_empty(), "{} of {KEYS} keys still served after revocation: {survivors:?}", survivors.len());
}
