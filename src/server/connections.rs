//! The connection limit (`--max-connections`) and connection age
//! (`--max-connection-age`) of the gRPC listener.
//!
//! An open connection costs the server about 36 KiB (TLS and HTTP/2 buffers,
//! measured with 250 to 2,000 connections), so a herd in which every proxy holds its
//! own connection would grow memory without bound. The accept loops reserve a slot
//! ([`Limit::reserve`]) before they accept: at the limit the next connection waits in
//! the kernel's listen backlog ([`listen`]: 4,096 deep), costing the server nothing,
//! until an open one closes; the slot ([`Slot`]) travels with the connection
//! ([`Held`]) and is given back when hyper drops it, including when the TLS
//! handshake fails or the HTTP/2 preface does not come in time. The age bound (tonic's `max_connection_age`: a
//! GOAWAY after the age; the connection closes once the requests in progress on it
//! are answered) frees the slots of clients that keep idle connections, and after a
//! scale-out moves long-lived connections over to the new replicas; the request
//! timeout (`--request-timeout`, tonic's `timeout`) cancels a request that is not
//! answered in time, such as one whose message never comes, so such a request
//! cannot keep a connection open past its age either. (tonic's
//! `max_connection_age_grace` is not used: with it set, tonic sends no GOAWAY at the
//! age and cuts the connection at age + grace instead.) The same wrapper holds the
//! connection's writes until HTTP/2 has written everything it has ready
//! ([`Coalesce`]), so responses leave in one system call rather than one for the
//! message and one for the trailers.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::coalesce::Coalesce;
use crate::metrics::ScrapeGauge;

/// Connections the kernel may hold, TCP handshake done, for the accept loop (capped
/// by `net.core.somaxconn`, 4,096 by default on Linux). Beyond it new connections'
/// SYNs are dropped and retried by the client after 1, 3, 7, 15 s; a deep backlog
/// keeps a herd waiting for a slot out of that backoff.
pub(crate) const LISTEN_BACKLOG: u32 = 4096;

