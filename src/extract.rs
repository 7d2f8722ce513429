//! stub (being written)
/// stub
pub enum KeySource {}
