//! [`ResponseFuture`]: a free request, an immediate refusal, or the paid flow.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;

use crate::body::ResponseBody;

/// The boxed paid flow (verify → reserve → handler → settle). Boxing keeps the type nameable
/// while the flow has several awaits on trait objects; free and refused requests are not
/// boxed.
pub(crate) type PaidFuture<B, E> =
    Pin<Box<dyn Future<Output = Result<Response<ResponseBody<B>>, E>> + Send>>;

pin_project! {
    /// Response future of [`Payment`](crate::Payment).
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Free { #[pin] future: F },
        Ready { response: Option<Response<ResponseBody<B>>> },
        Paid { future: PaidFuture<B, E> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn free(future: F) -> Self {
        Self {
            kind: Kind::Free { future },
        }
    }

    pub(crate) fn ready(response: Response<ResponseBody<B>>) -> Self {
        Self {
            kind: Kind::Ready {
                response: Some(response),
            },
        }
    }

    pub(crate) fn paid(future: PaidFuture<B, E>) -> Self {
        Self {
            kind: Kind::Paid { future },
        }
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResponseBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Free { future } => {
                let res = ready!(future.poll(cx));
                Poll::Ready(res.map(|r| r.map(ResponseBody::inner)))
            }
            KindProj::Ready { response } => {
                Poll::Ready(Ok(response.take().expect("future polled after completion")))
            }
            KindProj::Paid { future } => future.as_mut().poll(cx),
        }
    }
}
