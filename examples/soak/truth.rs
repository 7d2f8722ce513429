//! What the driver knows to be true: for every secret, when it is valid; for the event
//! stream, when it is down. From those, what an answer to a request sent at `t0` and
//! read at `t1` must be.
//!
//! # The propagation bound
//!
//! keygate documents that a change reaches a middleware's cache through the event
//! stream "in under a second", and that a listener that reconnects with
//! `Last-Event-ID` gets what it missed "within one round trip of reconnecting". So a
//! change that the key service confirmed at `e` (the admin call returned) must be in
//! force at the middleware by the **deadline** `D(e)`: the end of the first 1-second
//! window starting at or after `e` during which the event stream was up the whole
//! time. With the stream up, that is `e + 1 s`; when the stream was cut, or the replica
//! it followed was down, while the change happened (or within the second after it),
//! it is 1 s after the stream is up again. The stream is up while a proxy carries a
//! `GET /v1/events` connection that the key service answered `200` (the proxies see
//! every byte, so the driver knows this without asking the middleware).
//!
//! A rotated-away secret stops at the end of its grace, a time the key service sends
//! with every verdict and that the cache never serves past; it gets the same 1 s.
//!
//! # Verdicts
//!
//! - **Must reject** over `[t0, t1]`: the secret's last change before `t1` made it
//!   invalid and its deadline is at or before `t0` (or its grace ended more than 1 s
//!   before `t0`). A 200, 201 or 403 (the key was accepted) is a wrong answer.
//! - **Must accept** over `[t0, t1]`: the secret existed at `t0` (its create or rotate
//!   call had returned), nothing made it invalid before `t1` (a change in progress
//!   counts from the moment its call was sent), its grace (if any) ends after `t1`,
//!   and if the key was re-enabled, the re-enable's deadline is at or before `t0` (a
//!   refusal cached before it may stand until then). A 401 is a wrong answer.
//! - Anything else is a **transition**: 200 or 401 are both right.
//!
//! An accepted answer must also be the one the key's fixed scopes give (200 or 201
//! with the scope, 403 without): anything else is wrong whatever the verdict.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keygate::ApiKey;

/// How long a change may take to reach the middleware once the stream is up.
pub const BOUND: Duration = Duration::from_secs(1);
/// Slack on a grace's end for must-accept: the key service rounds it to milliseconds
/// and the driver maps wall-clock time to `Instant`.
const GRACE_MARGIN: Duration = Duration::from_millis(20);

/// The state a key is put in by an admin call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    Enabled,
    Disabled,
    Revoked,
}

/// One admin call that changed a key's state: sent at `start`, confirmed at `end`.
#[derive(Debug, Clone, Copy)]
pub struct Transition {
    pub start: Instant,
    pub end: Option<Instant>,
    pub to: KeyState,
}

/// A key: its fixed scopes and its history.
#[derive(Debug)]
pub struct KeyTruth {
    pub id: String,
    pub write: bool,
    pub admin: bool,
    /// `false`: a well-formed key the key service never issued.
    pub known: bool,
    pub transitions: Mutex<Vec<Transition>>,
}

impl KeyTruth {
    pub fn new(id: String, write: bool, admin: bool, known: bool) -> Arc<Self> {
        Arc::new(Self { id, write, admin, known, transitions: Mutex::new(Vec::new()) })
    }

    /// Records a change about to be sent; returns its index for [`KeyTruth::confirm`].
    pub fn begin(&self, to: KeyState) -> usize {
        let mut t = self.transitions.lock().unwrap();
        // The start is read under the lock: a judge that read the history before this
        // push read its own clock before this start.
        t.push(Transition { start: Instant::now(), end: None, to });
        t.len() - 1
    }

    pub fn confirm(&self, index: usize) -> Instant {
        let now = Instant::now();
        self.transitions.lock().unwrap()[index].end = Some(now);
        now
    }
}

/// A rotation of a secret away: sent at `start` with `grace`; `until` once confirmed.
#[derive(Debug, Clone, Copy)]
pub struct Rotation {
    pub start: Instant,
    pub grace: Duration,
    pub until: Option<Instant>,
}

/// One secret of a key.
#[derive(Debug)]
pub struct Secret {
    pub key: Arc<KeyTruth>,
    pub api_key: ApiKey,
    /// `key_id#n`: what reports show (never the secret).
    pub label: String,
    /// When its create or rotate call returned.
    pub born: Instant,
    pub rotation: Mutex<Option<Rotation>>,
}

/// What the answer to a request must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Expect {
    Accept,
    Reject,
    Transition,
}

