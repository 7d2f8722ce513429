//! Scopes and requirements: what a key may do, and what a route needs.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Longest scope accepted, in bytes.
pub const MAX_SCOPE_LEN: usize = 128;
/// Most segments in a scope.
pub const MAX_SEGMENTS: usize = 8;
/// Longest role name accepted, in bytes.
pub const MAX_ROLE_LEN: usize = 64;

/// A scope such as `reports:read` or `reports:*`.
///
/// A [`Scope`] is `resource:action` (two or more `:`-separated segments of
/// `[a-z0-9_.-]`, each may be `*`). A granted `*` segment matches any one segment in
/// the same place: `reports:*` grants `reports:read` but not `reports:read:all`.
/// Wildcards in a *requirement* are literal: requiring `reports:*` needs a key that
/// was granted `reports:*` (or `*:*`).
///
/// A [`Requirement`] combines scopes and roles with `AND`, `OR` and parentheses. A role
/// is written `role(NAME)`: exactly `role(`, the name (`[a-z0-9_.-]{1,64}`, no spaces),
/// then `)`. A word that is neither a scope nor `role(…)` is an error, so a mistyped
/// scope never quietly becomes a role:
///
/// ```
/// use keygate::{Requirement, ScopeSet};
///
/// let need = Requirement::parse("reports:read AND (billing:write OR role(admin))").unwrap();
/// let granted = ScopeSet::parse(["reports:*", "billing:write"]).unwrap();
/// assert!(need.is_satisfied_by(&granted, &[]));
/// assert!(!need.is_satisfied_by(&ScopeSet::parse(["reports:read"]).unwrap(), &[]));
/// assert!(need.is_satisfied_by(&ScopeSet::parse(["reports:read"]).unwrap(), &["admin".into()]));
///
/// // Bad requirements fail when the route is built, with the position of the mistake.
/// let err = Requirement::parse("reports:read AND (role(admin)").unwrap_err();
/// assert_eq!(err.to_string(), "at byte 17: unclosed `(`");
/// let err = Requirement::parse("reports:read AND admin").unwrap_err();
/// assert_eq!(
///     err.to_string(),
///     "at byte 17: `admin` is neither a scope (`resource:action`) nor a role (write `role(admin)`)"
/// );
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(Arc<str>);

impl Scope {
    /// Parses and validates a scope.
    pub fn parse(s: &str) -> Result<Self, ScopeError> {
        validate_scope(s)?;
        Ok(Self(Arc::from(s)))
    }

    /// The scope as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this granted scope covers `required` (segment by segment, `*` matches one).
    pub fn grants(&self, required: &Scope) -> bool {
        if self.0 == required.0 {
            return true;
        }
        let mut g = self.0.split(':');
        let mut r = required.0.split(':');
        loop {
            match (g.next(), r.next()) {
                (None, None) => return true,
                (Some(gs), Some(rs)) if gs == "*" || gs == rs => continue,
                _ => return false,
            }
        }
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for Scope {
    type Err = ScopeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl serde::Serialize for Scope {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Scope {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Scope::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// What is wrong with a scope or role name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScopeError {
    /// Empty string.
    #[error("a scope must not be empty")]
    Empty,
    /// Longer than [`MAX_SCOPE_LEN`] or [`MAX_ROLE_LEN`].
    #[error("`{0}` is too long")]
    TooLong(String),
    /// Fewer than two segments.
    #[error("scope `{0}` must be `resource:action` (at least two `:`-separated segments)")]
    OneSegment(String),
    /// More than [`MAX_SEGMENTS`] segments.
    #[error("scope `{0}` has more than {MAX_SEGMENTS} segments")]
    TooManySegments(String),
    /// An empty segment (`a::b`, `a:`).
    #[error("scope `{0}` has an empty segment")]
    EmptySegment(String),
    /// A character outside `[a-z0-9_.-]` (and `*` as a whole segment).
    #[error("`{0}` may only use a-z, 0-9, `_`, `.`, `-` (and `*` as a whole scope segment)")]
    BadCharacter(String),
}

fn is_name_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'.' | b'-')
}

fn validate_scope(s: &str) -> Result<(), ScopeError> {
    if s.is_empty() {
        return Err(ScopeError::Empty);
    }
    if s.len() > MAX_SCOPE_LEN {
        return Err(ScopeError::TooLong(truncate(s)));
    }
    let mut n = 0;
    for seg in s.split(':') {
        n += 1;
        if seg.is_empty() {
            return Err(ScopeError::EmptySegment(s.to_owned()));
        }
        if seg != "*" && !seg.bytes().all(is_name_char) {
            return Err(ScopeError::BadCharacter(s.to_owned()));
        }
    }
    if n < 2 {
        return Err(ScopeError::OneSegment(s.to_owned()));
    }
    if n > MAX_SEGMENTS {
        return Err(ScopeError::TooManySegments(s.to_owned()));
    }
    Ok(())
}

/// Validates a role name: `[a-z0-9_.-]{1,64}`.
pub(crate) fn validate_role(s: &str) -> Result<(), ScopeError> {
    if s.is_empty() {
        return Err(ScopeError::Empty);
    }
    if s.len() > MAX_ROLE_LEN {
        return Err(ScopeError::TooLong(truncate(s)));
    }
    if !s.bytes().all(is_name_char) {
        return Err(ScopeError::BadCharacter(s.to_owned()));
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    let mut end = 32.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The scopes a key holds, deduplicated and sorted.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ScopeSet(Vec<Scope>);

impl ScopeSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses every scope; the first bad one is the error.
    pub fn parse<I, S>(scopes: I) -> Result<Self, ScopeError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        scopes.into_iter().map(|s| Scope::parse(s.as_ref())).collect()
    }

    /// Whether any scope in the set grants `required`.
    pub fn grants(&self, required: &Scope) -> bool {
        // Exact hits are the common case and binary search finds them without
        // walking wildcards.
        self.0.binary_search(required).is_ok() || self.0.iter().any(|g| g.grants(required))
    }

    /// The scopes, sorted.
    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }

    /// Number of scopes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds a scope (keeps the set sorted and deduplicated).
    pub fn insert(&mut self, scope: Scope) {
        if let Err(i) = self.0.binary_search(&scope) {
            self.0.insert(i, scope);
        }
    }
}

impl FromIterator<Scope> for ScopeSet {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Self {
        let mut v: Vec<Scope> = iter.into_iter().collect();
        v.sort();
        v.dedup();
        Self(v)
    }
}

impl fmt::Debug for ScopeSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.0.iter()).finish()
    }
}

