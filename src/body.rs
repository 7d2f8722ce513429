//! The layer's response body: the inner service's body, or a rejection's.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

pin_project! {
    /// Either the inner service's body or a short rejection body.
    ///
    /// keygate answers rejections itself (problem+json for HTTP, an empty body for gRPC
    /// trailers-only responses), so its services cannot reuse the inner body type: this
    /// body is either. It works with axum's and tonic's bodies alike, and any other
    /// whose data is [`Bytes`].
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