/// The event stream's outages, as the proxies saw them.
#[derive(Debug)]
pub struct Stream {
    inner: Mutex<StreamState>,
}

#[derive(Debug)]
struct StreamState {
    /// Live `GET /v1/events` connections answered 200.
    live: u32,
    /// Disjoint outages, oldest first; `None`: still down.
    down: Vec<(Instant, Option<Instant>)>,
    opened: u64,
}

impl Stream {
    /// Down from `since` (nothing follows the key service yet).
    pub fn new(since: Instant) -> Arc<Self> {
        Arc::new(Self { inner: Mutex::new(StreamState { live: 0, down: vec![(since, None)], opened: 0 }) })
    }

    pub fn opened(&self) {
        let mut s = self.inner.lock().unwrap();
        s.live += 1;
        s.opened += 1;
        if s.live == 1 {
            if let Some(last) = s.down.last_mut() {
                last.1.get_or_insert_with(Instant::now);
            }
        }
    }

    pub fn closed(&self) {
        let mut s = self.inner.lock().unwrap();
        s.live = s.live.saturating_sub(1);
        if s.live == 0 {
            s.down.push((Instant::now(), None));
        }
    }

    pub fn is_up(&self) -> bool {
        self.inner.lock().unwrap().live > 0
    }

    /// Outages so far (the initial one, before the middleware first connected, left
    /// out) and how many streams were opened.
    pub fn outages(&self) -> (Vec<Duration>, u64) {
        let s = self.inner.lock().unwrap();
        let now = Instant::now();
        let outages = s.down.iter().skip(1).map(|&(from, to)| to.unwrap_or(now) - from).collect();
        (outages, s.opened)
    }

    /// `D(e)`: see the module docs. `None`: the stream is down and has not come back.
    pub fn deadline(&self, e: Instant) -> Option<Instant> {
        let s = self.inner.lock().unwrap();
        let mut from = e;
        for &(down, up) in &s.down {
            if down >= from + BOUND {
                break;
            }
            match up {
                None => return None,
                Some(up) if up > from => from = up,
                Some(_) => {}
            }
        }
        Some(from + BOUND)
    }
}

/// The judgement of one request, and, for an accepted answer after an invalidation,
/// how long after the change it was sent (the propagation actually seen).
pub struct Judgement {
    pub expect: Expect,
    pub late: Option<Duration>,
}

/// What the answer to a request on `secret` sent at `t0` and read at `t1` must be.
pub fn judge(stream: &Stream, secret: &Secret, t0: Instant, t1: Instant) -> Judgement {
    let key = &secret.key;
    if !key.known {
        return Judgement { expect: Expect::Reject, late: None };
    }
    let rotation = *secret.rotation.lock().unwrap();
    let transitions = key.transitions.lock().unwrap();
    let last = transitions.iter().rev().find(|t| t.start <= t1).copied();
    drop(transitions);

    // Gone for good: its grace ended, or the key's last change disabled or revoked it.
    let mut late = None;
    if let Some(until) = rotation.and_then(|r| r.until) {
        if t0 >= until {
            late = Some(t0 - until);
            if t0 >= until + BOUND {
                return Judgement { expect: Expect::Reject, late };
            }
        }
    }
    if let Some(Transition { end: Some(end), to, .. }) = last {
        if to != KeyState::Enabled && t0 >= end {
            late = late.max(Some(t0 - end));
            if stream.deadline(end).is_some_and(|d| d <= t0) {
                return Judgement { expect: Expect::Reject, late };
            }
        }
    }

    // Valid over the whole window, and long enough that no refusal can be cached.
    let born = secret.born <= t0;
    let in_grace = match rotation {
        Some(r) if r.start <= t1 => match r.until {
            Some(until) => t1 + GRACE_MARGIN < until,
            None => t1 + GRACE_MARGIN < r.start + r.grace,
        },
        _ => true,
    };
    let enabled = match last {
        None => true,
        Some(Transition { to: KeyState::Enabled, end: Some(end), .. }) => {
            // A secret born after the re-enable was never refused: nothing to wait for.
            secret.born >= end || stream.deadline(end).is_some_and(|d| d <= t0)
        }
        Some(_) => false,
    };
    let expect = if born && in_grace && enabled { Expect::Accept } else { Expect::Transition };
    Judgement { expect, late }
}

