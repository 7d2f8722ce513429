//! Caller authentication: a service token (verify, usage, events) and a separate admin
//! token (everything else), as `Authorization: Bearer <token>`.
//!
//! Tokens are compared as SHA-256 digests with [`subtle`], so neither the content nor
//! the length of a configured token leaks through timing.

use http::header::AUTHORIZATION;
use http::request::Parts;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::key::KeyDigest;

/// The configured tokens, kept only as digests.
#[derive(Clone)]
pub(crate) struct Tokens {
    pub(crate) service: KeyDigest,
    pub(crate) admin: KeyDigest,
}

impl Tokens {
    pub(crate) fn new(service: &str, admin: &str) -> Self {
        Self { service: KeyDigest::of(service.as_bytes()), admin: KeyDigest::of(admin.as_bytes()) }
    }
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tokens(…)")
    }
}

/// Proof that the request carried the admin token. Its audit actor is `admin`.
#[derive(Debug, Clone, Copy)]
pub struct Admin;

impl Admin {
    /// The audit log's actor name.
    pub const ACTOR: &'static str = "admin";
}

/// Proof that the request carried the service token.
#[derive(Debug, Clone, Copy)]
pub struct Service;

fn presented(parts: &Parts) -> Result<KeyDigest, ApiError> {
    let mut values = parts.headers.get_all(AUTHORIZATION).iter();
    let value = values.next().ok_or(ApiError::Unauthorized("missing `Authorization: Bearer <token>`"))?;
    if values.next().is_some() {
        return Err(ApiError::Unauthorized("more than one Authorization header"));
    }
    let value = value.to_str().map_err(|_| ApiError::Unauthorized("the Authorization header is not ASCII"))?;
    let (scheme, token) = value.split_once(' ').ok_or(ApiError::Unauthorized("expected `Bearer <token>`"))?;
    let token = token.trim_start_matches(' ');
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(ApiError::Unauthorized("expected `Bearer <token>`"));
    }
    Ok(KeyDigest::of(token.as_bytes()))
}

/// Whether the request carries the token whose digest is `expected`.
pub(crate) fn check(parts: &Parts, expected: &KeyDigest) -> Result<(), ApiError> {
    let got = presented(parts)?;
    if bool::from(got.as_bytes().ct_eq(expected.as_bytes())) {
        Ok(())
    } else {
        Err(ApiError::Unauthorized("invalid token for this route"))
    }
}
