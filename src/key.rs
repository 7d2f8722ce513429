//! The key itself: [`ApiKey`] (the secret), [`KeyFormat`] (the local format check)

use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroize;

/// The base62 alphabet in the order the checksum encoding uses.
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Random base62 characters in a key body.
pub const RANDOM_LEN: usize = 30;
/// Checksum characters at the end of a key body.
pub const CHECKSUM_LEN: usize = 6;
/// Longest allowed prefix.
pub const MAX_PREFIX_LEN: usize = 16;

/// An API key as presented by a client or returned once by the key service.
///
/// The secret is zeroized on drop, and neither `Debug` nor `Display` show more than
/// the prefix (the part before the first `_`, when it looks like one). Reading the
/// secret takes an explicit [`expose_secret`](ApiKey::expose_secret).
///
/// and [`KeyDigest`] (what caches and stores see instead of the secret).
///
/// keygate's keys look like `{prefix}_{body}`: a prefix of `[a-z][a-z0-9]{0,15}`,
/// then 30 random base62 characters (178 bits), then 6 base62 characters holding
/// the CRC-32 of everything before them. The checksum lets the middleware turn away
/// typos and garbage without a network call.
///
/// ```
/// use keygate::{ApiKey, KeyFormat};
///
/// let key = ApiKey::generate("acme").unwrap();
/// assert!(key.expose_secret().starts_with("acme_"));
/// assert!(KeyFormat::prefixed("acme").unwrap().check(&key).is_ok());
/// // Debug never shows the secret.
/// assert_eq!(format!("{key:?}"), "ApiKey(\"acme_…\")");
/// ```
#[derive(Clone)]
pub struct ApiKey {
    secret: String,
}

impl ApiKey {
    /// Wraps a raw key. No check is made here: see [`KeyFormat::check`].
    pub fn new(secret: impl Into<String>) -> Self {
        Self { secret: secret.into() }
    }

    /// The secret's bytes, for hashing and the format check.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.secret.as_bytes()
    }

    /// Generates a new key `{prefix}_{30 random base62}{6 base62 checksum}` from the
    /// operating system's CSPRNG.
    ///
    /// ```
    /// let key = keygate::ApiKey::generate("kg").unwrap();
    /// assert_eq!(key.len(), "kg_".len() + 36);
    /// ```
    pub fn generate(prefix: &str) -> Result<Self, FormatError> {
        validate_prefix(prefix)?;
        let mut secret = String::with_capacity(prefix.len() + 1 + RANDOM_LEN + CHECKSUM_LEN);
        secret.push_str(prefix);
        secret.push('_');
        push_random_base62(&mut secret, RANDOM_LEN).map_err(|_| FormatError::Rng)?;
        let sum = checksum(secret.as_bytes());
        secret.push_str(std::str::from_utf8(&sum).expect("base62 is ASCII"));
        Ok(Self::new(secret))
    }

    /// The raw secret. Callers own what happens to it next.
    pub fn expose_secret(&self) -> &str {
        &self.secret
    }

    /// Length of the key in bytes.
    pub fn len(&self) -> usize {
        self.as_bytes().len()
    }

    /// Whether the key is empty.
    pub fn is_empty(&self) -> bool {
        self.as_bytes().is_empty()
    }

    /// The SHA-256 digest of the key: what caches and stores key by.
    pub fn digest(&self) -> KeyDigest {
        KeyDigest::of(self.as_bytes())
    }

    /// The prefix (text before the first `_`) when it is a valid keygate prefix.
    pub fn prefix(&self) -> Option<&str> {
        let (prefix, _) = self.expose_secret().split_once('_')?;
        validate_prefix(prefix).ok().map(|_| prefix)
    }

    /// The first characters that may be shown to people: prefix, `_` and four more
    /// characters (`kg_3fA9`), as the key service stores for display.
    pub fn display_prefix(&self) -> String {
        match self.prefix() {
            Some(p) => self.expose_secret().chars().take(p.len() + 1 + 4).collect(),
            None => String::new(),
        }
    }
}

impl PartialEq for ApiKey {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.as_bytes().ct_eq(other.as_bytes()))
    }
}

impl Eq for ApiKey {}

impl Drop for ApiKey {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix() {
            Some(p) => write!(f, "ApiKey(\"{p}_…\")"),
            None => f.write_str("ApiKey(\"…\")"),
        }
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.prefix() {
            Some(p) => write!(f, "{p}_…"),
            None => f.write_str("…"),
        }
    }
}

/// SHA-256 of a key: the only form of a key that keygate keeps or compares.
///
/// Equality is constant-time. `Debug` prints the first 8 hex digits only, which is
/// enough to correlate and useless for guessing.
#[derive(Clone, Copy)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// Digest of arbitrary bytes.
    pub fn of(bytes: &[u8]) -> Self {
        Self(Sha256::digest(bytes).into())
    }

    /// Wraps a digest computed elsewhere (for example read from a store).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest's bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, 64 characters.
    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push(char::from_digit((b >> 4) as u32, 16).unwrap());
            s.push(char::from_digit((b & 15) as u32, 16).unwrap());
        }
        s
    }

    /// Parses 64 hex digits.
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, chunk) in hex.as_bytes().chunks(2).enumerate() {
            let hi = (chunk[0] as char).to_digit(16)?;
            let lo = (chunk[1] as char).to_digit(16)?;
            out[i] = (hi * 16 + lo) as u8;
        }
        Some(Self(out))
    }
}

