//! The driver's two schedules: key changes (revoke, disable and re-enable, rotate with
//! and without grace, create) every half second through either replica, each recorded
//! in the truth before it is sent; and the infrastructure (event stream cuts, replica
//! restarts) on a fixed timetable.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keygate::ApiKey;
use keygate::client::{AdminClient, CreatedKey, KeyPatch, NewKey};
use time::OffsetDateTime;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

/// One admin call through the next replica that is up: `admin!(keys, a => a.revoke(&id))`.
/// (A macro, not a method taking an async closure: such a future is not `Send` enough
/// for `tokio::spawn` today.)
macro_rules! admin {
    ($keys:expr, $a:ident => $call:expr) => {
        match $keys.gate().await {
            Ok((gate, i)) => {
                let $a = gate.as_ref().expect("the gate holds an up replica");
                $call.await.map_err(|e| format!("through replica {}: {e}", ["A", "B"][i]))
            }
            Err(e) => Err(e),
        }
    };
}

use crate::load::Pool;
use crate::procs::Replica;
use crate::proxy::Proxy;
use crate::truth::{KeyState, KeyTruth, Rotation, Secret, Stream};

/// A replica's admin API; `None` while it is down. The infrastructure schedule holds
/// the lock while the replica is down, so no admin call is ever cut in the middle
/// (a change half made would leave the truth unknown).
pub type Gate = Arc<AsyncMutex<Option<AdminClient>>>;

/// How long a secret made invalid stays in the pool, so that requests keep checking
/// that it is refused.
const KEEP_DEAD: Duration = Duration::from_secs(20);
const GRACES: [u64; 3] = [0, 5, 20];

/// Maps the key service's wall-clock times (a grace's end) to the driver's clock.
#[derive(Clone, Copy)]
pub struct Clock {
    instant: Instant,
    wall: OffsetDateTime,
}

impl Clock {
    pub fn now() -> Self {
        Self { instant: Instant::now(), wall: OffsetDateTime::now_utc() }
    }

    fn instant(&self, at: OffsetDateTime) -> Instant {
        let d = at - self.wall;
        if d.is_negative() {
            self.instant - Duration::try_from(-d).unwrap_or_default()
        } else {
            self.instant + Duration::try_from(d).unwrap_or_default()
        }
    }
}

/// Counts of what the key schedule did.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    pub created: u64,
    pub revoked: u64,
    pub disabled: u64,
    pub enabled: u64,
    pub rotated: [u64; 3],
    pub failed: u64,
    /// Through replica A, through B.
    pub through: [u64; 2],
}

struct Slot {
    key: Arc<KeyTruth>,
    secrets: Vec<Arc<Secret>>,
    generation: u32,
    disabled_until: Option<Instant>,
}

pub struct Keys {
    gates: [Gate; 2],
    next: usize,
    slots: Vec<Slot>,
    /// Secrets made invalid, with when they leave the pool.
    dead: Vec<(Instant, Arc<Secret>)>,
    unknown: Vec<Arc<Secret>>,
    pub pool: Arc<Pool>,
    clock: Clock,
    pub changes: Changes,
}

fn new_key(n: usize) -> NewKey {
    let mut scopes = vec!["reports:read".to_owned()];
    if n % 2 == 0 {
        scopes.push("reports:write".to_owned());
    }
    let roles = if n % 4 == 1 { vec!["admin".to_owned()] } else { Vec::new() };
    NewKey { owner: format!("owner-{}", n % 10), name: format!("soak-{n}"), scopes, roles, ..Default::default() }
}