impl serde::Serialize for ScopeSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        serde::Serialize::serialize(&self.0, s)
    }
}

impl<'de> serde::Deserialize<'de> for ScopeSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Vec::<Scope>::deserialize(d)?;
        Ok(v.into_iter().collect())
    }
}

/// What a route needs: scopes, roles and key environments combined with `AND` / `OR`.
///
/// Written as text, a scope is `resource:action`, a role is `role(NAME)` and an
/// environment `env(NAME)` (see [`Scope`] for the whole syntax); [`Display`](fmt::Display)
/// writes that syntax, and [`parse`](Self::parse) reads it back to an equal requirement.
///
/// An environment term holds when the key's environment is that one (`live`, `test`, or
/// any name the key service gives): `reports:read AND env(live)` keeps test keys off a
/// route. A key whose environment alone rules it out, whatever scopes and roles it had,
/// is refused with 403 `wrong_environment`; one that falls short otherwise with 403
/// `insufficient_scope`.
#[derive(Clone, PartialEq, Eq)]
pub enum Requirement {
    /// A scope the key must be granted.
    Scope(Scope),
    /// A role the key must carry.
    Role(Arc<str>),
    /// The environment the key must be of.
    Environment(Arc<str>),
    /// Every sub-requirement.
    All(Vec<Requirement>),
    /// At least one sub-requirement.
    Any(Vec<Requirement>),
}

