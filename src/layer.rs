//! stub (being written)
/// Marker in request extensions for requests let through without a key.
#[derive(Debug, Clone, Copy)]
pub struct Anonymous;
/// Default realm.
pub const DEFAULT_REALM: &str = "api";
/// stub
pub struct ApiKeyLayer;
/// stub
pub struct ApiKeyService;