impl PartialEq for KeyDigest {
    /// Constant-time: every byte is compared whatever the first difference. Four
    /// 64-bit XORs folded with OR, then one `subtle` comparison of the result: as
    /// branch-free as a byte loop, and fast enough for a hash table's probe.
    fn eq(&self, other: &Self) -> bool {
        let word = |d: &[u8; 32], i: usize| u64::from_ne_bytes(d[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        let diff = (0..4).fold(0u64, |acc, i| acc | (word(&self.0, i) ^ word(&other.0, i)));
        diff.ct_eq(&0).into()
    }
}

impl Eq for KeyDigest {}

impl std::hash::Hash for KeyDigest {
    // Hashes the same bytes equality compares, so the Hash/Eq contract holds.
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.hash(state);
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyDigest({}…)", &self.to_hex()[..8])
    }
}

/// Why a key failed the local format check (or could not be generated).
///
/// The client never sees which: every format failure renders as the same 401
/// `invalid_token`. The variants exist for logs, usage events and tests.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FormatError {
    /// The prefix is not `[a-z][a-z0-9]{0,15}`.
    #[error("the prefix must match [a-z][a-z0-9]{{0,15}}")]
    BadPrefix,
    /// The key's prefix is valid but not one this format accepts.
    #[error("the key's prefix is not one this service accepts")]
    UnexpectedPrefix,
    /// No `_` separator.
    #[error("the key has no `_` between prefix and body")]
    NoSeparator,
    /// The body is not 36 characters.
    #[error("the key body must be {} characters", RANDOM_LEN + CHECKSUM_LEN)]
    BadLength,
    /// A body character is not base62.
    #[error("the key body must be base62 (0-9, A-Z, a-z)")]
    BadCharacter,
    /// The checksum does not match.
    #[error("the key's checksum does not match")]
    BadChecksum,
    /// The operating system's random number generator failed.
    #[error("the operating system's random number generator failed")]
    Rng,
}

/// Which keys the middleware accepts before asking a verifier.
///
/// The default accepts keygate keys with any valid prefix. [`KeyFormat::opaque`]
/// switches the check off for keys issued by another system (only the generic
/// limits of extraction apply then).
///
/// ```
/// use keygate::{ApiKey, KeyFormat};
///
/// let format = KeyFormat::prefixed("acme").unwrap();
/// let mut raw = ApiKey::generate("acme").unwrap().expose_secret().to_owned();
/// raw.pop();
/// raw.push('!');
/// assert!(format.check(&ApiKey::new(raw)).is_err());
/// assert!(KeyFormat::opaque().check(&ApiKey::new("anything")).is_ok());
/// ```
#[derive(Debug, Clone, Default)]
pub struct KeyFormat {
    kind: FormatKind,
}

#[derive(Debug, Clone, Default)]
enum FormatKind {
    #[default]
    AnyPrefix,
    Prefixes(Vec<String>),
    Opaque,
}

impl KeyFormat {
    /// keygate keys with any valid prefix (the default).
    pub fn keygate() -> Self {
        Self { kind: FormatKind::AnyPrefix }
    }

    /// keygate keys whose prefix is exactly `prefix`.
    pub fn prefixed(prefix: &str) -> Result<Self, FormatError> {
        Self::prefixes([prefix])
    }

    /// keygate keys whose prefix is one of `prefixes`.
    pub fn prefixes<I, S>(prefixes: I) -> Result<Self, FormatError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut list = Vec::new();
        for p in prefixes {
            validate_prefix(p.as_ref())?;
            list.push(p.as_ref().to_owned());
        }
        Ok(Self { kind: FormatKind::Prefixes(list) })
    }

    /// No format check: keys issued elsewhere are passed to the verifier as they are.
    pub fn opaque() -> Self {
        Self { kind: FormatKind::Opaque }
    }

    /// Whether this format checks anything.
    pub fn is_opaque(&self) -> bool {
        matches!(self.kind, FormatKind::Opaque)
    }

    /// Checks a key locally. `Ok` does not mean the key exists: only the verifier knows.
    pub fn check(&self, key: &ApiKey) -> Result<(), FormatError> {
        self.check_bytes(key.as_bytes())
    }

    /// [`check`](KeyFormat::check) on a borrowed string.
    pub fn check_str(&self, key: &str) -> Result<(), FormatError> {
        self.check_bytes(key.as_bytes())
    }

    fn check_bytes(&self, key: &[u8]) -> Result<(), FormatError> {
        let prefixes = match &self.kind {
            FormatKind::Opaque => return Ok(()),
            FormatKind::AnyPrefix => None,
            FormatKind::Prefixes(list) => Some(list),
        };
        let sep = key.iter().position(|&b| b == b'_').ok_or(FormatError::NoSeparator)?;
        let (prefix, body) = (&key[..sep], &key[sep + 1..]);
        validate_prefix_bytes(prefix)?;
        if let Some(list) = prefixes {
            if !list.iter().any(|p| p.as_bytes() == prefix) {
                return Err(FormatError::UnexpectedPrefix);
            }
        }
        if body.len() != RANDOM_LEN + CHECKSUM_LEN {
            return Err(FormatError::BadLength);
        }
        // Every byte is looked at (no early exit), which lets the loop vectorize.
        let bad = body.iter().fold(0u8, |bad, &b| {
            let digit = b.wrapping_sub(b'0') < 10;
            let letter = (b | 0x20).wrapping_sub(b'a') < 26;
            bad | u8::from(!(digit | letter))
        });
        if bad != 0 {
            return Err(FormatError::BadCharacter);
        }
        let split = key.len() - CHECKSUM_LEN;
        let expected = checksum(&key[..split]);
        if bool::from(expected.ct_eq(&key[split..])) { Ok(()) } else { Err(FormatError::BadChecksum) }
    }
}