impl Requirement {
    /// Every term must hold. Each term is a scope (`reports:read`) or a role
    /// (`role(admin)`), as in [`term`](Self::term).
    ///
    /// ```
    /// let r = keygate::Requirement::all(["reports:read", "role(auditor)"]).unwrap();
    /// assert_eq!(r.to_string(), "reports:read AND role(auditor)");
    /// ```
    pub fn all<I, S>(terms: I) -> Result<Self, RequirementError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Ok(Self::All(terms.into_iter().map(|t| Self::term(t.as_ref())).collect::<Result<_, _>>()?))
    }

    /// At least one term must hold; terms as in [`term`](Self::term).
    pub fn any<I, S>(terms: I) -> Result<Self, RequirementError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Ok(Self::Any(terms.into_iter().map(|t| Self::term(t.as_ref())).collect::<Result<_, _>>()?))
    }

    /// One scope (`reports:read`) or role (`role(admin)`), with nothing around it. A
    /// bare word (`admin`) is an error.
    ///
    /// ```
    /// use keygate::Requirement;
    ///
    /// assert_eq!(Requirement::term("role(admin)").unwrap(), Requirement::role("admin").unwrap());
    /// assert!(Requirement::term("admin").is_err());
    /// ```
    pub fn term(term: &str) -> Result<Self, RequirementError> {
        if term.starts_with("env(") {
            let (name, end) = named_at(term, 0, Named::Env)?;
            if end < term.len() {
                return Err(RequirementError {
                    at: end,
                    kind: RequirementErrorKind::Unexpected(term[end..].to_owned()),
                });
            }
            return Ok(Self::Environment(Arc::from(name)));
        }
        if term.starts_with("role(") {
            let (name, end) = role_at(term, 0)?;
            if end < term.len() {
                return Err(RequirementError {
                    at: end,
                    kind: RequirementErrorKind::Unexpected(term[end..].to_owned()),
                });
            }
            return Ok(Self::Role(Arc::from(name)));
        }
        word_term(term, 0)
    }

    /// A role the key must carry, by its name (`admin`, not `role(admin)`).
    pub fn role(name: &str) -> Result<Self, RequirementError> {
        if name.is_empty() {
            return Err(RequirementError { at: 0, kind: RequirementErrorKind::EmptyRole });
        }
        validate_role(name).map_err(|e| RequirementError { at: 0, kind: RequirementErrorKind::Term(e) })?;
        Ok(Self::Role(Arc::from(name)))
    }

    /// The key environment `name` (`live`, not `env(live)`): `[a-z][a-z0-9_-]{0,31}`.
    ///
    /// ```
    /// use keygate::Requirement;
    ///
    /// let live = Requirement::environment("live").unwrap();
    /// assert_eq!(live, Requirement::parse("env(live)").unwrap());
    /// assert!(Requirement::environment("Live").is_err());
    /// ```
    pub fn environment(name: &str) -> Result<Self, RequirementError> {
        validate_environment(name).map_err(|kind| RequirementError { at: 0, kind })?;
        Ok(Self::Environment(Arc::from(name)))
    }

    /// Parses an expression: scopes, `role(NAME)` and `env(NAME)` terms joined by `AND` / `OR`
    /// (case-insensitive, `AND` binds tighter) with parentheses. Errors carry the byte
    /// offset of the mistake.
    pub fn parse(expr: &str) -> Result<Self, RequirementError> {
        let tokens = tokenize(expr)?;
        let mut p = Parser { tokens: &tokens, pos: 0, len: expr.len() };
        let req = p.or_expr()?;
        if let Some(t) = p.tokens.get(p.pos) {
            return Err(RequirementError { at: t.at, kind: RequirementErrorKind::Unexpected(t.text()) });
        }
        Ok(req)
    }

    /// Whether `scopes` and `roles` meet the requirement, for a key of no known
    /// environment (an `env(…)` term never holds); see
    /// [`is_satisfied_in`](Self::is_satisfied_in).
    pub fn is_satisfied_by(&self, scopes: &ScopeSet, roles: &[Arc<str>]) -> bool {
        self.holds(&|term| match term {
            Self::Scope(s) => scopes.grants(s),
            Self::Role(r) => roles.iter().any(|have| have == r),
            _ => false,
        })
    }

    /// Whether a key with `scopes` and `roles` in `environment` meets the requirement.
    ///
    /// ```
    /// use keygate::{Requirement, ScopeSet};
    ///
    /// let r = Requirement::parse("reports:read AND env(live)").unwrap();
    /// let scopes = ScopeSet::parse(["reports:read"]).unwrap();
    /// assert!(r.is_satisfied_in(&scopes, &[], "live"));
    /// assert!(!r.is_satisfied_in(&scopes, &[], "test"));
    /// ```
    pub fn is_satisfied_in(&self, scopes: &ScopeSet, roles: &[Arc<str>], environment: &str) -> bool {
        self.holds(&|term| match term {
            Self::Scope(s) => scopes.grants(s),
            Self::Role(r) => roles.iter().any(|have| have == r),
            Self::Environment(e) => **e == *environment,
            _ => false,
        })
    }

    /// Whether some key of `environment` could meet the requirement, scopes and roles
    /// aside: false when the environment alone rules it out (`wrong_environment`).
    pub fn allows_environment(&self, environment: &str) -> bool {
        self.holds(&|term| match term {
            Self::Environment(e) => **e == *environment,
            _ => true,
        })
    }

    /// The requirement's value with each term decided by `term`.
    fn holds(&self, term: &impl Fn(&Requirement) -> bool) -> bool {
        match self {
            Self::All(v) => v.iter().all(|r| r.holds(term)),
            Self::Any(v) => v.iter().any(|r| r.holds(term)),
            leaf => term(leaf),
        }
    }

    /// Every environment named anywhere in the requirement.
    pub fn environments(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.walk(&mut |r| {
            if let Self::Environment(e) = r {
                if !out.contains(&&**e) {
                    out.push(&**e);
                }
            }
        });
        out
    }

    /// Every scope named anywhere in the requirement, in order, without repeats: what a
    /// 403's `scope="…"` attribute lists.
    pub fn scopes(&self) -> Vec<&Scope> {
        let mut out = Vec::new();
        self.walk(&mut |r| {
            if let Self::Scope(s) = r {
                if !out.contains(&s) {
                    out.push(s);
                }
            }
        });
        out
    }

    /// Every role named anywhere in the requirement.
    pub fn roles(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.walk(&mut |r| {
            if let Self::Role(s) = r {
                if !out.contains(&&**s) {
                    out.push(&**s);
                }
            }
        });
        out
    }

    fn walk<'a>(&'a self, f: &mut impl FnMut(&'a Requirement)) {
        f(self);
        if let Self::All(v) | Self::Any(v) = self {
            v.iter().for_each(|r| r.walk(f));
        }
    }

    fn fmt_inner(&self, f: &mut fmt::Formatter<'_>, nested: bool) -> fmt::Result {
        match self {
            Self::Scope(s) => f.write_str(s.as_str()),
            Self::Role(r) => write!(f, "role({r})"),
            Self::Environment(e) => write!(f, "env({e})"),
            Self::All(v) | Self::Any(v) => {
                let op = if matches!(self, Self::All(_)) { " AND " } else { " OR " };
                if v.is_empty() {
                    // An empty AND is always true, an empty OR never; neither parses back,
                    // so say so plainly.
                    return f.write_str(if matches!(self, Self::All(_)) { "(nothing)" } else { "(never)" });
                }
                let paren = nested && v.len() > 1;
                if paren {
                    f.write_str("(")?;
                }
                for (i, r) in v.iter().enumerate() {
                    if i > 0 {
                        f.write_str(op)?;
                    }
                    r.fmt_inner(f, true)?;
                }
                if paren {
                    f.write_str(")")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Display for Requirement {
    /// Writes the requirement in the expression syntax [`Requirement::parse`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fmt_inner(f, false)
    }
}

impl fmt::Debug for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Requirement({self})")
    }
}

impl FromStr for Requirement {
    type Err = RequirementError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// A requirement that does not parse, with the byte offset of the problem.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at byte {at}: {kind}")]
pub struct RequirementError {
    /// Byte offset in the expression.
    pub at: usize,
    /// What is wrong.
    pub kind: RequirementErrorKind,
}

/// What is wrong with a requirement expression.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequirementErrorKind {
    /// The expression is empty.
    #[error("the requirement is empty")]
    Empty,
    /// A scope or role name is invalid.
    #[error("{0}")]
    Term(ScopeError),
    /// A word that is neither a scope (it has no `:`) nor written `role(…)`.
    #[error("`{0}` is neither a scope (`resource:action`) nor a role (write `role({0})`)")]
    BareWord(String),
    /// `role(` without a name.
    #[error("`role()` needs a name, as in `role(admin)`")]
    EmptyRole,
    /// A role not written exactly `role(NAME)`.
    #[error("write a role as `role(NAME)`: lower-case `role`, then `(`, the name and `)` with no spaces")]
    RoleSyntax,
    /// An environment not written exactly `env(NAME)`.
    #[error("write an environment as `env(NAME)`: lower-case `env`, then `(`, the name and `)` with no spaces")]
    EnvSyntax,
    /// An environment name that is not `[a-z][a-z0-9_-]{0,31}`.
    #[error("`{0}` is not an environment name ([a-z][a-z0-9_-]{{0,31}}, e.g. `live`)")]
    BadEnvironment(String),
    /// A token appeared where it cannot.
    #[error("unexpected `{0}`")]
    Unexpected(String),
    /// The expression ended where a term was expected.
    #[error("expected a scope, a role or `(`, found the end")]
    UnexpectedEnd,
    /// A `(` was never closed.
    #[error("unclosed `(`")]
    Unclosed,
    /// A character that cannot start a token.
    #[error("unexpected character `{0}`")]
    BadCharacter(char),
    /// Parentheses nested deeper than 32, or `AND` and `OR` groups nested deeper than
    /// 33 (their text would need more than 32 levels of parentheses).
    #[error("parentheses nested deeper than 32")]
    TooDeep,
}

#[derive(Debug)]
enum Tok<'a> {
    And,
    Or,
    Open,
    Close,
    Term(&'a str),
    /// A role's name, already validated.
    Role(&'a str),
    /// An environment's name, already validated.
    Env(&'a str),
}

#[derive(Debug)]
struct Token<'a> {
    tok: Tok<'a>,
    at: usize,
}

impl Token<'_> {
    fn text(&self) -> String {
        match self.tok {
            Tok::And => "AND".into(),
            Tok::Or => "OR".into(),
            Tok::Open => "(".into(),
            Tok::Close => ")".into(),
            Tok::Term(t) => t.into(),
            Tok::Role(r) => format!("role({r})"),
            Tok::Env(e) => format!("env({e})"),
        }
    }
}

fn tokenize(expr: &str) -> Result<Vec<Token<'_>>, RequirementError> {
    let bytes = expr.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b' ' | b'\t' | b'\n' | b'\r' => i += 1,
            b'(' => {
                out.push(Token { tok: Tok::Open, at: i });
                i += 1;
            }
            b')' => {
                out.push(Token { tok: Tok::Close, at: i });
                i += 1;
            }
            _ if is_name_char(b) || b == b':' || b == b'*' || b.is_ascii_uppercase() => {
                let start = i;
                while i < bytes.len() {
                    let c = bytes[i];
                    if is_name_char(c) || c == b':' || c == b'*' || c.is_ascii_alphabetic() {
                        i += 1;
                    } else {
                        break;
                    }
                }
                let word = &expr[start..i];
                if word.eq_ignore_ascii_case("env") {
                    if word == "env" && bytes.get(i) == Some(&b'(') {
                        let (name, end) = named_at(expr, start, Named::Env)?;
                        out.push(Token { tok: Tok::Env(name), at: start });
                        i = end;
                        continue;
                    }
                    if expr[i..].trim_start_matches([' ', '\t', '\n', '\r']).starts_with('(') {
                        return Err(RequirementError { at: start, kind: RequirementErrorKind::EnvSyntax });
                    }
                }
                if word.eq_ignore_ascii_case("role") {
                    if word == "role" && bytes.get(i) == Some(&b'(') {
                        let (name, end) = role_at(expr, start)?;
                        out.push(Token { tok: Tok::Role(name), at: start });
                        i = end;
                        continue;
                    }
                    if expr[i..].trim_start_matches([' ', '\t', '\n', '\r']).starts_with('(') {
                        // `Role(x)`, `role (x)`: meant as a role, so say how to write one
                        // rather than calling `role` a bare word.
                        return Err(RequirementError { at: start, kind: RequirementErrorKind::RoleSyntax });
                    }
                }
                let tok = if word.eq_ignore_ascii_case("and") {
                    Tok::And
                } else if word.eq_ignore_ascii_case("or") {
                    Tok::Or
                } else {
                    Tok::Term(word)
                };
                out.push(Token { tok, at: start });
            }
            _ => {
                let c = expr[i..].chars().next().unwrap_or('?');
                return Err(RequirementError { at: i, kind: RequirementErrorKind::BadCharacter(c) });
            }
        }
    }
    if out.is_empty() {
        return Err(RequirementError { at: 0, kind: RequirementErrorKind::Empty });
    }
    Ok(out)
}

