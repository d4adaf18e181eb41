//! A handler's answer, watched on its way to the client.
//!
//! A wasi:http handler hands its response head to a oneshot channel (`response-outparam`)
//! and then writes the body, which the client reads as it is written. The watcher sits on
//! that channel: it forwards the head to the client the moment it comes, so bodies stream as
//! before, and reports what the handler answered once the handler has returned.
//!
//! When the request can be served again by another instance (a retry), the watcher *holds*
//! an error instead of forwarding it: a 5xx head or a wasi:http error code. The held
//! response's body is read and dropped, so that a handler writing it never waits on a client
//! that will not read it; the client's channel is handed back, for the retry's answer.
//!
//! A handler that returns without answering leaves its response channel open when the
//! outparam stays in its store (StarlingMonkey on a reused instance does this): the
//! watcher cannot wait for the channel to close, so it takes the handler's return as the
//! end. The handler answers, if at all, before it returns, so a head not there by then
//! never comes.

use http_body_util::BodyExt;
use hyper::StatusCode;
use tokio::sync::oneshot;

use super::proxy::ResponseSender;

/// What a handler answered, once it returned.
pub enum Answer {
    /// The client has the handler's response, with this status.
    Sent(StatusCode),
    /// The client has nothing yet; its channel is here, and `why` says what the handler did
    /// instead of answering (for the log).
    Held { client: ResponseSender, why: String },
}

/// A handler's answer being watched: [`Watch::finish`] once the handler returned.
pub struct Watch {
    returned: oneshot::Sender<()>,
    answer: oneshot::Receiver<Answer>,
}

/// Watches what the handler given the returned sender answers `client`; with `hold_errors`,
/// an error answer is held for a retry rather than forwarded.
pub fn watch(client: ResponseSender, hold_errors: bool) -> (ResponseSender, Watch) {
    let (handler, mut head): (ResponseSender, _) = oneshot::channel();
    let (returned, has_returned) = oneshot::channel::<()>();
    let (report, answer) = oneshot::channel();
    tokio::spawn(async move {
        let received = tokio::select! {
            biased;
            received = &mut head => received.ok(),
            // The handler returned (or its thread is gone): what it sent, it sent before.
            _ = has_returned => head.try_recv().ok(),
        };
        let answer = match received {
            Some(Ok(response)) if !(hold_errors && response.status().is_server_error()) => {
                let status = response.status();
                let _ = client.send(Ok(response));
                Answer::Sent(status)
            }
            Some(Ok(response)) => {
                let why = format!("it answered {}", response.status());
                tokio::spawn(response.into_body().collect());
                Answer::Held { client, why }
            }
            Some(Err(code)) if !hold_errors => {
                let _ = client.send(Err(code));
                Answer::Sent(StatusCode::INTERNAL_SERVER_ERROR)
            }
            Some(Err(code)) => Answer::Held {
                client,
                why: format!("it answered with an error: {code:?}"),
            },
            None => Answer::Held {
                client,
                why: "it sent no response".into(),
            },
        };
        let _ = report.send(answer);
    });
    (handler, Watch { returned, answer })
}

impl Watch {
    /// What the handler answered; call once it has returned (on a blocking thread).
    pub fn finish(self) -> Answer {
        let _ = self.returned.send(());
        // The watcher ends without a report only when the runtime shuts down; the client's
        // channel went with it, so the client is told the request failed.
        tokio::runtime::Handle::current()
            .block_on(self.answer)
            .unwrap_or(Answer::Sent(StatusCode::INTERNAL_SERVER_ERROR))
    }
}
