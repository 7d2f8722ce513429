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
/// A [`Requirement`] combines scopes and role names (a term without `:` is a role)
/// with `AND`, `OR` and parentheses:
///
/// ```
/// use keygate::{Requirement, ScopeSet};
///
/// let need = Requirement::parse("reports:read AND (billing:write OR admin)").unwrap();
/// let granted = ScopeSet::parse(["reports:*", "billing:write"]).unwrap();
/// assert!(need.is_satisfied_by(&granted, &[]));
/// assert!(!need.is_satisfied_by(&ScopeSet::parse(["reports:read"]).unwrap(), &[]));
/// assert!(need.is_satisfied_by(&ScopeSet::parse(["reports:read"]).unwrap(), &["admin".into()]));
///
/// // Bad requirements fail when the route is built, with the position of the mistake.
/// let err = Requirement::parse("reports:read AND (admin").unwrap_err();
/// assert_eq!(err.to_string(), "at byte 17: unclosed `(`");
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

/// What a route needs: scopes and roles combined with `AND` / `OR`.
#[derive(Clone, PartialEq, Eq)]
pub enum Requirement {
    /// A scope the key must be granted.
    Scope(Scope),
    /// A role the key must carry.
    Role(Arc<str>),
    /// Every sub-requirement.
    All(Vec<Requirement>),
    /// At least one sub-requirement.
    Any(Vec<Requirement>),
}

impl Requirement {
    /// Every term must hold. Terms with `:` are scopes, others role names.
    ///
    /// ```
    /// let r = keygate::Requirement::all(["reports:read", "reports:write"]).unwrap();
    /// assert_eq!(r.to_string(), "reports:read AND reports:write");
    /// ```
    pub fn all<I, S>(terms: I) -> Result<Self, RequirementError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Ok(Self::All(terms.into_iter().map(|t| Self::term(t.as_ref())).collect::<Result<_, _>>()?))
    }

    /// At least one term must hold.
    pub fn any<I, S>(terms: I) -> Result<Self, RequirementError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Ok(Self::Any(terms.into_iter().map(|t| Self::term(t.as_ref())).collect::<Result<_, _>>()?))
    }

    /// One scope (`reports:read`) or role (`admin`).
    pub fn term(term: &str) -> Result<Self, RequirementError> {
        let at = |e| RequirementError { at: 0, kind: RequirementErrorKind::Term(e) };
        if term.contains(':') {
            Scope::parse(term).map(Self::Scope).map_err(at)
        } else {
            validate_role(term).map_err(at)?;
            Ok(Self::Role(Arc::from(term)))
        }
    }

    /// A role the key must carry.
    pub fn role(name: &str) -> Result<Self, RequirementError> {
        validate_role(name).map_err(|e| RequirementError { at: 0, kind: RequirementErrorKind::Term(e) })?;
        Ok(Self::Role(Arc::from(name)))
    }

    /// Parses an expression: terms joined by `AND` / `OR` (case-insensitive, `AND` binds
    /// tighter) with parentheses.
    pub fn parse(expr: &str) -> Result<Self, RequirementError> {
        let tokens = tokenize(expr)?;
        let mut p = Parser { tokens: &tokens, pos: 0, len: expr.len() };
        let req = p.or_expr()?;
        if let Some(t) = p.tokens.get(p.pos) {
            return Err(RequirementError { at: t.at, kind: RequirementErrorKind::Unexpected(t.text()) });
        }
        Ok(req)
    }

    /// Whether `scopes` and `roles` meet the requirement.
    pub fn is_satisfied_by(&self, scopes: &ScopeSet, roles: &[Arc<str>]) -> bool {
        match self {
            Self::Scope(s) => scopes.grants(s),
            Self::Role(r) => roles.iter().any(|have| have == r),
            Self::All(v) => v.iter().all(|r| r.is_satisfied_by(scopes, roles)),
            Self::Any(v) => v.iter().any(|r| r.is_satisfied_by(scopes, roles)),
        }
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
            Self::Role(r) => f.write_str(r),
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
    /// A scope or role is invalid.
    #[error("{0}")]
    Term(ScopeError),
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
    /// Parentheses nested too deeply.
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
        let mut items = vec![self.and_expr(depth)?];
        while matches!(self.tokens.get(self.pos), Some(Token { tok: Tok::Or, .. })) {
            self.pos += 1;
            items.push(self.and_expr(depth)?);
        }
        Ok(if items.len() == 1 { items.pop().unwrap() } else { Requirement::Any(items) })
    }

    fn and_expr(&mut self, depth: usize) -> Result<Requirement, RequirementError> {
        let mut items = vec![self.atom(depth)?];
        while matches!(self.tokens.get(self.pos), Some(Token { tok: Tok::And, .. })) {
            self.pos += 1;
            items.push(self.atom(depth)?);
        }
        Ok(if items.len() == 1 { items.pop().unwrap() } else { Requirement::All(items) })
    }

    fn atom(&mut self, depth: usize) -> Result<Requirement, RequirementError> {
        let Some(t) = self.tokens.get(self.pos) else {
            return Err(RequirementError { at: self.len, kind: RequirementErrorKind::UnexpectedEnd });
        };
        self.pos += 1;
        match t.tok {
            Tok::Term(word) => Requirement::term(word).map_err(|mut e| {
                e.at = t.at;
                e
            }),
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
        assert_eq!(Requirement::parse("a:b and admin").unwrap().to_string(), "a:b AND admin");
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
    }

    #[test]
    fn roles_and_scopes_listed() {
        let r = Requirement::parse("reports:read AND (billing:write OR admin) AND reports:read").unwrap();
        let scopes: Vec<_> = r.scopes().iter().map(|s| s.as_str()).collect();
        assert_eq!(scopes, ["reports:read", "billing:write"]);
        assert_eq!(r.roles(), ["admin"]);
    }
}