/// The two `keyword(NAME)` terms.
#[derive(Clone, Copy)]
enum Named {
    Role,
    Env,
}

fn role_at(expr: &str, start: usize) -> Result<(&str, usize), RequirementError> {
    named_at(expr, start, Named::Role)
}

/// `[a-z][a-z0-9_-]{0,31}`, as the key service checks a key's environment.
fn validate_environment(name: &str) -> Result<(), RequirementErrorKind> {
    let mut bytes = name.bytes();
    let first_ok = bytes.next().is_some_and(|b| b.is_ascii_lowercase());
    let rest_ok = bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
    if first_ok && rest_ok && name.len() <= 32 {
        Ok(())
    } else {
        Err(RequirementErrorKind::BadEnvironment(truncate(name)))
    }
}

/// Reads `role(NAME)` or `env(NAME)` starting at `start` (where the keyword is): the
/// name and the offset just past `)`. The name runs to the first `)`, `(` or space, so
/// that a missing `)` is reported here rather than swallowing the rest of the expression.
fn named_at(expr: &str, start: usize, named: Named) -> Result<(&str, usize), RequirementError> {
    let (keyword, syntax) = match named {
        Named::Role => ("role(", RequirementErrorKind::RoleSyntax),
        Named::Env => ("env(", RequirementErrorKind::EnvSyntax),
    };
    let name_at = start + keyword.len();
    let rest = &expr[name_at..];
    let len = rest.find(|c: char| matches!(c, ')' | '(') || c.is_ascii_whitespace()).unwrap_or(rest.len());
    if !rest[len..].starts_with(')') {
        return Err(RequirementError { at: start, kind: syntax });
    }
    let name = &rest[..len];
    match named {
        Named::Role if name.is_empty() => {
            return Err(RequirementError { at: name_at, kind: RequirementErrorKind::EmptyRole });
        }
        Named::Role => {
            validate_role(name).map_err(|e| RequirementError { at: name_at, kind: RequirementErrorKind::Term(e) })?
        }
        Named::Env => validate_environment(name).map_err(|kind| RequirementError { at: name_at, kind })?,
    }
    Ok((name, name_at + len + 1))
}