impl Keys {
    /// `slots` keys, made through both replicas, and 20 keys nobody issued.
    pub async fn create(gates: [Gate; 2], slots: usize, clock: Clock) -> Result<Self, String> {
        let mut keys = Self {
            gates,
            next: 0,
            slots: Vec::new(),
            dead: Vec::new(),
            unknown: Vec::new(),
            pool: Arc::new(Pool::new(Arc::new(Vec::new()))),
            clock,
            changes: Changes::default(),
        };
        admin!(keys, a => a.put_role("admin", Vec::<String>::new()))?;
        for n in 0..slots {
            let slot = keys.new_slot(n).await?;
            keys.slots.push(slot);
        }
        for n in 0..20 {
            let key = KeyTruth::new(format!("unknown-{n}"), false, false, false);
            let api_key = ApiKey::generate("kg").map_err(|e| e.to_string())?;
            let label = format!("unknown-{n}");
            keys.unknown.push(Arc::new(Secret {
                key,
                api_key,
                label,
                born: Instant::now(),
                rotation: Mutex::new(None),
            }));
        }
        keys.publish();
        Ok(keys)
    }

    async fn new_slot(&mut self, n: usize) -> Result<Slot, String> {
        let spec = new_key(n);
        let (write, admin) = (spec.scopes.len() == 2, !spec.roles.is_empty());
        let created: CreatedKey = admin!(self, a => a.create_key(spec))?;
        self.changes.created += 1;
        let key = KeyTruth::new(created.key_id.clone(), write, admin, true);
        let secret = Arc::new(Secret {
            key: Arc::clone(&key),
            api_key: created.key,
            label: format!("{}#0", created.key_id),
            born: Instant::now(),
            rotation: Mutex::new(None),
        });
        Ok(Slot { key, secrets: vec![secret], generation: 0, disabled_until: None })
    }

