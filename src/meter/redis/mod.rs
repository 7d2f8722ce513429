//! Fleet-wide limits and credits on Redis.

// Used by the engine and the key service's reconciler as they land.
#[allow(dead_code)]
pub(crate) mod schema;