/// A word of the expression at offset `at`: a scope, or else a mistake.
fn word_term(word: &str, at: usize) -> Result<Requirement, RequirementError> {
    if word.contains(':') {
        return Scope::parse(word)
            .map(Requirement::Scope)
            .map_err(|e| RequirementError { at, kind: RequirementErrorKind::Term(e) });
    }
    if word.is_empty() {
        return Err(RequirementError { at, kind: RequirementErrorKind::Empty });
    }
    Err(RequirementError { at, kind: RequirementErrorKind::BareWord(word.to_owned()) })
}

/// Deepest nesting of `AND` / `OR` groups a parsed requirement may have. `Display`
/// writes parentheses around every nested group (`(a:b AND c:d) OR e:f`, which the text
/// need not have), so this keeps what parses within the 32 levels of parentheses that
/// parse: the text of any requirement that parses parses back.
const MAX_NESTING: usize = 33;

fn nesting(r: &Requirement) -> usize {
    match r {
        Requirement::All(v) | Requirement::Any(v) => 1 + v.iter().map(nesting).max().unwrap_or(0),
        _ => 0,
    }
}

struct Parser<'t, 'a> {
    tokens: &'t [Token<'a>],
    pos: usize,
    len: usize,
}

impl Parser<'_, '_> {
    fn or_expr(&mut self) -> Result<Requirement, RequirementError> {
        self.or_depth(0)
    }