    /// The next replica that is up, held so that it stays up for one admin call.
    async fn gate(&mut self) -> Result<(OwnedMutexGuard<Option<AdminClient>>, usize), String> {
        let first = self.next % 2;
        self.next += 1;
        for attempt in 0..40 {
            let i = (first + attempt) % 2;
            // The preferred replica if it is free and up; else wait for the other.
            let gate = if attempt == 0 {
                match Arc::clone(&self.gates[i]).try_lock_owned() {
                    Ok(g) => g,
                    Err(_) => continue,
                }
            } else {
                Arc::clone(&self.gates[i]).lock_owned().await
            };
            if gate.is_some() {
                self.changes.through[i] += 1;
                return Ok((gate, i));
            }
            drop(gate);
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        Err("no replica up for 20 s".into())
    }

    fn publish(&self) {
        let mut all: Vec<Arc<Secret>> = self.slots.iter().flat_map(|s| s.secrets.iter().cloned()).collect();
        all.extend(self.dead.iter().map(|(_, s)| Arc::clone(s)));
        all.extend(self.unknown.iter().cloned());
        *self.pool.write().unwrap() = Arc::new(all);
    }

    /// A change failed: what the key service did is unknown, so the key leaves the pool
    /// at once (answers in flight are judged as in a transition) and a new one replaces it.
    async fn quarantine(&mut self, i: usize, why: String) {
        eprintln!("soak: admin call failed ({why}); key {} taken out of the pool", self.slots[i].key.id);
        self.changes.failed += 1;
        if let Ok(slot) = self.new_slot(i).await {
            self.slots[i] = slot;
        }
        self.publish();
    }

    fn idle(&self, pick: impl Fn(&Slot) -> bool) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.slots.len()).filter(|&i| pick(&self.slots[i])).collect();
        (!candidates.is_empty()).then(|| candidates[fastrand::usize(..candidates.len())])
    }

    /// Runs the key schedule until `until`.
    pub async fn run(&mut self, until: Instant) {
        let mut tick: u64 = 0;
        let mut interval = tokio::time::interval(Duration::from_millis(500));
        while Instant::now() < until {
            interval.tick().await;
            tick += 1;
            self.due().await;
            if tick % 2 == 0 {
                if let Some(i) = self.idle(|s| s.disabled_until.is_none()) {
                    self.set_state(i, KeyState::Disabled).await;
                }
            }
            if tick % 4 == 1 {
                if let Some(i) = self.idle(|_| true) {
                    self.revoke(i).await;
                }
            }
            if tick % 3 == 2 {
                if let Some(i) = self.idle(|s| s.disabled_until.is_none() && s.secrets.len() == 1) {
                    self.rotate(i, GRACES[fastrand::usize(..GRACES.len())]).await;
                }
            }
        }
    }

    /// Re-enables keys whose time is up; lets dead secrets and ended graces go.
    async fn due(&mut self) {
        let now = Instant::now();
        let enable: Vec<usize> =
            (0..self.slots.len()).filter(|&i| self.slots[i].disabled_until.is_some_and(|t| t <= now)).collect();
        for i in enable {
            self.set_state(i, KeyState::Enabled).await;
        }
        let before = self.dead.len();
        self.dead.retain(|(until, _)| *until > now);
        let mut changed = before != self.dead.len();
        for slot in &mut self.slots {
            let n = slot.secrets.len();
            slot.secrets
                .retain(|s| s.rotation.lock().unwrap().and_then(|r| r.until).is_none_or(|u| u + KEEP_DEAD > now));
            changed |= n != slot.secrets.len();
        }
        if changed {
            self.publish();
        }
    }

    async fn set_state(&mut self, i: usize, to: KeyState) {
        let key = Arc::clone(&self.slots[i].key);
        let id = key.id.clone();
        let disabled = to == KeyState::Disabled;
        let index = key.begin(to);
        let patch = KeyPatch { disabled: Some(disabled), ..Default::default() };
        match admin!(self, a => a.update_key(&id, &patch)) {
            Ok(info) if info.disabled == disabled => {
                key.confirm(index);
                if disabled {
                    self.changes.disabled += 1;
                    self.slots[i].disabled_until =
                        Some(Instant::now() + Duration::from_millis(fastrand::u64(3_000..12_000)));
                } else {
                    self.changes.enabled += 1;
                    self.slots[i].disabled_until = None;
                }
            }
            Ok(_) => self.quarantine(i, format!("{id}: the answer does not show the change")).await,
            Err(e) => self.quarantine(i, e).await,
        }
    }

    async fn revoke(&mut self, i: usize) {
        let key = Arc::clone(&self.slots[i].key);
        let id = key.id.clone();
        let index = key.begin(KeyState::Revoked);
        match admin!(self, a => a.revoke(&id)) {
            Ok(info) if info.revoked => {
                let confirmed = key.confirm(index);
                self.changes.revoked += 1;
                let old = std::mem::take(&mut self.slots[i].secrets);
                self.dead.extend(old.into_iter().map(|s| (confirmed + KEEP_DEAD, s)));
                match self.new_slot(i).await {
                    Ok(slot) => self.slots[i] = slot,
                    Err(e) => eprintln!("soak: cannot replace a revoked key: {e}"),
                }
                self.publish();
            }
            Ok(_) => self.quarantine(i, format!("{id}: the answer does not show the revocation")).await,
            Err(e) => self.quarantine(i, e).await,
        }
    }

    async fn rotate(&mut self, i: usize, grace_s: u64) {
        let id = self.slots[i].key.id.clone();
        let old = Arc::clone(&self.slots[i].secrets[0]);
        let grace = Duration::from_secs(grace_s);
        *old.rotation.lock().unwrap() = Some(Rotation { start: Instant::now(), grace, until: None });
        match admin!(self, a => a.rotate(&id, grace_s)) {
            Ok(created) => {
                let Some(until) = created.previous_expires_at else {
                    return self.quarantine(i, format!("{id}: no previous_expires_at in the rotate answer")).await;
                };
                let until = self.clock.instant(until);
                if let Some(r) = old.rotation.lock().unwrap().as_mut() {
                    r.until = Some(until);
                }
                let slot = &mut self.slots[i];
                slot.generation += 1;
                let secret = Arc::new(Secret {
                    key: Arc::clone(&slot.key),
                    api_key: created.key,
                    label: format!("{id}#{}", slot.generation),
                    born: Instant::now(),
                    rotation: Mutex::new(None),
                });
                slot.secrets.insert(0, secret);
                self.changes.rotated[GRACES.iter().position(|g| *g == grace_s).unwrap_or(0)] += 1;
                self.publish();
            }
            Err(e) => self.quarantine(i, e).await,
        }
    }
}

