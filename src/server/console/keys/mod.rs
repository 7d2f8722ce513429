//! The keys pages: the list ([`list`]), one key and its actions ([`key`]), and
//! creating a key ([`create`]).

mod create;
mod key;
mod list;
pub(super) mod usage;

pub(super) use create::{create, new_form, reveal};
pub(super) use key::{edit, refused_page, revoke, rotate, set_disabled, show};
pub(super) use list::list;

use maud::{Markup, html};

use crate::server::model::KeyInfo;

/// The key's state word, as the list filters it.
pub(crate) fn state_of(k: &KeyInfo) -> &'static str {
    if k.revoked {
        "revoked"
    } else if k.expires_at.is_some_and(|at| at <= time::OffsetDateTime::now_utc()) {
        "expired"
    } else if k.disabled {
        "disabled"
    } else {
        "active"
    }
}

/// The key's state as a badge.
pub(crate) fn badge(k: &KeyInfo) -> Markup {
    let state = state_of(k);
    html! { span class={ "badge " (state) } { (state) } }
}