    fn or_depth(&mut self, depth: usize) -> Result<Requirement, RequirementError> {
        let at = self.at();
        let mut items = vec![self.and_expr(depth)?];
        while matches!(self.tokens.get(self.pos), Some(Token { tok: Tok::Or, .. })) {
            self.pos += 1;
            items.push(self.and_expr(depth)?);
        }
        if items.len() == 1 { Ok(items.pop().unwrap()) } else { Self::group(Requirement::Any(items), at) }
    }

    fn and_expr(&mut self, depth: usize) -> Result<Requirement, RequirementError> {
        let at = self.at();
        let mut items = vec![self.atom(depth)?];
        while matches!(self.tokens.get(self.pos), Some(Token { tok: Tok::And, .. })) {
            self.pos += 1;
            items.push(self.atom(depth)?);
        }
        if items.len() == 1 { Ok(items.pop().unwrap()) } else { Self::group(Requirement::All(items), at) }
    }

    /// Where the next token starts.
    fn at(&self) -> usize {
        self.tokens.get(self.pos).map_or(self.len, |t| t.at)
    }

    /// A group starting at byte `at`, unless it nests too deep.
    fn group(group: Requirement, at: usize) -> Result<Requirement, RequirementError> {
        if nesting(&group) > MAX_NESTING {
            return Err(RequirementError { at, kind: RequirementErrorKind::TooDeep });
        }
        Ok(group)
    }