/// Something the infrastructure schedule did, for the report.
#[derive(Debug, Clone)]
pub struct Incident {
    pub at: Duration,
    pub what: String,
    pub took: Duration,
}

#[derive(Debug, Clone, Copy)]
enum Action {
    Cut,
    Restart { replica: usize, graceful: bool },
}

/// The timetable: a stream cut every 40 s from 10 s on, replica A restarted (SIGTERM)
/// every 120 s from 20 s on, replica B (SIGKILL) every 120 s from 40 s on. A one-minute
/// run sees each once.
fn timetable(run: Duration) -> Vec<(Duration, Action)> {
    let mut t = Vec::new();
    let every = |first: u64, period: u64, action: Action, t: &mut Vec<(Duration, Action)>| {
        let mut at = first;
        while Duration::from_secs(at + 5) < run {
            t.push((Duration::from_secs(at), action));
            at += period;
        }
    };
    every(10, 40, Action::Cut, &mut t);
    every(20, 120, Action::Restart { replica: 0, graceful: true }, &mut t);
    every(40, 120, Action::Restart { replica: 1, graceful: false }, &mut t);
    t.sort_by_key(|(at, _)| *at);
    t
}

pub struct Infra {
    pub replicas: Vec<Replica>,
    pub proxies: Vec<Proxy>,
    pub gates: [Gate; 2],
    pub pids: Arc<[AtomicU32; 2]>,
    pub admin_token: String,
    pub stream: Arc<Stream>,
}

impl Infra {
    /// Runs the timetable from `started` for `run`; returns what it did.
    pub async fn run(&mut self, started: Instant, run: Duration) -> Result<Vec<Incident>, String> {
        let mut done = Vec::new();
        for (at, action) in timetable(run) {
            tokio::time::sleep_until((started + at).into()).await;
            let t = Instant::now();
            let what = match action {
                Action::Cut => {
                    let was_up = self.stream.is_up();
                    for p in &self.proxies {
                        p.cut();
                    }
                    format!("event stream cut (was {})", if was_up { "up" } else { "down" })
                }
                Action::Restart { replica, graceful } => {
                    self.restart(replica, graceful).await?;
                    let r = &self.replicas[replica];
                    format!(
                        "replica {} restarted ({}), start #{}",
                        r.name,
                        if graceful { "SIGTERM" } else { "SIGKILL" },
                        r.starts
                    )
                }
            };
            let took = t.elapsed();
            println!("soak: {:>5.1} s  {what} ({took:.1?})", (t - started).as_secs_f64());
            done.push(Incident { at: t - started, what, took });
        }
        Ok(done)
    }

    async fn restart(&mut self, i: usize, graceful: bool) -> Result<(), String> {
        // Held while the replica is down: admin calls go to the other one.
        let mut gate = Arc::clone(&self.gates[i]).lock_owned().await;
        *gate = None;
        self.pids[i].store(0, Ordering::Relaxed);
        self.proxies[i].down().await;
        self.replicas[i].stop(graceful).await.map_err(|e| format!("stopping replica: {e}"))?;
        // Down for 2 s: changes made meanwhile go through the other replica.
        tokio::time::sleep(Duration::from_secs(2)).await;
        self.replicas[i].start().await.map_err(|e| format!("starting replica: {e}"))?;
        self.proxies[i].up().await.map_err(|e| format!("proxy up again: {e}"))?;
        self.pids[i].store(self.replicas[i].pid().unwrap_or(0), Ordering::Relaxed);
        // A new client: the old one's pooled connections died with the process.
        let admin = AdminClient::new(self.replicas[i].url(), self.admin_token.clone()).map_err(|e| e.to_string())?;
        *gate = Some(admin);
        Ok(())
    }
}
