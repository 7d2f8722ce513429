//! stub (being written)
/// stub
pub struct RequireScopes;
