//! Caller authentication: `Authorization: Bearer <token>`, checked against the active
//! tokens of the route's kind (service: verify, usage, events; admin: everything else).
//!
//! The tokens are records of the store ([`TokenInfo`]) plus the bootstrap tokens
//! configured at start; the hot path never reads the store. [`TokenTable`] keeps their
//! digests in memory and is reloaded at once after a change made here, and, on a store
//! several replicas share, when another replica's change note arrives (PostgreSQL
//! `NOTIFY`), after the feed of those notes reconnects, and every 30 s in any case.
//!
//! The presented token is hashed with SHA-256 and compared with every active digest in
//! constant time ([`subtle`]), without stopping at a match, so neither the content, the
//! length nor the position of a token leaks through timing. When each token was last
//! used is kept in memory and written every 30 s, never on the request path.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::header::AUTHORIZATION;
use http::request::Parts;
use subtle::ConstantTimeEq;
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};

use super::error::ApiError;
use super::events::{ChangeNote, EventHub};
use super::store::{ActiveToken, ChangeSink, Store, StoreError, now_ms, to_ms};
use super::token::{BOOTSTRAP_ADMIN, BOOTSTRAP_SERVICE, TokenInfo, TokenKind, display_prefix};
use crate::key::KeyDigest;

/// How often each replica writes when its tokens were last used, and reloads the tokens
/// besides the change notes that reload them at once: 30 s.
pub const TOKEN_SYNC_INTERVAL: Duration = Duration::from_secs(30);
/// A use this close to the last one noted is not noted again (spares a shared write on
/// every request).
const USE_RESOLUTION_MS: i64 = 1000;

/// One token the key service accepts.
pub(crate) struct TokenEntry {
    info: TokenInfo,
    digest: KeyDigest,
    /// Unix ms of the last use noted here (0: none).
    used_ms: AtomicI64,
    /// Unix ms of the last use written to the store.
    written_ms: AtomicI64,
    /// `true` once the token is no longer active: its event streams end.
    revoked: watch::Sender<bool>,
}

impl TokenEntry {
    fn new(info: TokenInfo, digest: KeyDigest) -> Self {
        let stored = info.last_used_at.map_or(0, to_ms);
        Self {
            info,
            digest,
            used_ms: AtomicI64::new(stored),
            written_ms: AtomicI64::new(stored),
            revoked: watch::Sender::new(false),
        }
    }

    fn note_use(&self) {
        let now = to_ms(OffsetDateTime::now_utc());
        if now - self.used_ms.load(Ordering::Relaxed) >= USE_RESOLUTION_MS {
            self.used_ms.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// The token's fields, with the last use noted here.
    pub(crate) fn info(&self) -> TokenInfo {
        let mut info = self.info.clone();
        let used = self.used_ms.load(Ordering::Relaxed);
        if used > 0 {
            info.last_used_at = super::store::from_ms(used).ok().or(info.last_used_at);
        }
        info
    }
}

impl std::fmt::Debug for TokenEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Token").field("id", &self.info.id).field("name", &self.info.name).finish_non_exhaustive()
    }
}

/// The tokens accepted now, by digest: the store's active ones and the bootstrap ones.
pub(crate) struct TokenTable {
    entries: RwLock<Arc<[Arc<TokenEntry>]>>,
    bootstrap: Vec<Arc<TokenEntry>>,
    /// Serializes reloads, so that an older read never replaces a newer one.
    reloading: tokio::sync::Mutex<()>,
    changed: Notify,
}

impl std::fmt::Debug for TokenTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenTable").field("tokens", &self.snapshot().len()).finish_non_exhaustive()
    }
}

/// A configured token: (kind, raw token).
pub(crate) type Bootstrap<'a> = (TokenKind, &'a str);

