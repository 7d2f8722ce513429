//! Internals the fuzz targets in `fuzz/` reach. Compiled only with `--cfg fuzzing`
//! (which `cargo fuzz` sets), so it is never part of the public API; everything here
//! forwards to the crate's own code without changing it.

use http::Request;

use crate::{AuthError, KeySource};

/// The key `find_key` takes from `req`, and the index of the source it came from.
pub fn find_key<B>(
    req: &Request<B>,
    sources: &[KeySource],
    max_len: usize,
) -> Result<Option<(String, usize)>, AuthError> {
    crate::extract::find_key(req, sources, max_len)
        .map(|found| found.map(|f| (f.key.expose_secret().to_owned(), f.source)))
}

/// Removes the credential `source` names, as the layer does before the inner service.
pub fn strip_credential<B>(req: &mut Request<B>, source: &KeySource) {
    crate::extract::strip_credential(req, source);
}

/// The revocation listener's per-event byte bound, fed the stream chunk by chunk.
#[cfg(feature = "remote")]
pub struct EventBound(crate::remote::EventBound);

#[cfg(feature = "remote")]
impl EventBound {
    /// A bound of `max` bytes per event.
    pub fn new(max: usize) -> Self {
        Self(crate::remote::EventBound::new(max))
    }

    /// What the parser gets of `chunk`, or `None`: the listener ends the stream.
    pub fn accepts(&mut self, chunk: &[u8]) -> Option<Vec<u8>> {
        self.0.accepts(chunk)
    }
}

/// What the listener feeds the parser before the stream's first byte.
#[cfg(feature = "remote")]
pub const PARSER_START: &[u8] = crate::remote::PARSER_START;
