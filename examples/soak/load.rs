//! The load generator: concurrent keep-alive clients sending requests with the pool's
//! secrets to the protected example's routes, every answer judged against the truth
//! when it arrives.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::truth::{self, Expect, Secret, Stream};

/// The secrets requests are sent with: every live secret, the ones recently made
/// invalid, and a few keys the key service never issued. Republished by the driver
/// after each change.
pub type Pool = RwLock<Arc<Vec<Arc<Secret>>>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Route {
    GetReports,
    PostReports,
    GetAdmin,
}

impl Route {
    fn pick() -> Self {
        match fastrand::u8(0..20) {
            0..12 => Route::GetReports,
            12..17 => Route::PostReports,
            _ => Route::GetAdmin,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Route::GetReports => "GET /reports",
            Route::PostReports => "POST /reports",
            Route::GetAdmin => "GET /admin",
        }
    }

    /// The status of an accepted request with this key's (fixed) scopes.
    fn accepted(self, secret: &Secret) -> u16 {
        match self {
            Route::GetReports => 200,
            Route::PostReports if secret.key.write => 201,
            Route::GetAdmin if secret.key.admin => 200,
            _ => 403,
        }
    }
}

/// A wrong answer, for the report.
#[derive(Debug, Clone)]
pub struct Wrong {
    pub at: Duration,
    pub took: Duration,
    pub label: String,
    pub route: Route,
    pub status: u16,
    pub expect: Expect,
    pub history: String,
}

/// What one client saw; the clients' tallies are added up at the end.
#[derive(Debug, Default)]
pub struct Tally {
    pub requests: u64,
    /// (what the truth said, the status or 0 for a transport error) → count.
    pub answers: BTreeMap<(Expect, u16), u64>,
    pub wrong: u64,
    pub first_wrong: Vec<Wrong>,
    pub errors: BTreeMap<String, u64>,
    /// The longest an accepted answer came after the change that invalidated its
    /// secret (request sent after the admin call returned).
    pub latest_accept: Duration,
    pub slowest: Duration,
}

impl Tally {
    pub fn add(&mut self, other: Tally) {
        self.requests += other.requests;
        for (k, v) in other.answers {
            *self.answers.entry(k).or_default() += v;
        }
        self.wrong += other.wrong;
        self.first_wrong.extend(other.first_wrong);
        self.first_wrong.sort_by_key(|w| w.at);
        self.first_wrong.truncate(10);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        self.latest_accept = self.latest_accept.max(other.latest_accept);
        self.slowest = self.slowest.max(other.slowest);
    }

    pub fn count(&self, expect: Option<Expect>, status: u16) -> u64 {
        self.answers.iter().filter(|((e, s), _)| *s == status && expect.is_none_or(|x| x == *e)).map(|(_, n)| n).sum()
    }
}

pub struct Load {
    pub url: String,
    pub pool: Arc<Pool>,
    pub stream: Arc<Stream>,
    pub started: Instant,
    pub until: Instant,
    pub sent: Arc<AtomicU64>,
    pub wrong: Arc<AtomicU64>,
}

/// One client: requests back to back until `until`.
pub async fn client(load: Arc<Load>, http: reqwest::Client) -> Tally {
    let mut tally = Tally::default();
    while Instant::now() < load.until {
        let secret = {
            let pool = Arc::clone(&load.pool.read().unwrap());
            Arc::clone(&pool[fastrand::usize(..pool.len())])
        };
        let route = Route::pick();
        let url = match route {
            Route::GetAdmin => format!("{}/admin", load.url),
            _ => format!("{}/reports", load.url),
        };
        let req = match route {
            Route::PostReports => http.post(url),
            _ => http.get(url),
        };
        let t0 = Instant::now();
        let sent = req.bearer_auth(secret.api_key.expose_secret()).send().await;
        let status = match sent {
            // The whole body is read so the connection goes back to the pool.
            Ok(res) => {
                let status = res.status().as_u16();
                match res.bytes().await {
                    Ok(_) => Ok(status),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        let t1 = Instant::now();
        tally.requests += 1;
        load.sent.fetch_add(1, Ordering::Relaxed);
        tally.slowest = tally.slowest.max(t1 - t0);
        let judgement = truth::judge(&load.stream, &secret, t0, t1);
        let status = match status {
            Ok(s) => s,
            Err(e) => {
                let kind = if e.is_timeout() { "timeout".to_owned() } else { format!("transport: {e}") };
                *tally.errors.entry(kind).or_default() += 1;
                *tally.answers.entry((judgement.expect, 0)).or_default() += 1;
                continue;
            }
        };
        *tally.answers.entry((judgement.expect, status)).or_default() += 1;
        let accepted = matches!(status, 200 | 201 | 403);
        let wrong = match (judgement.expect, status) {
            // Accepted, but not as this key's scopes say: wrong whatever the truth.
            (_, s) if accepted && s != route.accepted(&secret) => true,
            (Expect::Reject, _) => accepted,
            (Expect::Accept, 401) => true,
            _ => false,
        };
        if accepted {
            if let Some(late) = judgement.late {
                tally.latest_accept = tally.latest_accept.max(late);
            }
        }
        if !matches!(status, 200 | 201 | 401 | 403 | 429 | 503) {
            *tally.errors.entry(format!("status {status}")).or_default() += 1;
        }
        if wrong {
            tally.wrong += 1;
            load.wrong.fetch_add(1, Ordering::Relaxed);
            if tally.first_wrong.len() < 10 {
                tally.first_wrong.push(Wrong {
                    at: t0 - load.started,
                    took: t1 - t0,
                    label: secret.label.clone(),
                    route,
                    status,
                    expect: judgement.expect,
                    history: truth::history(&load.stream, &secret, load.started),
                });
            }
        }
    }
    tally
}