impl TokenTable {
    /// A table of the bootstrap tokens only; [`reload`](Self::reload) adds the store's.
    pub(crate) fn new(bootstrap: &[Bootstrap<'_>]) -> Self {
        let started = now_ms();
        let bootstrap: Vec<Arc<TokenEntry>> = bootstrap
            .iter()
            .map(|&(kind, token)| {
                let name = match kind {
                    TokenKind::Admin => BOOTSTRAP_ADMIN,
                    TokenKind::Service => BOOTSTRAP_SERVICE,
                };
                let info = TokenInfo {
                    id: name.to_owned(),
                    name: name.to_owned(),
                    kind,
                    prefix: display_prefix(token),
                    bootstrap: true,
                    created_at: started,
                    last_used_at: None,
                    revoked_at: None,
                };
                Arc::new(TokenEntry::new(info, KeyDigest::of(token.as_bytes())))
            })
            .collect();
        Self {
            entries: RwLock::new(bootstrap.clone().into()),
            bootstrap,
            reloading: tokio::sync::Mutex::new(()),
            changed: Notify::new(),
        }
    }

    fn snapshot(&self) -> Arc<[Arc<TokenEntry>]> {
        self.entries.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The active token the request carries, if it is of `kind`.
    pub(crate) fn authenticate(&self, parts: &Parts, kind: TokenKind) -> Result<Arc<TokenEntry>, ApiError> {
        let got = presented(parts)?;
        let snapshot = self.snapshot();
        let mut found: Option<&Arc<TokenEntry>> = None;
        // Every digest is compared, a match or not: the time taken does not say which.
        for entry in snapshot.iter() {
            if bool::from(entry.digest.as_bytes().ct_eq(got.as_bytes())) {
                found = Some(entry);
            }
        }
        match found {
            Some(entry) if entry.info.kind == kind => {
                entry.note_use();
                Ok(Arc::clone(entry))
            }
            _ => Err(ApiError::Unauthorized("invalid token for this route")),
        }
    }

    /// Whether an admin token is accepted now.
    pub(crate) fn has_admin(&self) -> bool {
        self.snapshot().iter().any(|e| e.info.kind == TokenKind::Admin)
    }

    /// The bootstrap tokens' fields.
    pub(crate) fn bootstrap_infos(&self) -> Vec<TokenInfo> {
        self.bootstrap.iter().map(|e| e.info()).collect()
    }

    /// The last use noted here of a stored token, if later than the store's.
    pub(crate) fn noted_use(&self, id: &str) -> Option<OffsetDateTime> {
        let snapshot = self.snapshot();
        let entry = snapshot.iter().find(|e| !e.info.bootstrap && e.info.id == id)?;
        entry.info().last_used_at
    }

    /// Asks the background task to reload (a change note arrived).
    pub(crate) fn changed(&self) {
        self.changed.notify_one();
    }

    /// Reads the active tokens from the store and accepts exactly those (and the
    /// bootstrap ones) from now on; the event streams of tokens no longer active end.
    pub(crate) async fn reload(&self, store: &Store) -> Result<(), StoreError> {
        let _one_at_a_time = self.reloading.lock().await;
        let active = store.active_tokens().await?;
        let old = self.snapshot();
        let mut next: Vec<Arc<TokenEntry>> = Vec::with_capacity(active.len() + self.bootstrap.len());
        for ActiveToken { info, digest } in active {
            // The same entry stays (its uses noted and its streams open).
            match old.iter().find(|e| !e.info.bootstrap && e.info.id == info.id) {
                Some(e) => next.push(Arc::clone(e)),
                None => next.push(Arc::new(TokenEntry::new(info, digest))),
            }
        }
        for b in &self.bootstrap {
            if next.iter().any(|e| e.digest == b.digest) {
                tracing::warn!(name = %b.info.name, "a configured token is also stored; the stored one applies");
            } else {
                next.push(Arc::clone(b));
            }
        }
        // Bootstrap entries live as long as the process: one shadowed by a stored copy
        // comes back when the copy goes, so its streams must not be told it is revoked.
        let gone: Vec<&Arc<TokenEntry>> =
            old.iter().filter(|o| !o.info.bootstrap && !next.iter().any(|n| Arc::ptr_eq(n, o))).collect();
        *self.entries.write().unwrap_or_else(|e| e.into_inner()) = next.into();
        for entry in gone {
            tracing::info!(token = %entry.info.name, kind = %entry.info.kind, "token no longer active; closing its event streams");
            entry.revoked.send_replace(true);
        }
        Ok(())
    }

    /// Writes the uses noted since the last write (stored tokens only).
    pub(crate) async fn flush_uses(&self, store: &Store) -> Result<(), StoreError> {
        let snapshot = self.snapshot();
        let due: Vec<(&Arc<TokenEntry>, i64)> = snapshot
            .iter()
            .filter(|e| !e.info.bootstrap)
            .filter_map(|e| {
                let used = e.used_ms.load(Ordering::Relaxed);
                (used > e.written_ms.load(Ordering::Relaxed)).then_some((e, used))
            })
            .collect();
        let rows: Vec<(String, i64)> = due.iter().map(|(e, used)| (e.info.id.clone(), *used)).collect();
        store.touch_tokens(&rows).await?;
        for (e, used) in due {
            e.written_ms.fetch_max(used, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// Keeps a [`TokenTable`] in step with the store: reloads on change notes and every
/// [`TOKEN_SYNC_INTERVAL`], when it also writes the uses noted. Stops when dropped.
pub(crate) struct TokenTask(tokio::task::JoinHandle<()>);

impl TokenTask {
    pub(crate) fn spawn(table: Arc<TokenTable>, store: Store) -> Self {
        Self(tokio::spawn(async move {
            let mut tick = tokio::time::interval(TOKEN_SYNC_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                let periodic = tokio::select! {
                    () = table.changed.notified() => false,
                    _ = tick.tick() => true,
                };
                if periodic {
                    if let Err(e) = table.flush_uses(&store).await {
                        tracing::warn!(error = %e, "cannot write when tokens were last used; trying again later");
                    }
                }
                if let Err(e) = table.reload(&store).await {
                    tracing::warn!(error = %e, "cannot reload the tokens; the ones loaded before still apply");
                }
            }
        }))
    }
}

impl Drop for TokenTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Where the store's change notes go: token notes to the token table, the others to
/// the event hub. A `reset` (the feed reconnected after a gap, or a bulk change)
/// reloads the tokens too: a token change may have been missed.
#[derive(Debug)]
pub(crate) struct Sink {
    pub(crate) hub: EventHub,
    pub(crate) tokens: Arc<TokenTable>,
}

impl ChangeSink for Sink {
    fn publish(&self, note: &ChangeNote, id: Option<u64>) {
        match note {
            ChangeNote::Tokens => self.tokens.changed(),
            ChangeNote::Reset(_) => {
                self.tokens.changed();
                self.hub.publish(note, id);
            }
            _ => self.hub.publish(note, id),
        }
    }

    fn position(&self) -> u64 {
        self.hub.position()
    }

    fn skip_to(&self, id: u64) {
        self.hub.advance_to(id);
    }
}

/// Proof that the request carried an active admin token; its name is the audit actor.
#[derive(Debug, Clone)]
pub struct Admin {
    token: Arc<TokenEntry>,
}

impl Admin {
    pub(crate) fn new(token: Arc<TokenEntry>) -> Self {
        Self { token }
    }

    /// The audit log's actor: the token's name (`bootstrap-admin` for the configured one).
    pub fn actor(&self) -> &str {
        &self.token.info.name
    }

    /// The token's id.
    pub fn token_id(&self) -> &str {
        &self.token.info.id
    }
}

/// Proof that the request carried an active service token.
#[derive(Debug, Clone)]
pub struct Service {
    token: Arc<TokenEntry>,
}

impl Service {
    pub(crate) fn new(token: Arc<TokenEntry>) -> Self {
        Self { token }
    }

    /// The token's name.
    pub fn name(&self) -> &str {
        &self.token.info.name
    }

    /// Turns `true` when the token is revoked.
    pub(crate) fn revoked(&self) -> watch::Receiver<bool> {
        self.token.revoked.subscribe()
    }
}

fn presented(parts: &Parts) -> Result<KeyDigest, ApiError> {
    let mut values = parts.headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(ApiError::Unauthorized("missing `Authorization: Bearer <token>`"))?;
    if values.next().is_some() {
        return Err(ApiError::Unauthorized("more than one Authorization header"));
    }
    let value = value.to_str().map_err(|_| ApiError::Unauthorized("the Authorization header is not ASCII"))?;
    let (scheme, token) = value.split_once(' ').ok_or(ApiError::Unauthorized("expected `Bearer <token>`"))?;
    let token = token.trim_start_matches(' ');
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(ApiError::Unauthorized("expected `Bearer <token>`"));
    }
    Ok(KeyDigest::of(token.as_bytes()))
}
