//! Paging `GET /v1/keys`: [`KeyListQuery`] and [`KeyPage`].

use serde::Deserialize;

use super::KeyInfo;

/// What to ask `GET /v1/keys` ([`AdminClient::list_keys_page`](super::AdminClient::list_keys_page)):
/// every field narrows the listing; none set lists every key, oldest first, 1 000 a page.
///
/// ```
/// use keygate::client::KeyListQuery;
///
/// let q = KeyListQuery::default().owner("acme").state("active").limit(100);
/// assert_eq!(q.limit, Some(100));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct KeyListQuery {
    /// Only this owner's keys.
    pub owner: Option<String>,
    /// Only keys whose owner, name, key id or display prefix holds this text.
    pub search: Option<String>,
    /// Only keys of this environment.
    pub environment: Option<String>,
    /// Only keys in this state: `active`, `expiring` (soon), `disabled`, `revoked` or
    /// `expired`.
    pub state: Option<String>,
    /// Keys per page (1 to 1 000; default 1 000).
    pub limit: Option<u32>,
    /// The page after this cursor ([`KeyPage::next`] of the page before, asked with
    /// the same `sort`).
    pub after: Option<String>,
    /// The order: `created` (the default), `name`, `owner` or `last_used`, ascending,
    /// or descending with `:desc` (`"name:desc"`); ties go by key id.
    pub sort: Option<String>,
}

impl KeyListQuery {
    /// Only this owner's keys.
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = Some(owner.into());
        self
    }

    /// Only keys whose owner, name, key id or display prefix holds `text`.
    pub fn search(mut self, text: impl Into<String>) -> Self {
        self.search = Some(text.into());
        self
    }

    /// Only keys of this environment.
    pub fn environment(mut self, environment: impl Into<String>) -> Self {
        self.environment = Some(environment.into());
        self
    }

    /// Only keys in this state (`active`, `disabled`, `revoked`, `expired`).
    pub fn state(mut self, state: impl Into<String>) -> Self {
        self.state = Some(state.into());
        self
    }

    /// Keys per page.
    pub fn limit(mut self, limit: u32) -> Self {
        self.limit = Some(limit);
        self
    }

    /// The page after `cursor`.
    pub fn after(mut self, cursor: impl Into<String>) -> Self {
        self.after = Some(cursor.into());
        self
    }

    /// Lists in this order (`name`, `owner:desc`, `last_used:desc`, ...).
    pub fn sort(mut self, sort: impl Into<String>) -> Self {
        self.sort = Some(sort.into());
        self
    }

    pub(super) fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        let fields = [
            ("owner", &self.owner),
            ("q", &self.search),
            ("environment", &self.environment),
            ("state", &self.state),
            ("after", &self.after),
            ("sort", &self.sort),
        ];
        for (name, value) in fields {
            if let Some(v) = value {
                out.push((name, v.clone()));
            }
        }
        if let Some(limit) = self.limit {
            out.push(("limit", limit.to_string()));
        }
        out
    }
}

/// One page of `GET /v1/keys`.
#[derive(Debug, Clone, Deserialize)]
#[non_exhaustive]
pub struct KeyPage {
    /// The keys, oldest first.
    pub keys: Vec<KeyInfo>,
    /// The cursor of the next page; `None` on the last one.
    #[serde(default)]
    pub next: Option<String>,
}
