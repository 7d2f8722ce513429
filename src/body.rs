//! Response bodies: keygate answers in the inner service's own body type.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// A response body keygate can write its own rejections in: problem+json for HTTP,
/// nothing for gRPC's trailers-only answers.
///
/// Implemented for axum's and tonic's bodies (with their features), `Full<Bytes>`,
/// `BoxBody` and `UnsyncBoxBody`, and [`KeygateBody`], which wraps any other body.
#[diagnostic::on_unimplemented(
    message = "keygate cannot write a rejection into a `{Self}` response body",
    note = "wrap the inner service's body in `keygate::KeygateBody` (tower-http's `MapResponseBodyLayer::new(KeygateBody::inner)`), or implement `RejectionBody` for it"
)]
///
/// A rejection (401, 403, 503…) is built in the same body type the inner service
/// answers with, through [`RejectionBody`]. Nothing is wrapped on the way out, so axum
/// does not box every response a second time: axum's and tonic's bodies, `Full<Bytes>`
/// and the boxed bodies of `http-body-util` work as they are. Any other body type can
/// be wrapped in [`KeygateBody`] first:
///
/// ```
/// use std::convert::Infallible;
///
/// use http::{Request, Response};
/// use keygate::{ApiKeyLayer, KeygateBody, StaticVerifier};
/// use tower::{ServiceBuilder, service_fn};
/// use tower_http::map_response_body::MapResponseBodyLayer;
///
/// // A `String` body is not a `RejectionBody`: wrap it.
/// let hello = service_fn(|_: Request<()>| async { Ok::<_, Infallible>(Response::new(String::from("hello"))) });
/// let service = ServiceBuilder::new()
///     .layer(ApiKeyLayer::new(StaticVerifier::new()))
///     .layer(MapResponseBodyLayer::new(KeygateBody::<String>::inner))
///     .service(hello);
/// # fn is_service<S: tower::Service<Request<()>>>(_: &S) {}
/// # is_service(&service);
/// ```
pub trait RejectionBody: Sized {
    /// A body holding exactly `data` (which may be empty).
    fn rejection(data: Bytes) -> Self;
}

impl<B> RejectionBody for KeygateBody<B> {
    fn rejection(data: Bytes) -> Self {
        Self::full(data)
    }
}

impl RejectionBody for http_body_util::Full<Bytes> {
    fn rejection(data: Bytes) -> Self {
        Self::new(data)
    }
}

impl<E: 'static> RejectionBody for http_body_util::combinators::UnsyncBoxBody<Bytes, E> {
    fn rejection(data: Bytes) -> Self {
        use http_body_util::BodyExt;
        http_body_util::Full::new(data).map_err(|never| match never {}).boxed_unsync()
    }
}

impl<E: 'static> RejectionBody for http_body_util::combinators::BoxBody<Bytes, E> {
    fn rejection(data: Bytes) -> Self {
        use http_body_util::BodyExt;
        http_body_util::Full::new(data).map_err(|never| match never {}).boxed()
    }
}

#[cfg(feature = "axum")]
impl RejectionBody for axum::body::Body {
    fn rejection(data: Bytes) -> Self {
        if data.is_empty() { Self::empty() } else { Self::from(data) }
    }
}

#[cfg(feature = "tonic")]
impl RejectionBody for tonic::body::Body {
    fn rejection(data: Bytes) -> Self {
        if data.is_empty() { Self::empty() } else { Self::new(http_body_util::Full::new(data)) }
    }
}

pin_project! {
    /// Either an inner body or a short rejection body: wrap a body type that is not
    /// [`RejectionBody`] in this to put keygate in front of it.
    #[project = KeygateBodyProj]
    #[allow(missing_docs)] // fields are described on their variants
    pub enum KeygateBody<B> {
        /// The inner service's body.
        Inner {
            #[pin]
            body: B,
        },
        /// A rejection body (`None` once sent, or for an empty body).
        Rejection {
            data: Option<Bytes>,
        },
    }
}

impl<B> KeygateBody<B> {
    /// Wraps the inner service's body.
    pub fn inner(body: B) -> Self {
        Self::Inner { body }
    }

    /// A complete body of `data`.
    pub fn full(data: Bytes) -> Self {
        Self::Rejection { data: (!data.is_empty()).then_some(data) }
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::Rejection { data: None }
    }
}

impl<B> Body for KeygateBody<B>
where
    B: Body<Data = Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project() {
            KeygateBodyProj::Inner { body } => body.poll_frame(cx),
            KeygateBodyProj::Rejection { data } => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Inner { body } => body.is_end_stream(),
            Self::Rejection { data } => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Inner { body } => body.size_hint(),
            Self::Rejection { data } => SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}