/// A TCP listener on `addr` with a [`LISTEN_BACKLOG`] backlog (tokio's `bind` asks
/// for 1,024).
pub(crate) fn listen(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // As tokio's bind: a restarted server can bind while old connections linger.
    #[cfg(not(windows))]
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// The slots of one listener.
#[derive(Clone, Debug)]
pub(crate) struct Limit {
    slots: Arc<Semaphore>,
    /// Slots given to accepted connections (not counting the one an accept loop
    /// holds while it waits for the next connection).
    open: Arc<AtomicUsize>,
    max: usize,
}

impl Limit {
    /// `max` slots (at least 1).
    pub(crate) fn new(max: usize) -> Limit {
        let max = max.max(1);
        Limit { slots: Arc::new(Semaphore::new(max)), open: Arc::default(), max }
    }

    /// A free slot, once there is one; counted as open from [`Reserved::open`].
    pub(crate) async fn reserve(&self) -> Reserved {
        // The semaphore is never closed, so acquiring cannot fail.
        match self.slots.clone().acquire_owned().await {
            Ok(permit) => Reserved { permit, open: self.open.clone() },
            Err(_) => unreachable!("the connection semaphore is never closed"),
        }
    }

    /// Connections open now (accepted, TLS handshakes in progress included).
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The limit.
    pub(crate) fn max(&self) -> usize {
        self.max
    }
}

/// Registers `meshca_connections_open` and `meshca_connections_max`, read from
/// `limit` at scrape time.
pub(crate) fn register_metrics(registry: &mut prometheus_client::registry::Registry, limit: &Limit) {
    let open = limit.clone();
    registry.register(
        "meshca_connections_open",
        "gRPC connections open now (TLS handshakes in progress included)",
        ScrapeGauge::new(move || i64::try_from(open.open()).unwrap_or(i64::MAX)),
    );
    let max = i64::try_from(limit.max()).unwrap_or(i64::MAX);
    registry.register(
        "meshca_connections_max",
        "--max-connections: beyond it, new connections wait in the listen backlog",
        ScrapeGauge::new(move || max),
    );
}

/// A slot taken for the next connection, not yet given to one.
#[derive(Debug)]
pub(crate) struct Reserved {
    permit: OwnedSemaphorePermit,
    open: Arc<AtomicUsize>,
}

impl Reserved {
    /// Gives the slot to an accepted connection.
    pub(crate) fn open(self) -> Slot {
        self.open.fetch_add(1, Ordering::Relaxed);
        Slot { _permit: self.permit, open: self.open }
    }
}

/// The slot of an open connection; dropping it frees it.
#[derive(Debug)]
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    open: Arc<AtomicUsize>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Length of the HTTP/2 client connection preface (RFC 9113, section 3.4).
const H2_PREFACE_LEN: usize = 24;

/// An accepted connection with its slot (freed when the connection is dropped),
/// whose first [`H2_PREFACE_LEN`] bytes — the HTTP/2 client preface — must arrive by
/// a deadline set at the TCP accept: a read still waiting for them then fails with
/// `TimedOut` and the connection is dropped. hyper waits for the preface without a
/// timeout of its own, so without this a client that connects (and, over TLS,
/// completes the handshake) and then goes quiet would hold its slot forever. From
/// the preface on it is the plain stream, bounded by HTTP/2 keepalive, the stream
/// limits (`server::run_with`) and the connection age. Its writes are held and
/// passed on together ([`Coalesce`]).
#[derive(Debug)]
pub(crate) struct Held<S> {
    inner: Coalesce<S>,
    _slot: Slot,
    /// Preface bytes still expected, and the deadline; `None` once they arrived.
    preface: Option<(usize, Pin<Box<Sleep>>)>,
}

impl<S> Held<S> {
    pub(crate) fn new(inner: S, slot: Slot, deadline: Instant) -> Held<S> {
        Held {
            inner: Coalesce::new(inner),
            _slot: slot,
            preface: Some((H2_PREFACE_LEN, Box::pin(tokio::time::sleep_until(deadline)))),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Held<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        let Some((left, deadline)) = &mut this.preface else { return result };
        match &result {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().len() - before;
                *left = left.saturating_sub(read);
                // Done when the preface is in, or at end of stream (nothing to wait for).
                if *left == 0 || read == 0 {
                    this.preface = None;
                }
            }
            Poll::Ready(Err(_)) => this.preface = None,
            // Registers the deadline with this task: a quiet client is woken up to fail.
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no HTTP/2 client preface within the handshake timeout",
                )));
            }
            Poll::Pending => {}
        }
        result
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Held<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    /// Until the client's preface is in, what HTTP/2 writes (its own settings) stays
    /// held: it then leaves with the acknowledgement of the client's settings, in one
    /// write and one TLS record instead of two. A client sends its preface without
    /// waiting for the server's (RFC 9113, section 3.4), and one that sends nothing
    /// loses the connection at the preface deadline.
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.preface.is_some() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Held<S> {
    type ConnectInfo = S::ConnectInfo;

    /// The stream's: peer address, and over TLS the client certificates (`auth::peer`).
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.get_ref().connect_info()
    }
}

