//! The reference key service.
