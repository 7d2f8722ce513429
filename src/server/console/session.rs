//! Console sessions, held in memory: a random id in the cookie, the admin token and a
//! CSRF token on the server.
//!
//! The session keeps the admin token it was opened with (zeroized when it ends, never
//! logged or printed): each page checks it against the token table again, so a revoked
//! token's session stops working on its next request, and the console's changes go
//! through the admin API's own handlers with that token, audited under its name.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use zeroize::Zeroizing;

/// The session cookie's name.
pub(crate) const COOKIE: &str = "keygate_console";

/// A signed-in browser.
pub(crate) struct Session {
    /// The admin token signed in with.
    pub(crate) token: Zeroizing<String>,
    /// The token's name: the audit actor of every change made in this session.
    pub(crate) actor: String,
    /// Sent in every form, checked on every POST.
    pub(crate) csrf: String,
    /// A created or rotated key waiting to be shown, once: (key id, raw key).
    pub(crate) reveal: Option<(String, Zeroizing<String>)>,
    created: Instant,
    seen: Instant,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("actor", &self.actor).finish_non_exhaustive()
    }
}

/// The sessions, bounded in count and lifetime.
#[derive(Debug)]
pub(crate) struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    idle: Duration,
    absolute: Duration,
    max: usize,
}

/// 32 random bytes, base64url without padding (43 characters).
pub(crate) fn random_id() -> Option<String> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    getrandom::fill(bytes.as_mut()).ok()?;
    Some(URL_SAFE_NO_PAD.encode(bytes.as_ref()))
}

impl Sessions {
    pub(crate) fn new(idle: Duration, absolute: Duration, max: usize) -> Self {
        Self { map: Mutex::new(HashMap::new()), idle, absolute, max }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live(&self, s: &Session, now: Instant) -> bool {
        now.duration_since(s.seen) < self.idle && now.duration_since(s.created) < self.absolute
    }

    /// Opens a session for `token` (named `actor`); returns its id, or `None` when the
    /// system has no randomness to give.
    pub(crate) fn open(&self, token: Zeroizing<String>, actor: String) -> Option<String> {
        let id = random_id()?;
        let csrf = random_id()?;
        let now = Instant::now();
        let mut map = self.lock();
        if map.len() >= self.max {
            map.retain(|_, s| now.duration_since(s.seen) < self.idle && now.duration_since(s.created) < self.absolute);
        }
        if map.len() >= self.max {
            // Only holders of an admin token open sessions: dropping the least recently
            // used one bounds memory without locking anyone out.
            if let Some(oldest) = map.iter().min_by_key(|(_, s)| s.seen).map(|(k, _)| k.clone()) {
                map.remove(&oldest);
            }
        }
        map.insert(id.clone(), Session { token, actor, csrf, reveal: None, created: now, seen: now });
        Some(id)
    }

    /// Runs `f` on the live session `id` (noting the use); an expired one is removed.
    pub(crate) fn with<R>(&self, id: &str, f: impl FnOnce(&mut Session) -> R) -> Option<R> {
        let now = Instant::now();
        let mut map = self.lock();
        let live = self.live(map.get(id)?, now);
        if !live {
            map.remove(id);
            return None;
        }
        let s = map.get_mut(id)?;
        s.seen = now;
        Some(f(s))
    }

    /// Ends the session `id`.
    pub(crate) fn close(&self, id: &str) {
        self.lock().remove(id);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token() -> Zeroizing<String> {
        Zeroizing::new("kga_test".into())
    }

    #[test]
    fn ids_are_43_url_safe_characters_and_differ() {
        let a = random_id().unwrap();
        let b = random_id().unwrap();
        assert_eq!(a.len(), 43);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        assert_ne!(a, b);
    }

    #[test]
    fn the_count_is_bounded_and_the_least_recently_used_goes() {
        let s = Sessions::new(Duration::from_secs(60), Duration::from_secs(60), 2);
        let a = s.open(token(), "a".into()).unwrap();
        let b = s.open(token(), "b".into()).unwrap();
        std::thread::sleep(Duration::from_millis(2));
        assert!(s.with(&a, |_| ()).is_some());
        let c = s.open(token(), "c".into()).unwrap();
        assert_eq!(s.len(), 2);
        assert!(s.with(&b, |_| ()).is_none(), "b was used least recently");
        assert!(s.with(&a, |_| ()).is_some() && s.with(&c, |_| ()).is_some());
    }

    #[test]
    fn idle_and_absolute_expiry_end_a_session() {
        let idle = Sessions::new(Duration::from_millis(20), Duration::from_secs(60), 10);
        let a = idle.open(token(), "a".into()).unwrap();
        std::thread::sleep(Duration::from_millis(40));
        assert!(idle.with(&a, |_| ()).is_none());
        let absolute = Sessions::new(Duration::from_secs(60), Duration::from_millis(40), 10);
        let b = absolute.open(token(), "b".into()).unwrap();
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(15));
            let _ = absolute.with(&b, |_| ());
        }
        std::thread::sleep(Duration::from_millis(15));
        assert!(absolute.with(&b, |_| ()).is_none(), "used all along, but past the absolute expiry");
    }
}