/// Accepts a TCP connection when `limit` has a free slot, and hands it on with its
/// slot; stops when `closed` resolves. An accept error (a connection reset before it
/// was accepted, no file descriptors left) is logged and the loop goes on.
pub(crate) async fn accept(
    listener: &TcpListener,
    limit: &Limit,
    closed: impl Future<Output = ()>,
) -> Option<(TcpStream, std::net::SocketAddr, Slot)> {
    tokio::pin!(closed);
    loop {
        let reserved = tokio::select! {
            reserved = limit.reserve() => reserved,
            () = &mut closed => return None,
        };
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = &mut closed => return None,
        };
        match accepted {
            Ok((tcp, peer)) => return Some((tcp, peer, reserved.open())),
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                drop(reserved);
                // Out of file descriptors fails at once again: give others a turn.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

/// The plaintext listener's connections (`--plaintext`), within `limit`; each must
/// send the HTTP/2 preface within `first_bytes` of its accept. Stops when the
/// returned receiver is dropped.
pub(crate) fn plaintext(
    listener: TcpListener,
    limit: Limit,
    first_bytes: Duration,
) -> mpsc::Receiver<std::io::Result<Held<TcpStream>>> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Some((tcp, _peer, slot)) = accept(&listener, &limit, tx.closed()).await {
            let deadline = Instant::now() + first_bytes;
            let _ = tcp.set_nodelay(true);
            if tx.send(Ok(Held::new(tcp, slot, deadline))).await.is_err() {
                return;
            }
        }
    });
    rx
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_listener_accepts_and_its_port_cannot_be_taken_twice() {
        let listener = listen("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        assert_eq!(accepted.unwrap().1, client.unwrap().local_addr().unwrap());
        assert!(listen(addr).is_err(), "a second listener on {addr}");
    }

    #[tokio::test]
    async fn slots_are_counted_once_open_and_freed_with_their_connection() {
        let limit = Limit::new(2);
        let a = limit.reserve().await.open();
        let reserved = limit.reserve().await;
        assert_eq!(limit.open(), 1, "a reserved slot is not an open connection");
        let b = reserved.open();
        assert_eq!(limit.open(), 2);
        // A third waits until one is given back.
        let waiting = tokio::spawn({
            let limit = limit.clone();
            async move { limit.reserve().await.open() }
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        drop(Held::new(tokio::io::empty(), a, Instant::now()));
        let c = waiting.await.unwrap();
        assert_eq!(limit.open(), 2);
        drop((b, c));
        assert_eq!(limit.open(), 0);
        assert_eq!(Limit::new(0).max(), 1);
    }

    /// A client's side of a connection: what it sends, in reads of at most `chunk`
    /// bytes, and each write the server makes.
    struct Peer {
        sends: Vec<u8>,
        chunk: usize,
        writes: Vec<Vec<u8>>,
    }

    impl AsyncRead for Peer {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let this = self.get_mut();
            let n = this.sends.len().min(this.chunk).min(buf.remaining());
            buf.put_slice(&this.sends.drain(..n).collect::<Vec<_>>());
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncWrite for Peer {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            self.get_mut().writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn the_servers_settings_wait_for_the_clients_preface_and_leave_with_their_acknowledgement() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let limit = Limit::new(1);
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        assert_eq!(preface.len(), H2_PREFACE_LEN);
        let peer = Peer { sends: [&preface[..], b"client SETTINGS"].concat(), chunk: 10, writes: Vec::new() };
        let mut held =
            Held::new(peer, limit.reserve().await.open(), Instant::now() + Duration::from_secs(10));
        held.write_all(b"server SETTINGS").await.unwrap();
        held.flush().await.unwrap();
        assert!(held.inner.get_ref().writes.is_empty(), "held until the preface is in");
        // The preface arrives in pieces; only when all of it is in are writes let go.
        let mut buf = [0u8; H2_PREFACE_LEN];
        held.read_exact(&mut buf[..20]).await.unwrap();
        held.flush().await.unwrap();
        assert!(held.inner.get_ref().writes.is_empty(), "20 of the preface's 24 bytes");
        held.read_exact(&mut buf[20..]).await.unwrap();
        held.write_all(b" + ACK").await.unwrap();
        held.flush().await.unwrap();
        assert_eq!(held.inner.get_ref().writes, vec![b"server SETTINGS + ACK".to_vec()]);
        // From then on, a flush passes writes on as before.
        held.write_all(b"response").await.unwrap();
        held.flush().await.unwrap();
        assert_eq!(held.inner.get_ref().writes.len(), 2);
    }
}
