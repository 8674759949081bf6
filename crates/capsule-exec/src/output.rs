//! Guest stdout/stderr: streamed live to the host terminal and kept, up to a bound, for the
//! result envelope. A task printing without end cannot exhaust the host's memory.

use std::io::Write;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use serde::Serialize;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

/// How much of each stream an envelope keeps.
pub const CAPTURE_LIMIT: usize = 1 << 20;

/// Where the live copy of a guest stream goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LiveSink {
    Stdout,
    Stderr,
    /// Not shown, only captured.
    Quiet,
}

/// What a task printed on one stream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Captured {
    pub text: String,
    /// More was printed than [`CAPTURE_LIMIT`]; the rest was streamed but not kept.
    pub truncated: bool,
}

#[derive(Default)]
struct Buffer {
    bytes: Vec<u8>,
    truncated: bool,
}

/// A guest output stream; clone it to keep a handle for reading the capture afterwards.
#[derive(Clone)]
pub struct TeeOutput {
    live: LiveSink,
    buffer: Arc<Mutex<Buffer>>,
}

impl TeeOutput {
    pub fn new(live: LiveSink) -> Self {
        Self { live, buffer: Arc::default() }
    }

    pub fn captured(&self) -> Captured {
        let buffer = self.buffer.lock().expect("capture lock");
        Captured { text: String::from_utf8_lossy(&buffer.bytes).into_owned(), truncated: buffer.truncated }
    }

    fn write(&self, data: &[u8]) {
        // Live output is best effort: a closed terminal must not fail the task.
        let _ = match self.live {
            LiveSink::Stdout => std::io::stdout().lock().write_all(data),
            LiveSink::Stderr => std::io::stderr().lock().write_all(data),
            LiveSink::Quiet => Ok(()),
        };
        let mut buffer = self.buffer.lock().expect("capture lock");
        let room = CAPTURE_LIMIT.saturating_sub(buffer.bytes.len());
        if data.len() > room {
            buffer.truncated = true;
        }
        buffer.bytes.extend_from_slice(&data[..data.len().min(room)]);
    }
}

impl IsTerminal for TeeOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for TeeOutput {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

impl tokio::io::AsyncWrite for TeeOutput {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        self.write(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let _ = match self.live {
            LiveSink::Stdout => std::io::stdout().flush(),
            LiveSink::Stderr => std::io::stderr().flush(),
            LiveSink::Quiet => Ok(()),
        };
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.poll_flush(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_is_bounded_and_flagged() {
        let out = TeeOutput::new(LiveSink::Quiet);
        out.write(b"hello ");
        assert_eq!(out.captured(), Captured { text: "hello ".into(), truncated: false });
        out.write(&vec![b'x'; CAPTURE_LIMIT]);
        let captured = out.captured();
        assert_eq!(captured.text.len(), CAPTURE_LIMIT);
        assert!(captured.truncated);
    }
}
