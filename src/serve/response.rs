//! The responses the host writes itself, rather than a guest: bodies of bytes in the shape
//! wasi:http's responses have, so that both go out through one hyper service.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

/// `bytes` as a whole body, typed as a guest's response body is.
pub fn full_body(bytes: Bytes) -> HyperOutgoingBody {
    Full::new(bytes)
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

/// A plain-text response of one line, `message`.
pub fn text_response(
    status: hyper::StatusCode,
    message: String,
) -> hyper::Response<HyperOutgoingBody> {
    let mut response = hyper::Response::new(full_body(Bytes::from(message + "\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
