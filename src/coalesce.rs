//! Holding an HTTP/2 connection's writes until a flush, so that what HTTP/2 has
//! ready leaves in one system call.
//!
//! HTTP/2's framing layer (the `h2` crate) writes a DATA frame of 256 bytes or more
//! out on its own, with a flush, before it encodes the next frame. A gRPC message
//! is followed at once by a frame that ends its stream (the response's trailers, the
//! request's empty end-of-stream DATA frame), so without this every call costs two
//! writes, two TLS records and two wake-ups of the peer on each side. [`Coalesce`]
//! keeps what is written until a flush, and the first flush of held bytes yields
//! once (as `tokio::task::yield_now` does: the task runs again once its runtime
//! thread has polled for I/O, and no other thread is woken for it), so that the
//! frames that follow — and those of other streams ready meanwhile — are written
//! first; the second flush passes everything on in one write. Used by the server's
//! connections (`server::connections::Held`) and by the agent's client connections
//! (`agent::client`). Measured at 64 streams: the server's `writev` per certificate
//! 1.91 → 0.68–0.75, and 2.01 → 1.01 with one connection per stream (docs/performance.md,
//! Performance).

use std::future::Future;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Writes are passed on at once beyond this many bytes held.
const HOLD_AT_MOST: usize = 16 * 1024;
/// The buffer a connection takes when it starts holding bytes (a few messages);
/// it is given back once they are passed on, so an idle connection keeps none.
const HOLD_FIRST: usize = 4 * 1024;

/// A stream whose writes are held until a flush (see the module documentation).
#[derive(Debug)]
pub(crate) struct Coalesce<S> {
    inner: S,
    /// Bytes written and not yet passed on.
    out: Vec<u8>,
    /// How many of `out` have been passed on (a stream may take part of a write).
    passed: usize,
    /// The current flush has yielded once already.
    yielded: bool,
}

impl<S> Coalesce<S> {
    pub(crate) fn new(inner: S) -> Coalesce<S> {
        Coalesce { inner, out: Vec::new(), passed: 0, yielded: false }
    }

    pub(crate) fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncWrite + Unpin> Coalesce<S> {
    /// Passes every held byte on to the stream.
    fn poll_pass_on(&mut self, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        while self.passed < self.out.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.out[self.passed..]))?;
            if n == 0 {
                return Poll::Ready(Err(std::io::ErrorKind::WriteZero.into()));
            }
            self.passed += n;
        }
        self.out = Vec::new();
        self.passed = 0;
        Poll::Ready(Ok(()))
    }

    /// Holds `bufs`, first passing on what is held if they would not fit; writes
    /// larger than [`HOLD_AT_MOST`] go straight to the stream.
    fn poll_hold(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if !self.out.is_empty() && self.out.len() + len > HOLD_AT_MOST {
            ready!(self.poll_pass_on(cx))?;
        }
        if len > HOLD_AT_MOST {
            return Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        }
        if self.out.capacity() == 0 {
            self.out.reserve(HOLD_FIRST);
        }
        for buf in bufs {
            self.out.extend_from_slice(buf);
        }
        Poll::Ready(Ok(len))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesce<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesce<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        self.get_mut().poll_hold(cx, &[std::io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.get_mut().poll_hold(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// The first flush of held bytes yields once; the next passes them on.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if !this.out.is_empty() && !this.yielded {
            this.yielded = true;
            // Its first poll arranges the wake-up and is Pending; dropping it then is fine.
            let _ = std::pin::pin!(tokio::task::yield_now()).as_mut().poll(cx);
            return Poll::Pending;
        }
        ready!(this.poll_pass_on(cx))?;
        this.yielded = false;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_pass_on(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream that records each write it is given, taking at most `max` bytes
    /// of each, and its flushes and shutdown.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
        max: Option<usize>,
        flushes: usize,
        shut: bool,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.max.unwrap_or(usize::MAX));
            self.get_mut().writes.push(buf[..n].to_vec());
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            self.get_mut().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn writes_are_held_until_a_flush_that_yields_once_then_leave_in_one_write() {
        use std::future::poll_fn;
        use tokio::io::AsyncWriteExt;
        let mut s = Coalesce::new(Recorder::default());
        s.write_all(b"DATA frame").await.unwrap();
        let vectored = [std::io::IoSlice::new(b" + "), std::io::IoSlice::new(b"trailers")];
        assert_eq!(poll_fn(|cx| Pin::new(&mut s).poll_write_vectored(cx, &vectored)).await.unwrap(), 11);
        assert!(s.inner.writes.is_empty(), "nothing is written before a flush");

        // The first flush yields (and is woken again); the second writes.
        let mut polls = 0;
        poll_fn(|cx| {
            polls += 1;
            Pin::new(&mut s).poll_flush(cx)
        })
        .await
        .unwrap();
        assert_eq!(polls, 2);
        assert_eq!(s.inner.writes, vec![b"DATA frame + trailers".to_vec()]);
        assert_eq!(s.inner.flushes, 1);
        assert_eq!(s.out.capacity(), 0, "an idle connection keeps no buffer");

        // Nothing held: a flush is passed on at once.
        s.flush().await.unwrap();
        assert_eq!((s.inner.writes.len(), s.inner.flushes), (1, 2));
    }

    #[tokio::test]
    async fn large_writes_pass_through_and_partial_writes_still_deliver_everything_in_order() {
        use tokio::io::AsyncWriteExt;
        let mut s = Coalesce::new(Recorder { max: Some(1000), ..Recorder::default() });
        s.write_all(b"small").await.unwrap();
        let large = vec![7u8; HOLD_AT_MOST + 1];
        s.write_all(&large).await.unwrap();
        // What was held went first, whole; then the large write straight to the
        // stream, which took 1,000 bytes; the rest (now under the bound) is held.
        assert_eq!(s.inner.writes, vec![b"small".to_vec(), vec![7u8; 1000]]);
        s.flush().await.unwrap();
        assert_eq!(s.inner.writes.concat(), [&b"small"[..], &large].concat());

        s.write_all(&[1u8; 2500]).await.unwrap();
        s.shutdown().await.unwrap();
        assert!(s.inner.shut);
        assert_eq!(s.inner.writes.concat()[5 + large.len()..], [1u8; 2500]);
    }
}
