//! The pieces of the OpenAPI document that no single route owns: the two bearer
//! security schemes, the error answers every route shares, and the rendering that
//! makes the served document and `docs/openapi.json` byte for byte the same.
//!
//! The document itself is derived in `api`, next to the routes it describes.

use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::schema::{ObjectBuilder, Type};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi, Ref, RefOr, Response, ResponseBuilder};
use utoipa::{Modify, ToResponse};

/// The security scheme of the admin routes.
pub(crate) const ADMIN_TOKEN: &str = "admin_token";
/// The security scheme of the middleware's routes (verify, usage, events).
pub(crate) const SERVICE_TOKEN: &str = "service_token";

/// Adds the two bearer schemes; each route names the one it takes.
pub(crate) struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new().scheme(HttpAuthScheme::Bearer).description(Some(description.to_owned())).build(),
            )
        };
        components.add_security_scheme(
            ADMIN_TOKEN,
            bearer(
                "An active admin token (`kga_...`, or the configured bootstrap admin token): every route but \
                 verify, usage upload, events, `/healthz` and `/openapi.json`. Its name is the audit actor.",
            ),
        );
        components.add_security_scheme(
            SERVICE_TOKEN,
            bearer(
                "An active service token (`kgs_...`, or the configured bootstrap service token): what \
                 middlewares send to `POST /v1/keys/verify`, `POST /v1/usage` and `GET /v1/events`.",
            ),
        );
    }
}

/// An error answer: `ErrorBody` as JSON, with `description`.
fn error(description: &str) -> ResponseBuilder {
    let body = ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build();
    ResponseBuilder::new().description(description).content("application/json", body)
}

macro_rules! error_response {
    ($(#[$doc:meta])* $name:ident, $description:expr) => {
        $(#[$doc])*
        pub(crate) struct $name;

        impl<'s> ToResponse<'s> for $name {
            fn response() -> (&'s str, RefOr<Response>) {
                (stringify!($name), error($description).build().into())
            }
        }
    };
}

error_response!(
    /// 400.
    BadRequest,
    "The request is malformed or fails validation: `error` names the check (`invalid_json`, `invalid_request`, \
     `invalid_query`, `invalid_scope`, `unknown_role`, `empty_key`, ...) and `message` the field and the reason."
);
error_response!(
    /// 404.
    NotFound,
    "No such key, role, alert, token or webhook (`not_found`)."
);
error_response!(
    /// 409.
    Conflict,
    "The request conflicts with the current state (`conflict`): `message` says with what."
);
error_response!(
    /// 413.
    TooLarge,
    "The body is larger than the route accepts (`payload_too_large`)."
);
error_response!(
    /// 500.
    Internal,
    "Anything else (`internal`); the details go to the server's log, not to the client."
);

/// 401, with the `WWW-Authenticate` challenge.
pub(crate) struct Unauthorized;

impl<'s> ToResponse<'s> for Unauthorized {
    fn response() -> (&'s str, RefOr<Response>) {
        let challenge = HeaderBuilder::new()
            .schema(ObjectBuilder::new().schema_type(Type::String))
            .description(Some("`Bearer realm=\"keygate\"`"))
            .build();
        let response = error(
            "A missing, malformed, unknown or revoked bearer token, or one of the wrong kind for this route \
             (`unauthorized`).",
        )
        .header("WWW-Authenticate", challenge)
        .build();
        ("Unauthorized", response.into())
    }
}

/// 503.
pub(crate) struct Unavailable;

impl<'s> ToResponse<'s> for Unavailable {
    fn response() -> (&'s str, RefOr<Response>) {
        let retry = HeaderBuilder::new()
            .schema(ObjectBuilder::new().schema_type(Type::Integer))
            .description(Some("Seconds to wait (`GET /v1/events` past its subscriber cap, a shed verification)."))
            .build();
        let response = error(
            "The store cannot be reached (`unavailable`); on `GET /v1/events`, also the subscriber cap is reached \
             (`too_many_subscribers`, with `Retry-After`); on `POST /v1/keys/verify`, also too many verifications \
             are in progress (`overloaded`, with `Retry-After`).",
        )
        .header("Retry-After", retry)
        .build();
        ("Unavailable", response.into())
    }
}

/// The document as served and committed: pretty-printed JSON, one trailing newline.
/// Every map in it is ordered (paths, components, properties), so a change to the API
/// is a readable diff.
pub(crate) fn render(doc: &OpenApi) -> String {
    // Every object's keys sorted (also where another crate turns on serde_json's
    // `preserve_order`): the order no longer depends on how the document was assembled.
    let mut value = serde_json::to_value(doc).unwrap_or(serde_json::Value::Null);
    sort_keys(&mut value);
    let mut text = serde_json::to_string_pretty(&value).unwrap_or_default();
    text.push('\n');
    text
}

fn sort_keys(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            map.sort_keys();
            map.values_mut().for_each(sort_keys);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(sort_keys),
        _ => {}
    }
}
