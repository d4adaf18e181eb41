//! Where a guest's stdout and stderr go: captured in memory, inherited from the host, dropped,
//! or written to the host's stream a line at a time behind a prefix, so that the output of
//! many instances stays readable (`[3] hello`).
//!
//! A prefixed stream keeps the unfinished last line of its guest until the guest ends it or
//! the instance is dropped, then writes each whole line with one `write_all` under the host
//! stream's lock: lines of different instances never interleave within a line.

use std::io::Write;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use parking_lot::Mutex;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError, StreamResult};

/// What becomes of one of a guest's output streams.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum GuestOutput {
    /// Kept in memory (up to 16 MiB; a guest that writes more traps), for
    /// [`crate::Instance::stdout`] and [`crate::Instance::stderr`].
    #[default]
    Capture,
    /// Written straight to the host's own stream, as `wasmtime run` does.
    Inherit,
    /// Written to the host's stream `to`, each line behind `prefix`.
    Prefixed { prefix: String, to: HostStream },
    /// Thrown away.
    Discard,
}

/// One of the host's own output streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostStream {
    Stdout,
    Stderr,
}

impl HostStream {
    fn write_line(self, line: &[u8]) -> std::io::Result<()> {
        match self {
            HostStream::Stdout => std::io::stdout().lock().write_all(line),
            HostStream::Stderr => std::io::stderr().lock().write_all(line),
        }
    }
}

/// The longest line a prefixed stream keeps before writing it: output without line ends
/// (binary data) is written in pieces of this length rather than held without bound.
const LONGEST_LINE: usize = 64 << 10;

/// A guest stream written line by line, each line behind a prefix. Clones share the
/// unfinished line.
#[derive(Clone)]
pub(crate) struct PrefixedOutput {
    inner: Arc<Mutex<Prefixer>>,
}

/// The state behind a [`PrefixedOutput`].
struct Prefixer {
    prefix: Vec<u8>,
    host: HostStream,
    /// Bytes of the line the guest has not ended yet.
    unfinished: Vec<u8>,
}

impl PrefixedOutput {
    pub(crate) fn new(prefix: &str, host: HostStream) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Prefixer {
                prefix: prefix.as_bytes().to_vec(),
                host,
                unfinished: Vec::new(),
            })),
        }
    }

    /// Writes the guest's unfinished line, if there is one, as a line of its own: called when
    /// the guest's run ends, so that its last words appear then and not when it is dropped.
    pub(crate) fn finish_line(&self) {
        let mut prefixer = self.inner.lock();
        if !prefixer.unfinished.is_empty() {
            let line = std::mem::take(&mut prefixer.unfinished);
            let _ = prefixer.emit(&line);
        }
    }

    fn write_bytes(&self, mut bytes: &[u8]) -> std::io::Result<()> {
        let mut prefixer = self.inner.lock();
        // Only the new bytes are searched for line ends; a line longer than `LONGEST_LINE`
        // is written in pieces of that length, each a line of its own.
        while !bytes.is_empty() {
            let room = LONGEST_LINE - prefixer.unfinished.len();
            let take = match bytes.iter().take(room).position(|&b| b == b'\n') {
                Some(end) => end + 1,
                None => bytes.len().min(room),
            };
            prefixer.unfinished.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if prefixer.unfinished.ends_with(b"\n") || prefixer.unfinished.len() == LONGEST_LINE {
                let line = std::mem::take(&mut prefixer.unfinished);
                prefixer.emit(&line)?;
            }
        }
        Ok(())
    }
}

impl Prefixer {
    fn emit(&self, line: &[u8]) -> std::io::Result<()> {
        let mut prefixed = Vec::with_capacity(self.prefix.len() + line.len() + 1);
        prefixed.extend_from_slice(&self.prefix);
        prefixed.extend_from_slice(line);
        if !line.ends_with(b"\n") {
            prefixed.push(b'\n');
        }
        self.host.write_line(&prefixed)
    }
}

impl Drop for Prefixer {
    /// The guest's last line, if it did not end it.
    fn drop(&mut self) {
        if !self.unfinished.is_empty() {
            let _ = self.emit(&self.unfinished);
        }
    }
}

impl IsTerminal for PrefixedOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for PrefixedOutput {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for PrefixedOutput {
    async fn ready(&mut self) {}
}

impl OutputStream for PrefixedOutput {
    fn write(&mut self, bytes: bytes::Bytes) -> StreamResult<()> {
        self.write_bytes(&bytes)
            .map_err(|e| StreamError::LastOperationFailed(e.into()))
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 << 10)
    }
}

impl tokio::io::AsyncWrite for PrefixedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Poll::Ready(self.write_bytes(buf).map(|()| buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_unended_output_is_written_in_pieces() {
        let stream = PrefixedOutput::new("[0] ", HostStream::Stderr);
        stream
            .write_bytes(&vec![b'x'; LONGEST_LINE * 2 + 10])
            .expect("write");
        assert_eq!(stream.inner.lock().unfinished.len(), 10);
        stream.write_bytes(b"y\nz").expect("write");
        assert_eq!(stream.inner.lock().unfinished, b"z");
        stream.finish_line();
        assert!(stream.inner.lock().unfinished.is_empty());
    }
}