    fn atom(&mut self, depth: usize) -> Result<Requirement, RequirementError> {
        let Some(t) = self.tokens.get(self.pos) else {
            return Err(RequirementError { at: self.len, kind: RequirementErrorKind::UnexpectedEnd });
        };
        self.pos += 1;
        match t.tok {
            Tok::Term(word) => word_term(word, t.at),
            Tok::Role(name) => Ok(Requirement::Role(Arc::from(name))),
            Tok::Env(name) => Ok(Requirement::Environment(Arc::from(name))),
            Tok::Open => {
                if depth >= 32 {
                    return Err(RequirementError { at: t.at, kind: RequirementErrorKind::TooDeep });
                }
                let inner = self.or_depth(depth + 1)?;
                match self.tokens.get(self.pos) {
                    Some(Token { tok: Tok::Close, .. }) => {
                        self.pos += 1;
                        Ok(inner)
                    }
                    _ => Err(RequirementError { at: t.at, kind: RequirementErrorKind::Unclosed }),
                }
            }
            _ => Err(RequirementError { at: t.at, kind: RequirementErrorKind::Unexpected(t.text()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(s: &[&str]) -> ScopeSet {
        ScopeSet::parse(s).unwrap()
    }

    #[test]
    fn wildcards_match_one_segment() {
        let g = set(&["reports:*"]);
        assert!(g.grants(&Scope::parse("reports:read").unwrap()));
        assert!(!g.grants(&Scope::parse("reports:read:all").unwrap()));
        assert!(!g.grants(&Scope::parse("billing:read").unwrap()));
        assert!(set(&["*:read"]).grants(&Scope::parse("billing:read").unwrap()));
        // A required wildcard is literal.
        assert!(!set(&["reports:read"]).grants(&Scope::parse("reports:*").unwrap()));
    }

    #[test]
    fn scope_errors_are_precise() {
        assert_eq!(Scope::parse(""), Err(ScopeError::Empty));
        assert!(matches!(Scope::parse("reports"), Err(ScopeError::OneSegment(_))));
        assert!(matches!(Scope::parse("reports:"), Err(ScopeError::EmptySegment(_))));
        assert!(matches!(Scope::parse("Reports:read"), Err(ScopeError::BadCharacter(_))));
        assert!(matches!(Scope::parse("re*:read"), Err(ScopeError::BadCharacter(_))));
    }

    #[test]
    fn precedence_and_errors() {
        let r = Requirement::parse("a:b OR c:d AND e:f").unwrap();
        assert_eq!(r.to_string(), "a:b OR (c:d AND e:f)");
        assert_eq!(Requirement::parse("a:b and role(admin)").unwrap().to_string(), "a:b AND role(admin)");
        let e = Requirement::parse("a:b AND").unwrap_err();
        assert_eq!(e.kind, RequirementErrorKind::UnexpectedEnd);
        let e = Requirement::parse("a:b c:d").unwrap_err();
        assert_eq!((e.at, e.kind), (4, RequirementErrorKind::Unexpected("c:d".into())));
        let e = Requirement::parse("a:b AND Bad:x").unwrap_err();
        assert_eq!(e.at, 8);
        let e = Requirement::parse("a:b & c:d").unwrap_err();
        assert_eq!(e.kind, RequirementErrorKind::BadCharacter('&'));
        assert_eq!(Requirement::parse("  ").unwrap_err().kind, RequirementErrorKind::Empty);
        assert_eq!(Requirement::parse(")").unwrap_err().kind, RequirementErrorKind::Unexpected(")".into()));
        let deep = format!("{}a:b{}", "(".repeat(40), ")".repeat(40));
        assert_eq!(Requirement::parse(&deep).unwrap_err().kind, RequirementErrorKind::TooDeep);
        // Found by `fuzz/fuzz_targets/scope.rs`: 32 levels of parentheses parse, but the
        // text of `a AND b OR c` inside them adds a 33rd, and did not parse back.
        let text = std::str::from_utf8(include_bytes!("../fuzz/regressions/scope-display-depth")).unwrap();
        let expr = text.split('\0').next().unwrap();
        let err = Requirement::parse(expr).unwrap_err();
        assert_eq!((err.kind, err.at), (RequirementErrorKind::TooDeep, 0));
        let within = expr.replacen("x:y OR (", "", 1).replacen(')', "", 1);
        let r = Requirement::parse(&within).unwrap();
        assert_eq!(Requirement::parse(&r.to_string()).unwrap(), r);
    }

    #[test]
    fn roles_and_scopes_listed() {
        let r = Requirement::parse("reports:read AND (billing:write OR role(admin)) AND reports:read").unwrap();
        let scopes: Vec<_> = r.scopes().iter().map(|s| s.as_str()).collect();
        assert_eq!(scopes, ["reports:read", "billing:write"]);
        assert_eq!(r.roles(), ["admin"]);
    }

    fn err(expr: &str) -> (usize, RequirementErrorKind) {
        let e = Requirement::parse(expr).unwrap_err();
        (e.at, e.kind)
    }

    #[test]
    fn roles_are_written_role_name() {
        let r = Requirement::parse("reports:read AND (billing:write OR role(admin))").unwrap();
        let want = Requirement::All(vec![
            Requirement::term("reports:read").unwrap(),
            Requirement::Any(vec![Requirement::term("billing:write").unwrap(), Requirement::role("admin").unwrap()]),
        ]);
        assert_eq!(r, want);
        assert!(r.is_satisfied_by(&set(&["reports:read"]), &["admin".into()]));
        assert!(!r.is_satisfied_by(&set(&["reports:read"]), &["ops".into()]));
        // Keywords are fine as role names: inside `role(…)` they are names.
        let r = Requirement::parse("role(and) OR role(or)").unwrap();
        assert_eq!(r, Requirement::Any(vec![Requirement::role("and").unwrap(), Requirement::role("or").unwrap()]));
        assert_eq!(Requirement::parse("(role(a.b-c_1))").unwrap(), Requirement::role("a.b-c_1").unwrap());
    }

    #[test]
    fn a_bare_word_is_an_error_at_its_offset() {
        assert_eq!(err("admin"), (0, RequirementErrorKind::BareWord("admin".into())));
        assert_eq!(err("admin OR a:b"), (0, RequirementErrorKind::BareWord("admin".into())));
        let e = Requirement::parse("reports:read AND (billing:write OR admin)").unwrap_err();
        assert_eq!((e.at, &e.kind), (35, &RequirementErrorKind::BareWord("admin".into())));
        assert_eq!(
            e.to_string(),
            "at byte 35: `admin` is neither a scope (`resource:action`) nor a role (write `role(admin)`)"
        );
        // `role` alone is a bare word too.
        assert_eq!(err("a:b AND role"), (8, RequirementErrorKind::BareWord("role".into())));
    }

    #[test]
    fn bad_role_terms_are_errors_at_their_offset() {
        assert_eq!(err("role()"), (5, RequirementErrorKind::EmptyRole));
        assert_eq!(err("a:b AND role()"), (13, RequirementErrorKind::EmptyRole));
        assert_eq!(
            err("a:b OR role(Admin!)"),
            (12, RequirementErrorKind::Term(ScopeError::BadCharacter("Admin!".into())))
        );
        assert_eq!(err("role(a:b)"), (5, RequirementErrorKind::Term(ScopeError::BadCharacter("a:b".into()))));
        assert!(matches!(
            err(&format!("role({})", "r".repeat(MAX_ROLE_LEN + 1))),
            (5, RequirementErrorKind::Term(ScopeError::TooLong(_)))
        ));
        // Anything but exactly `role(NAME)` says how to write a role.
        assert_eq!(err("a:b AND role(admin"), (8, RequirementErrorKind::RoleSyntax));
        assert_eq!(err("role( admin)"), (0, RequirementErrorKind::RoleSyntax));
        assert_eq!(err("role(admin OR a:b)"), (0, RequirementErrorKind::RoleSyntax));
        assert_eq!(err("a:b OR Role(admin)"), (7, RequirementErrorKind::RoleSyntax));
        assert_eq!(err("role (admin)"), (0, RequirementErrorKind::RoleSyntax));
        // A role is a term like any other: two in a row are unexpected.
        assert_eq!(err("role(a) role(b)"), (8, RequirementErrorKind::Unexpected("role(b)".into())));
    }

    #[test]
    fn terms_are_one_scope_or_one_role() {
        assert_eq!(Requirement::term("role(admin)").unwrap(), Requirement::role("admin").unwrap());
        assert_eq!(Requirement::term("a:b").unwrap(), Requirement::Scope(Scope::parse("a:b").unwrap()));
        let e = Requirement::term("admin").unwrap_err();
        assert_eq!((e.at, e.kind), (0, RequirementErrorKind::BareWord("admin".into())));
        let e = Requirement::term("role(admin)x").unwrap_err();
        assert_eq!((e.at, e.kind), (11, RequirementErrorKind::Unexpected("x".into())));
        assert_eq!(Requirement::term("role()").unwrap_err().kind, RequirementErrorKind::EmptyRole);
        assert_eq!(Requirement::term("").unwrap_err().kind, RequirementErrorKind::Empty);
        let e = Requirement::all(["reports:read", "admin"]).unwrap_err();
        assert_eq!(e.kind, RequirementErrorKind::BareWord("admin".into()));
        let r = Requirement::any(["reports:read", "role(admin)"]).unwrap();
        assert_eq!(r.to_string(), "reports:read OR role(admin)");
        // A role *name* is just the name.
        assert!(Requirement::role("role(admin)").is_err());
        assert_eq!(Requirement::role("").unwrap_err().kind, RequirementErrorKind::EmptyRole);
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "role(admin)",
            "reports:read AND role(admin)",
            "reports:read AND (billing:write OR role(admin))",
            "(role(a) AND b:c) OR role(d) OR (e:f AND (role(g) OR h:*))",
        ] {
            let r = Requirement::parse(text).unwrap();
            assert_eq!(r.to_string(), text);
            assert_eq!(Requirement::parse(&r.to_string()).unwrap(), r);
        }
    }
}
