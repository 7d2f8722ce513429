use std::collections::HashMap;
use std::future::Future;
use std::sync::RwLock;

use time::OffsetDateTime;

use super::{Reason, Verdict, Verifier, VerifyError};
use crate::key::{ApiKey, DigestHash, KeyDigest};
use crate::principal::Principal;

/// Keys held in memory, stored by digest: for tests, demos and small deployments.
///
/// Lookups go by SHA-256 digest, so the raw keys are not kept and the comparison that
/// decides a match is between fixed 32-byte digests. Keys can be revoked or disabled
/// at run time; a key past its principal's `expires_at` answers `Expired`.
///
/// ```
/// use keygate::{ApiKey, Principal, Reason, StaticVerifier, Verdict, Verifier};
///
/// # tokio_test();
/// # fn tokio_test() { tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let key = ApiKey::generate("kg").unwrap();
/// let verifier = StaticVerifier::new().with_key(&key, Principal::builder("key_1").build());
/// assert!(matches!(verifier.verify(&key).await, Ok(Verdict::Valid(_))));
/// verifier.revoke("key_1");
/// assert!(matches!(verifier.verify(&key).await, Ok(Verdict::Invalid { reason: Reason::Revoked, .. })));
/// # }) }
/// ```
#[derive(Debug, Default)]
pub struct StaticVerifier {
    keys: RwLock<HashMap<[u8; 32], Entry, DigestHash>>,
}

#[derive(Debug, Clone)]
struct Entry {
    principal: Principal,
    state: Option<Reason>,
}

impl StaticVerifier {
    /// An empty verifier: every key is `NotFound`.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key (builder style).
    #[must_use]
    pub fn with_key(self, key: &ApiKey, principal: Principal) -> Self {
        self.insert(key, principal);
        self
    }

    /// Adds or replaces a key.
    pub fn insert(&self, key: &ApiKey, principal: Principal) {
        self.insert_digest(key.digest(), principal);
    }

    /// Adds a key known only by its digest.
    pub fn insert_digest(&self, digest: KeyDigest, principal: Principal) {
        self.write().insert(*digest.as_bytes(), Entry { principal, state: None });
    }

    /// Marks every key with this id revoked. Returns how many were.
    pub fn revoke(&self, key_id: &str) -> usize {
        self.set_state(key_id, Some(Reason::Revoked))
    }

    /// Marks every key with this id disabled (or enabled again with `false`).
    pub fn set_disabled(&self, key_id: &str, disabled: bool) -> usize {
        self.set_state(key_id, disabled.then_some(Reason::Disabled))
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no keys are held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn set_state(&self, key_id: &str, state: Option<Reason>) -> usize {
        let mut n = 0;
        for e in self.write().values_mut().filter(|e| e.principal.key_id() == key_id) {
            // Revocation is final: disabling or enabling never un-revokes.
            if e.state != Some(Reason::Revoked) {
                e.state = state;
            }
            n += 1;
        }
        n
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<[u8; 32], Entry, DigestHash>> {
        // A panic while holding the lock cannot leave the map half-written (each
        // operation is one insert or flag store), so poisoning is safe to ignore.
        self.keys.write().unwrap_or_else(|e| e.into_inner())
    }

    fn lookup(&self, key: &ApiKey) -> Verdict {
        self.lookup_digest(&key.digest())
    }

    fn lookup_digest(&self, digest: &KeyDigest) -> Verdict {
        let keys = self.keys.read().unwrap_or_else(|e| e.into_inner());
        match keys.get(digest.as_bytes()) {
            None => Verdict::invalid(Reason::NotFound),
            Some(Entry { state: Some(reason), principal }) => {
                Verdict::invalid_key(*reason, principal.key_id_arc().clone())
            }
            Some(Entry { principal, .. })
                if principal.expires_at().is_some_and(|at| at <= OffsetDateTime::now_utc()) =>
            {
                Verdict::invalid_key(Reason::Expired, principal.key_id_arc().clone())
            }
            Some(Entry { principal, .. }) => Verdict::Valid(principal.clone()),
        }
    }
}

impl Verifier for StaticVerifier {
    async fn verify(&self, key: &ApiKey) -> Result<Verdict, VerifyError> {
        Ok(self.lookup(key))
    }

    fn verify_now(&self, key: &ApiKey) -> Option<Result<Verdict, VerifyError>> {
        Some(Ok(self.lookup(key)))
    }

    fn verify_digests(
        &self,
        digests: &[KeyDigest],
    ) -> Option<impl Future<Output = Result<Vec<Verdict>, VerifyError>> + Send> {
        Some(std::future::ready(Ok(digests.iter().map(|d| self.lookup_digest(d)).collect())))
    }
}
