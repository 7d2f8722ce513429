//! The service token every client presents: a fixed one, or one read from a file that
//! is read again when it may have changed (every poll interval, and at once when the
//! key service refused the token), so that a secret rotated by Kubernetes or Vault is
//! picked up without a restart and without a failed request.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::HeaderValue;
use zeroize::Zeroizing;

use crate::key::KeyDigest;

use super::{RemoteConfigError, service_token_header};

/// Default interval at which a service-token file is read again: 5 s.
pub const DEFAULT_TOKEN_FILE_POLL: Duration = Duration::from_secs(5);
/// Largest service-token file read: 4 KiB.
pub const MAX_TOKEN_FILE_BYTES: usize = 4096;

/// The token a client presents now.
pub(crate) enum Auth {
    /// Set on the builder.
    Fixed(HeaderValue),
    /// Read from a file.
    File(TokenFile),
}

/// Which token a request carried, to tell after a refusal whether another one is
/// there to try.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket(u64);

impl Auth {
    /// The header to send now, and its ticket.
    pub(crate) async fn header(&self) -> (HeaderValue, Ticket) {
        match self {
            Self::Fixed(h) => (h.clone(), Ticket(0)),
            Self::File(f) => f.header().await,
        }
    }

    /// The key service refused the token of `ticket` (401): reads the file again
    /// unless that was done since, and says whether a different token is now there to
    /// retry with.
    pub(crate) async fn refused(&self, ticket: Ticket) -> bool {
        match self {
            Self::Fixed(_) => false,
            Self::File(f) => f.refused(ticket).await,
        }
    }
}

struct Current {
    header: HeaderValue,
    generation: u64,
    digest: KeyDigest,
}

#[derive(Default)]
struct Reads {
    /// When the latest read started.
    last: Option<Instant>,
    /// Whether the latest read failed (warned once per failing spell).
    failing: bool,
}

/// A token file, read at most every `poll` on the request path and at once after a
/// refusal; a read that fails or finds no usable token keeps the token read before.
pub(crate) struct TokenFile {
    path: PathBuf,
    poll: Duration,
    origin: Instant,
    next_read_ms: AtomicU64,
    current: RwLock<Current>,
    reads: tokio::sync::Mutex<Reads>,
}

impl TokenFile {
    /// Reads the file once: it must hold a usable token now.
    pub(crate) fn open(path: PathBuf, poll: Duration) -> Result<Self, RemoteConfigError> {
        let fail = |reason: String| RemoteConfigError::TokenFile { path: path.clone(), reason };
        let token = read_token(&path).map_err(fail)?;
        let header = service_token_header(Some(token.as_str()))?;
        let file = Self {
            poll,
            origin: Instant::now(),
            next_read_ms: AtomicU64::new(0),
            current: RwLock::new(Current { header, generation: 0, digest: KeyDigest::of(token.as_bytes()) }),
            reads: tokio::sync::Mutex::new(Reads { last: Some(Instant::now()), failing: false }),
            path,
        };
        file.schedule();
        Ok(file)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn schedule(&self) {
        let poll = u64::try_from(self.poll.as_millis()).unwrap_or(u64::MAX);
        self.next_read_ms.store(self.now_ms().saturating_add(poll), Ordering::Relaxed);
    }

    fn snapshot(&self) -> (HeaderValue, Ticket) {
        let c = self.current.read().unwrap_or_else(|e| e.into_inner());
        (c.header.clone(), Ticket(c.generation))
    }

    async fn header(&self) -> (HeaderValue, Ticket) {
        if self.now_ms() >= self.next_read_ms.load(Ordering::Relaxed) {
            // One caller reads; the others go on with the token they have.
            if let Ok(mut reads) = self.reads.try_lock() {
                self.read(&mut reads).await;
            }
        }
        self.snapshot()
    }

    async fn refused(&self, ticket: Ticket) -> bool {
        let refused_at = Instant::now();
        let mut reads = self.reads.lock().await;
        // A read that started after this refusal saw what the file holds now.
        if reads.last.is_none_or(|started| started < refused_at) {
            self.read(&mut reads).await;
        }
        drop(reads);
        self.snapshot().1.0 != ticket.0
    }

    async fn read(&self, reads: &mut Reads) {
        reads.last = Some(Instant::now());
        self.schedule();
        let path = self.path.clone();
        let read = tokio::task::spawn_blocking(move || read_token(&path))
            .await
            .unwrap_or_else(|_| Err("the read was cancelled".into()));
        let token = match read.and_then(|t| {
            service_token_header(Some(t.as_str())).map(|h| (h, KeyDigest::of(t.as_bytes()))).map_err(|e| e.to_string())
        }) {
            Ok(token) => token,
            Err(why) => {
                if !std::mem::replace(&mut reads.failing, true) {
                    tracing::warn!(path = %self.path.display(), error = %why, "cannot read the service token file; keeping the token read before");
                }
                return;
            }
        };
        if std::mem::take(&mut reads.failing) {
            tracing::info!(path = %self.path.display(), "the service token file is readable again");
        }
        let (header, digest) = token;
        let mut c = self.current.write().unwrap_or_else(|e| e.into_inner());
        if c.digest != digest {
            c.header = header;
            c.digest = digest;
            c.generation += 1;
            drop(c);
            tracing::info!(path = %self.path.display(), "the service token file holds a new token; using it");
        }
    }
}

/// The token in `path`: at most [`MAX_TOKEN_FILE_BYTES`], surrounding whitespace (the
/// trailing newline) trimmed, not empty. Errors never include the contents.
fn read_token(path: &Path) -> Result<Zeroizing<String>, String> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Zeroizing::new(Vec::with_capacity(128));
    file.take(MAX_TOKEN_FILE_BYTES as u64 + 1).read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    if bytes.len() > MAX_TOKEN_FILE_BYTES {
        return Err(format!("larger than {MAX_TOKEN_FILE_BYTES} bytes; expected one token"));
    }
    let text = std::str::from_utf8(&bytes).map_err(|_| "not UTF-8 text".to_owned())?;
    let token = text.trim();
    if token.is_empty() {
        return Err("empty".into());
    }
    Ok(Zeroizing::new(token.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_trimmed_bounded_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret-token\n").unwrap();
        assert_eq!(read_token(&path).unwrap().as_str(), "s3cret-token");
        std::fs::write(&path, "\r\n").unwrap();
        assert!(read_token(&path).is_err());
        std::fs::write(&path, vec![b'a'; MAX_TOKEN_FILE_BYTES + 1]).unwrap();
        assert!(read_token(&path).unwrap_err().contains("larger"));
        std::fs::write(&path, "two words\n").unwrap();
        let err = TokenFile::open(path.clone(), DEFAULT_TOKEN_FILE_POLL).err().unwrap();
        assert_eq!(err, RemoteConfigError::InvalidServiceToken);
        assert!(!err.to_string().contains("words"));
        let missing = TokenFile::open(dir.path().join("nope"), DEFAULT_TOKEN_FILE_POLL).err().unwrap();
        assert!(matches!(missing, RemoteConfigError::TokenFile { .. }), "{missing}");
    }
}
