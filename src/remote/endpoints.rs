//! The key service's URLs: validated once, tried round-robin, a refused one set aside
//! for a cooldown.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use reqwest::Url;

use super::{MAX_URLS, RemoteConfigError};

/// One or more key-service base URLs: a `&str`, a `String`, a [`Url`], or a list
/// (`Vec`, slice, array) of strings.
pub trait KeyServiceUrls {
    /// The URLs as strings.
    fn into_urls(self) -> Vec<String>;
}

impl KeyServiceUrls for &str {
    fn into_urls(self) -> Vec<String> {
        vec![self.to_owned()]
    }
}

impl KeyServiceUrls for String {
    fn into_urls(self) -> Vec<String> {
        vec![self]
    }
}

impl KeyServiceUrls for &String {
    fn into_urls(self) -> Vec<String> {
        vec![self.clone()]
    }
}

impl KeyServiceUrls for Url {
    fn into_urls(self) -> Vec<String> {
        vec![self.to_string()]
    }
}

impl<S: AsRef<str>> KeyServiceUrls for Vec<S> {
    fn into_urls(self) -> Vec<String> {
        self.iter().map(|s| s.as_ref().to_owned()).collect()
    }
}

impl<S: AsRef<str>> KeyServiceUrls for &[S] {
    fn into_urls(self) -> Vec<String> {
        self.iter().map(|s| s.as_ref().to_owned()).collect()
    }
}

impl<S: AsRef<str>, const N: usize> KeyServiceUrls for [S; N] {
    fn into_urls(self) -> Vec<String> {
        self.iter().map(|s| s.as_ref().to_owned()).collect()
    }
}

/// A key-service base URL, checked, with the route's path appended.
#[derive(Clone)]
pub(crate) struct Endpoint {
    pub(crate) url: Url,
    /// `scheme://host:port/path` without any credentials: what logs show.
    pub(crate) label: Arc<str>,
}

impl fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.label)
    }
}

/// The key service's replicas, tried round robin; one that failed to connect is tried
/// last for a cooldown, so that a dead replica does not cost every call a connect
/// timeout.
pub(crate) struct Endpoints {
    list: Box<[Endpoint]>,
    next: AtomicUsize,
    /// Per endpoint: milliseconds after `origin` until which it is tried last.
    down_until_ms: Box<[AtomicU64]>,
    origin: Instant,
    cooldown: Duration,
}

impl fmt::Debug for Endpoints {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.list.iter()).finish()
    }
}

impl Endpoints {
    /// Checks `urls` and appends `path` to each.
    pub(crate) fn new(urls: Vec<String>, path: &str, cooldown: Duration) -> Result<Self, RemoteConfigError> {
        if urls.is_empty() {
            return Err(RemoteConfigError::NoUrl);
        }
        if urls.len() > MAX_URLS {
            return Err(RemoteConfigError::InvalidUrl { index: MAX_URLS, reason: "at most 64 URLs" });
        }
        let list = urls
            .iter()
            .enumerate()
            .map(|(index, raw)| endpoint(raw, path).map_err(|reason| RemoteConfigError::InvalidUrl { index, reason }))
            .collect::<Result<Box<[_]>, _>>()?;
        let down_until_ms = list.iter().map(|_| AtomicU64::new(0)).collect();
        Ok(Self { list, next: AtomicUsize::new(0), down_until_ms, origin: Instant::now(), cooldown })
    }

    pub(crate) fn len(&self) -> usize {
        self.list.len()
    }

    pub(crate) fn get(&self, index: usize) -> &Endpoint {
        &self.list[index]
    }

    /// Where the next call starts: round robin over calls.
    pub(crate) fn start(&self) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % self.list.len()
    }

    /// The next endpoint from `cursor` on not in `tried` (a bit per index): one that is
    /// not cooling down if there is one, else any.
    pub(crate) fn pick(&self, cursor: usize, tried: u64) -> Option<usize> {
        let n = self.list.len();
        let now = self.now_ms();
        let untried = (0..n).map(|i| (cursor + i) % n).filter(|&i| tried & (1 << i) == 0);
        untried
            .clone()
            .find(|&i| self.down_until_ms[i].load(Ordering::Relaxed) <= now)
            .or_else(|| untried.clone().next())
    }

    /// Records that `index` could not be connected to; whether it was up until now
    /// (worth a warning once, not on every call during the cooldown).
    pub(crate) fn mark_down(&self, index: usize) -> bool {
        let now = self.now_ms();
        let cooldown = u64::try_from(self.cooldown.as_millis()).unwrap_or(u64::MAX);
        self.down_until_ms[index].swap(now.saturating_add(cooldown), Ordering::Relaxed) <= now
    }

    pub(crate) fn mark_up(&self, index: usize) {
        self.down_until_ms[index].store(0, Ordering::Relaxed);
    }

    #[cfg(test)]
    pub(crate) fn cool_down_forever(&self, index: usize) {
        self.down_until_ms[index].store(u64::MAX, Ordering::Relaxed);
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

fn endpoint(raw: &str, path: &str) -> Result<Endpoint, &'static str> {
    let base = Url::parse(raw.trim()).map_err(|_| "not an absolute URL")?;
    if !matches!(base.scheme(), "http" | "https") {
        return Err("the scheme must be http or https");
    }
    if base.host_str().is_none_or(str::is_empty) {
        return Err("no host");
    }
    if !base.username().is_empty() || base.password().is_some() {
        return Err("credentials in the URL are not allowed; use the service token");
    }
    if base.query().is_some() || base.fragment().is_some() {
        return Err("a base URL takes no query or fragment");
    }
    let prefix = base.path().trim_end_matches('/');
    let mut url = base.clone();
    url.set_path(&format!("{prefix}{path}"));
    let label = format!(
        "{}://{}:{}{prefix}",
        url.scheme(),
        url.host_str().unwrap_or_default(),
        url.port_or_known_default().unwrap_or_default(),
    );
    Ok(Endpoint { url, label: label.into() })
}