/// A secret's history relative to `started`, for the report of a wrong answer.
pub fn history(stream: &Stream, secret: &Secret, started: Instant) -> String {
    let at = |t: Instant| format!("{:.3}s", t.saturating_duration_since(started).as_secs_f64());
    let mut parts = vec![format!("born {}", at(secret.born))];
    if let Some(r) = *secret.rotation.lock().unwrap() {
        parts.push(format!(
            "rotated away at {} with {:?} grace, until {}",
            at(r.start),
            r.grace,
            r.until.map_or("?".into(), at)
        ));
    }
    for t in secret.key.transitions.lock().unwrap().iter() {
        let deadline = t.end.and_then(|e| stream.deadline(e));
        parts.push(format!(
            "{:?} sent {} confirmed {} deadline {}",
            t.to,
            at(t.start),
            t.end.map_or("?".into(), at),
            deadline.map_or("?".into(), at)
        ));
    }
    parts.join("; ")
}

// `cargo test --release --features server,postgres --example soak`: the judge is the
// soak's own correctness.
#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn secret(born: Instant) -> Secret {
        Secret {
            key: KeyTruth::new("key_x".into(), false, false, true),
            api_key: ApiKey::new("kg_x"),
            label: "key_x#0".into(),
            born,
            rotation: Mutex::new(None),
        }
    }

    fn stream_up(at: Instant) -> Arc<Stream> {
        let s = Stream::new(at);
        s.inner.lock().unwrap().down[0].1 = Some(at);
        s.inner.lock().unwrap().live = 1;
        s
    }

    #[test]
    fn the_deadline_waits_for_a_second_of_stream() {
        let t = Instant::now();
        let s = stream_up(t);
        assert_eq!(s.deadline(t + ms(100)), Some(t + ms(1100)));
        s.inner.lock().unwrap().down.push((t + ms(500), Some(t + ms(800))));
        // Cut within the second after the change: 1 s after it came back.
        assert_eq!(s.deadline(t + ms(100)), Some(t + ms(1800)));
        // An outage before the change does not matter.
        assert_eq!(s.deadline(t + ms(900)), Some(t + ms(1900)));
        s.inner.lock().unwrap().down.push((t + ms(2000), None));
        assert_eq!(s.deadline(t + ms(1500)), None, "still down: no deadline yet");
    }

    #[test]
    fn a_disabled_key_must_be_refused_after_its_deadline_and_accepted_after_reenable() {
        let t = Instant::now();
        let s = stream_up(t);
        let x = secret(t);
        assert_eq!(judge(&s, &x, t + ms(10), t + ms(20)).expect, Expect::Accept);
        x.key.transitions.lock().unwrap().push(Transition {
            start: t + ms(100),
            end: Some(t + ms(110)),
            to: KeyState::Disabled,
        });
        assert_eq!(judge(&s, &x, t + ms(50), t + ms(105)).expect, Expect::Transition);
        assert_eq!(judge(&s, &x, t + ms(500), t + ms(510)).expect, Expect::Transition);
        assert_eq!(judge(&s, &x, t + ms(1110), t + ms(1120)).expect, Expect::Reject);
        x.key.transitions.lock().unwrap().push(Transition { start: t + ms(2000), end: None, to: KeyState::Enabled });
        assert_eq!(judge(&s, &x, t + ms(1990), t + ms(2010)).expect, Expect::Transition, "enable in progress");
        x.key.transitions.lock().unwrap()[1].end = Some(t + ms(2020));
        assert_eq!(judge(&s, &x, t + ms(2500), t + ms(2510)).expect, Expect::Transition, "a refusal may be cached");
        assert_eq!(judge(&s, &x, t + ms(3020), t + ms(3030)).expect, Expect::Accept);
    }

    #[test]
    fn a_rotated_secret_is_valid_in_its_grace_and_refused_a_second_after() {
        let t = Instant::now();
        let s = stream_up(t);
        let x = secret(t);
        *x.rotation.lock().unwrap() = Some(Rotation { start: t + ms(100), grace: ms(5000), until: None });
        assert_eq!(judge(&s, &x, t + ms(150), t + ms(160)).expect, Expect::Accept, "in grace, call in flight");
        x.rotation.lock().unwrap().as_mut().unwrap().until = Some(t + ms(5105));
        assert_eq!(judge(&s, &x, t + ms(5000), t + ms(5010)).expect, Expect::Accept);
        assert_eq!(judge(&s, &x, t + ms(5100), t + ms(5110)).expect, Expect::Transition);
        assert_eq!(judge(&s, &x, t + ms(6105), t + ms(6110)).expect, Expect::Reject);
        let unknown = Secret { key: KeyTruth::new("u".into(), false, false, false), ..secret(t) };
        assert_eq!(judge(&s, &unknown, t, t).expect, Expect::Reject);
    }
}
