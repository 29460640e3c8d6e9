//! The admin listener's connections: few and short-lived, so that a flood of them can
//! neither use up the process's file descriptors (which the gRPC listener needs) nor
//! keep the kubelet's probes out.
//!
//! At most [`MAX_CONNECTIONS`] are open at once: a new one beyond that evicts the
//! oldest (its next read or write fails), so a probe on a new connection is always
//! answered however many idle connections an attacker opened first. Each lives at most
//! [`LIFETIME`] from its accept, whatever it is doing: `/live`, `/ready` and
//! `/metrics` answer in milliseconds, and a scraper that keeps its connection alive
//! simply opens another.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Sleep;
use tokio_stream::wrappers::WatchStream;
use tokio_stream::Stream;

/// Admin connections open at once; a new one beyond this evicts the oldest.
pub const MAX_CONNECTIONS: usize = crate::admission::descriptors::ADMIN_CONNECTIONS;
/// Longest an admin connection lives, from its accept.
pub const LIFETIME: Duration = Duration::from_secs(5);

/// Connections open, oldest first, each with the switch that evicts it.
type Open = Arc<Mutex<VecDeque<(u64, watch::Sender<bool>)>>>;

/// A TCP listener whose connections are bounded in number and in lifetime.
#[derive(Debug)]
pub(crate) struct Limited {
    inner: TcpListener,
    open: Open,
    next: u64,
}

impl Limited {
    pub(crate) fn new(inner: TcpListener) -> Limited {
        Limited { inner, open: Open::default(), next: 0 }
    }
}

impl axum::serve::Listener for Limited {
    type Io = Short;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Short, SocketAddr) {
        // axum's accept: logs an error and retries (after a pause when out of descriptors).
        let (tcp, addr) = axum::serve::Listener::accept(&mut self.inner).await;
        let (evict, evicted) = watch::channel(false);
        let id = self.next;
        self.next += 1;
        {
            let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
            while open.len() >= MAX_CONNECTIONS {
                if let Some((_, oldest)) = open.pop_front() {
                    let _ = oldest.send(true);
                }
            }
            open.push_back((id, evict));
        }
        let short = Short {
            tcp,
            deadline: Box::pin(tokio::time::sleep(LIFETIME)),
            evicted: WatchStream::from_changes(evicted),
            id,
            open: self.open.clone(),
        };
        (short, addr)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// An admin connection: its reads and writes fail once it is evicted or its
/// [`LIFETIME`] is over, and hyper then drops it.
#[derive(Debug)]
pub(crate) struct Short {
    tcp: TcpStream,
    deadline: Pin<Box<Sleep>>,
    evicted: WatchStream<bool>,
    id: u64,
    open: Open,
}

impl Short {
    /// Evicted or too old; registers this task to be woken when it becomes so.
    fn over(&mut self, cx: &mut Context<'_>) -> bool {
        self.deadline.as_mut().poll(cx).is_ready() || Pin::new(&mut self.evicted).poll_next(cx).is_ready()
    }
}

fn closed() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "admin connection evicted or past its lifetime")
}

impl AsyncRead for Short {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.over(cx) {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Short {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if this.over(cx) {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut this.tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }
}

impl Drop for Short {
    fn drop(&mut self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|(id, _)| *id != self.id);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use axum::serve::Listener;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn listener() -> (Limited, SocketAddr) {
        let inner = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = inner.local_addr().unwrap();
        (Limited::new(inner), addr)
    }

    #[tokio::test]
    async fn a_connection_beyond_the_limit_evicts_the_oldest_and_a_closed_one_frees_its_place() {
        let (mut limited, addr) = listener().await;
        let mut clients = Vec::new();
        let mut accepted = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            clients.push(TcpStream::connect(addr).await.unwrap());
            accepted.push(limited.accept().await.0);
        }
        assert_eq!(limited.open.lock().unwrap().len(), MAX_CONNECTIONS);
        clients.push(TcpStream::connect(addr).await.unwrap());
        let (mut newest, _) = limited.accept().await;
        assert_eq!(limited.open.lock().unwrap().len(), MAX_CONNECTIONS);
        let mut buf = [0u8; 1];
        let err = accepted[0].read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut, "the oldest is evicted");
        // The newest works: what its client writes arrives.
        clients.last_mut().unwrap().write_all(b"x").await.unwrap();
        assert_eq!(newest.read(&mut buf).await.unwrap(), 1);
        drop(accepted.pop());
        assert_eq!(limited.open.lock().unwrap().len(), MAX_CONNECTIONS - 1, "dropped, its place is free");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_fails_at_the_end_of_its_lifetime_even_while_idle() {
        let (mut limited, addr) = listener().await;
        let _client = TcpStream::connect(addr).await.unwrap();
        let (mut short, _) = limited.accept().await;
        let started = tokio::time::Instant::now();
        let mut buf = [0u8; 1];
        let err = short.read(&mut buf).await.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), LIFETIME);
    }
}