/// Checks a prefix against `[a-z][a-z0-9]{0,15}`.
pub(crate) fn validate_prefix(prefix: &str) -> Result<(), FormatError> {
    validate_prefix_bytes(prefix.as_bytes())
}

fn validate_prefix_bytes(b: &[u8]) -> Result<(), FormatError> {
    let ok = !b.is_empty()
        && b.len() <= MAX_PREFIX_LEN
        && b[0].is_ascii_lowercase()
        && b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if ok { Ok(()) } else { Err(FormatError::BadPrefix) }
}

/// Appends `n` base62 characters from the operating system's CSPRNG: key bodies here,
/// key ids in the key service.
pub(crate) fn push_random_base62(out: &mut String, n: usize) -> Result<(), getrandom::Error> {
    let mut filled = 0;
    let mut buf = [0u8; 64];
    while filled < n {
        getrandom::fill(&mut buf)?;
        for &b in &buf {
            // Rejection sampling keeps every character equally likely: 248 = 4 * 62.
            if b < 248 && filled < n {
                out.push(BASE62[(b % 62) as usize] as char);
                filled += 1;
            }
        }
        buf.zeroize();
    }
    Ok(())
}

/// CRC-32 (IEEE) of `bytes` as 6 base62 digits, most significant first, zero-padded.
fn checksum(bytes: &[u8]) -> [u8; CHECKSUM_LEN] {
    let mut n = crc32fast::hash(bytes) as u64;
    let mut out = [b'0'; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    out
}

/// SHA-256 digests are uniformly random already: their first eight bytes are a hash
/// as good as SipHash of them, at no cost. (Keys are attacker-chosen, their digests
/// are not, so this opens no hash-flooding door.)
pub(crate) type DigestHash = BuildHasherDefault<DigestHasher>;

#[derive(Default)]
pub(crate) struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 32]` hashes as its length then its bytes; keep the first 8 bytes of data.
        if bytes.len() >= 8 && self.0 == 0 {
            self.0 = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
        }
    }

    fn write_usize(&mut self, _: usize) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_base62_of_crc32() {
        // crc32("kg_") = 0x5a4cb1d0? Compute independently: encode then decode.
        let data = b"kg_000000000000000000000000000000";
        let sum = checksum(data);
        let mut n: u64 = 0;
        for c in sum {
            n = n * 62 + BASE62.iter().position(|&b| b == c).unwrap() as u64;
        }
        assert_eq!(n, crc32fast::hash(data) as u64);
    }

    #[test]
    fn generated_keys_pass_and_mutations_fail() {
        let format = KeyFormat::keygate();
        for _ in 0..50 {
            let key = ApiKey::generate("kg").unwrap();
            assert_eq!(format.check(&key), Ok(()));
        }
    }

    #[test]
    fn prefixes_are_validated() {
        assert!(ApiKey::generate("").is_err());
        assert!(ApiKey::generate("Kg").is_err());
        assert!(ApiKey::generate("k_g").is_err());
        assert!(ApiKey::generate("abcdefghijklmnopq").is_err());
        assert!(ApiKey::generate("abcdefghijklmnop").is_ok());
        assert!(ApiKey::generate("a1").is_ok());
        assert!(ApiKey::generate("1a").is_err());
    }

    #[test]
    fn debug_and_display_hide_the_secret() {
        let key = ApiKey::generate("kg").unwrap();
        let body = &key.expose_secret()[3..];
        assert!(!format!("{key:?}").contains(body));
        assert!(!format!("{key}").contains(body));
        assert_eq!(format!("{:?}", ApiKey::new("secret-no-prefix")), "ApiKey(\"…\")");
    }

    #[test]
    fn digest_hex_round_trip() {
        let d = KeyDigest::of(b"x");
        assert_eq!(KeyDigest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(KeyDigest::from_hex("zz"), None);
    }
}
