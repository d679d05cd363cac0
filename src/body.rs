//! The response body: the inner service's body, or bytes the layer wrote itself.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use pin_project_lite::pin_project;

pin_project! {
    /// Either the inner service's body or a layer-made one (402 challenge, 400, 503), so the
    /// layer needs no `B: Default` and works with axum, tonic and hyper bodies alike.
    pub struct ResponseBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        Inner { #[pin] body: B },
        // The handler's body of a settled payment: an error while it streams is raised (the
        // client paid and has the receipt, but not all of the content).
        Paid { #[pin] body: B, raised: bool },
        Full { #[pin] body: Full<Bytes> },
        // The handler's body, read to the end by the layer (to store it for idempotent
        // replay), then its trailers.
        Buffered { #[pin] body: Full<Bytes>, trailers: Option<HeaderMap> },
    }
}

impl<B> std::fmt::Debug for ResponseBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_from_layer() {
            "Full"
        } else {
            "Inner"
        };
        f.debug_tuple("ResponseBody").field(&kind).finish()
    }
}

impl<B> ResponseBody<B> {
    pub(crate) fn inner(body: B) -> Self {
        Self {
            kind: Kind::Inner { body },
        }
    }

    /// The handler's body of a settled payment (see [`Kind::Paid`]).
    pub(crate) fn paid(body: B) -> Self {
        Self {
            kind: Kind::Paid {
                body,
                raised: false,
            },
        }
    }

    /// The same body, no longer raising its own failure (the caller reports it).
    pub(crate) fn unmarked(self) -> Self {
        match self.kind {
            Kind::Paid { body, .. } => Self::inner(body),
            kind => Self { kind },
        }
    }

    pub(crate) fn full(bytes: impl Into<Bytes>) -> Self {
        Self {
            kind: Kind::Full {
                body: Full::new(bytes.into()),
            },
        }
    }

    pub(crate) fn buffered(bytes: Bytes, trailers: Option<HeaderMap>) -> Self {
        Self {
            kind: Kind::Buffered {
                body: Full::new(bytes),
                trailers,
            },
        }
    }

    /// True when the layer wrote this body (a refusal or challenge), not the handler.
    pub fn is_from_layer(&self) -> bool {
        matches!(self.kind, Kind::Full { .. })
    }
}

impl<B: Body<Data = Bytes>> Body for ResponseBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.project().kind.project() {
            KindProj::Inner { body } => body.poll_frame(cx),
            KindProj::Paid { body, raised } => {
                let frame = body.poll_frame(cx);
                if matches!(frame, Poll::Ready(Some(Err(_)))) && !*raised {
                    *raised = true;
                    crate::alert::alert!(
                        crate::alert::Alert::ResponseBody,
                        "a paid response's body failed while streaming, after settlement: the \
                         client has the receipt but not all of the content; refund or serve it \
                         by hand"
                    );
                }
                frame
            }
            KindProj::Full { body } => body.poll_frame(cx).map_err(|never| match never {}),
            KindProj::Buffered { body, trailers } => match body.poll_frame(cx) {
                Poll::Ready(Some(frame)) => {
                    Poll::Ready(Some(frame.map_err(|never| match never {})))
                }
                Poll::Ready(None) => Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t)))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Inner { body } | Kind::Paid { body, .. } => body.is_end_stream(),
            Kind::Full { body } => body.is_end_stream(),
            Kind::Buffered { body, trailers } => body.is_end_stream() && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Inner { body } | Kind::Paid { body, .. } => body.size_hint(),
            Kind::Full { body } | Kind::Buffered { body, .. } => body.size_hint(),
        }
    }
}
