//! Guest stdout/stderr: streamed live to the run's event sink and kept, up to a bound, for
//! the result envelope. A task printing without end cannot exhaust the host's memory.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};

use crate::events::{CallId, Event, EventSink, Stream};
use crate::outcome::Captured;

/// How much of each stream an envelope keeps.
pub const CAPTURE_LIMIT: usize = 1 << 20;

#[derive(Default)]
struct Buffer {
    bytes: Vec<u8>,
    truncated: bool,
}

/// A guest output stream; clone it to keep a handle for reading the capture afterwards.
#[derive(Clone)]
pub struct TeeOutput {
    live: Option<(Arc<dyn EventSink>, CallId)>,
    /// Not reported while set (a session replaying its calls), only captured.
    muted: Arc<AtomicBool>,
    stream: Stream,
    buffer: Arc<Mutex<Buffer>>,
}

impl TeeOutput {
    /// Captures only.
    pub fn quiet(stream: Stream) -> Self {
        Self { live: None, muted: Arc::default(), stream, buffer: Arc::default() }
    }

    /// Captures, and reports every write as an [`Event::Output`] of `call`.
    pub fn reporting(stream: Stream, sink: Arc<dyn EventSink>, call: CallId) -> Self {
        Self { live: Some((sink, call)), muted: Arc::default(), stream, buffer: Arc::default() }
    }

    pub fn captured(&self) -> Captured {
        let buffer = self.buffer.lock().expect("capture lock");
        Captured { text: String::from_utf8_lossy(&buffer.bytes).into_owned(), truncated: buffer.truncated }
    }

    pub fn mute(&self, muted: bool) {
        self.muted.store(muted, Ordering::Relaxed);
    }

    /// What was captured, emptying the capture (a session's next call starts afresh).
    pub fn take(&self) -> Captured {
        let mut buffer = self.buffer.lock().expect("capture lock");
        let taken = std::mem::take(&mut *buffer);
        Captured { text: String::from_utf8_lossy(&taken.bytes).into_owned(), truncated: taken.truncated }
    }

    fn write(&self, data: &[u8]) {
        if let Some((sink, call)) = self.live.as_ref().filter(|_| !self.muted.load(Ordering::Relaxed)) {
            sink.event(&Event::Output { call: *call, stream: self.stream, text: data.into() });
        }
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
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_is_bounded_and_flagged() {
        let out = TeeOutput::quiet(Stream::Stdout);
        out.write(b"hello ");
        assert_eq!(out.captured(), Captured { text: "hello ".into(), truncated: false });
        out.write(&vec![b'x'; CAPTURE_LIMIT]);
        let captured = out.captured();
        assert_eq!(captured.text.len(), CAPTURE_LIMIT);
        assert!(captured.truncated);
    }
}
