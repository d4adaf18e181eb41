//! Why a request got no response from its function, and what the client is told instead.
//!
//! The client's answer never carries the guest's internals (a trap's backtrace, a host
//! path): those go to the host's log, through `Display`.

use std::time::Duration;

use wasmtime_wasi_http::p2::body::HyperOutgoingBody;

use super::budget::OverBudget;
use super::response::text_response;

/// Why a request got no response from its function.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// No instance could be made: the program's instantiation failed.
    #[error("instantiating it failed: {0}")]
    Instantiate(String),
    /// The guest trapped, or a command exited with a failure status.
    #[error("it trapped: {0}")]
    Trapped(String),
    /// The handler returned without answering, or answered with a wasi:http error.
    #[error("it did not answer: {0}")]
    Unanswered(String),
    /// The request's time ran out in wasm (after the request timeout, when there is one).
    #[error("{}", match .0 {
        Some(after) => format!("it timed out after {after:?}"),
        None => "it was interrupted".to_owned(),
    })]
    TimedOut(Option<Duration>),
    /// A WAGI command's output is not a CGI response (502, as a gateway answers).
    #[error("{0}")]
    BadResponse(String),
    /// No instance fits the memory budget.
    #[error(transparent)]
    OverBudget(#[from] OverBudget),
    /// The host failed around the guest.
    #[error("the host failed: {0}")]
    Internal(String),
}

impl Failure {
    /// The client's answer: the status, and a line saying what happened without the guest's
    /// internals (the host's log has those).
    pub fn response(&self) -> hyper::Response<HyperOutgoingBody> {
        let (status, message) = match self {
            Failure::Instantiate(_) => (500, "the function could not be instantiated".to_owned()),
            Failure::Trapped(_) | Failure::Unanswered(_) => (500, "the function failed".to_owned()),
            Failure::TimedOut(_) => (500, self.to_string()),
            Failure::BadResponse(_) => (502, self.to_string()),
            Failure::OverBudget(_) => (503, self.to_string()),
            Failure::Internal(_) => (500, "the host failed".to_owned()),
        };
        let status = hyper::StatusCode::from_u16(status).expect("a valid status");
        let mut response = text_response(status, message);
        if let Failure::OverBudget(_) = self {
            // Memory frees as idle instances expire or requests end: worth a retry soon.
            response.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from_static("1"),
            );
        }
        response
    }
}
