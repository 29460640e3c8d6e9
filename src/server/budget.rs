//! The bytes meshca holds for requests whose message has not arrived whole, and how
//! long a caller may take to send it.
//!
//! Until a request's message is complete it cannot be authenticated (the token is in
//! it), so everything buffered for it is held on behalf of an anonymous peer. A tower
//! layer below tonic wraps every request body: each DATA frame is charged, as it
//! passes, against the caller's connection ([`Settings::per_connection`]) and against
//! one process-wide budget ([`Settings::total`], sized to the memory limit by
//! `config`); the charge is given back when tonic drops the body, which for a unary
//! call is as soon as the message is decoded. A frame that would go over either
//! bound fails the request with `RESOURCE_EXHAUSTED` instead of growing memory, and a
//! body not complete within [`Settings::body_timeout`] of the request's headers fails
//! it with `DEADLINE_EXCEEDED`, whatever `--request-timeout` says: a peer trickling
//! bytes, or stalling mid-message, holds its charge for at most that long. With the
//! decoding limit (`MAX_DECODED_MESSAGE`) bounding one stream and the stream limit
//! bounding one connection, the worst case is stated in docs/operations.md.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Sleep;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::Status;

use crate::metrics::ScrapeGauge;

/// The bounds (`config` sizes `total`; the others are constants).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Settings {
    /// Bytes of unfinished request bodies held at once, process-wide.
    pub total: usize,
    /// Bytes of unfinished request bodies one connection may hold at once.
    pub per_connection: usize,
    /// Longest time from a request's headers to the end of its body.
    pub body_timeout: Duration,
}

/// The budget: what each connection holds, and the process-wide permits.
#[derive(Debug)]
pub(crate) struct Budget {
    settings: Settings,
    total: Arc<Semaphore>,
    /// Bytes held per connection (by peer address: one per TCP connection), present
    /// only while non-zero.
    held: Mutex<HashMap<SocketAddr, usize>>,
}

impl Budget {
    pub(crate) fn new(settings: Settings) -> Arc<Budget> {
        let permits = settings.total.min(Semaphore::MAX_PERMITS);
        Arc::new(Budget { settings, total: Arc::new(Semaphore::new(permits)), held: Mutex::default() })
    }

    /// Bytes held now, process-wide.
    pub(crate) fn held(&self) -> usize {
        self.settings.total.min(Semaphore::MAX_PERMITS) - self.total.available_permits()
    }

    /// `meshca_unfinished_request_bytes` and its bound, on `/metrics`.
    pub(crate) fn register_metrics(self: &Arc<Self>, registry: &mut prometheus_client::registry::Registry) {
        let budget = self.clone();
        registry.register(
            "meshca_unfinished_request_bytes",
            "Bytes of request messages not yet received whole, held now",
            ScrapeGauge::new(move || i64::try_from(budget.held()).unwrap_or(i64::MAX)),
        );
        let total = i64::try_from(self.settings.total).unwrap_or(i64::MAX);
        registry.register(
            "meshca_unfinished_request_bytes_max",
            "Beyond it, request messages still arriving are refused (RESOURCE_EXHAUSTED)",
            ScrapeGauge::new(move || total),
        );
    }

    /// Charges `n` bytes to `peer`'s connection and to the process.
    fn charge(&self, peer: Option<SocketAddr>, n: usize) -> Result<Option<OwnedSemaphorePermit>, Status> {
        if let Some(peer) = peer {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let mine = held.entry(peer).or_default();
            if *mine + n > self.settings.per_connection {
                if *mine == 0 {
                    held.remove(&peer);
                }
                return Err(Status::resource_exhausted(
                    "this connection has too many unfinished request messages; finish or cancel one",
                ));
            }
            *mine += n;
        }
        let permits = u32::try_from(n).unwrap_or(u32::MAX);
        match self.total.clone().try_acquire_many_owned(permits) {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => {
                self.release(peer, n);
                Err(Status::resource_exhausted(
                    "meshca holds too many unfinished request messages; retry after a backoff",
                ))
            }
        }
    }

    /// Gives `n` bytes back to `peer`'s connection (the process-wide permits go back
    /// when their permit is dropped).
    fn release(&self, peer: Option<SocketAddr>, n: usize) {
        let Some(peer) = peer else { return };
        if n == 0 {
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(mine) = held.get_mut(&peer) {
            *mine = mine.saturating_sub(n);
            if *mine == 0 {
                held.remove(&peer);
            }
        }
    }
}

/// The peer address tonic recorded for the request's connection.
fn peer(request: &Request<Body>) -> Option<SocketAddr> {
    let ext = request.extensions();
    ext.get::<TcpConnectInfo>()
        .or_else(|| ext.get::<TlsConnectInfo<TcpConnectInfo>>().map(TlsConnectInfo::get_ref))
        .and_then(TcpConnectInfo::remote_addr)
}

use crate::wire::DECODER_BUFFER;

/// A request body charged to the budget as it arrives, and cut at the body deadline.
struct Charged {
    inner: Body,
    budget: Arc<Budget>,
    peer: Option<SocketAddr>,
    /// Bytes charged to the connection, and the process-wide permits for them.
    bytes: usize,
    permit: Option<OwnedSemaphorePermit>,
    /// `None` once the body is complete.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Bytes received, and the first message's 5-byte gRPC prefix as it comes in
    /// (`received` says how much of it is in).
    received: usize,
    prefix: [u8; 5],
    /// The refusal to answer at the first poll, when even the decoder's first buffer
    /// did not fit.
    refused: Option<Status>,
}

impl Charged {
    /// A body charged from the start with the decoder's first buffer, which tonic
    /// allocates for every request, message or not.
    fn new(inner: Body, budget: Arc<Budget>, peer: Option<SocketAddr>) -> Charged {
        let deadline = Some(Box::pin(tokio::time::sleep(budget.settings.body_timeout)));
        let (permit, refused, bytes) = match budget.charge(peer, DECODER_BUFFER) {
            Ok(permit) => (permit, None, DECODER_BUFFER),
            Err(status) => (None, Some(status), 0),
        };
        Charged { inner, budget, peer, bytes, permit, deadline, received: 0, prefix: [0; 5], refused }
    }

    /// What the decoder holds for this request once `data` is in: at least its initial
    /// buffer, and from the message's length prefix on, the whole announced message
    /// (the decoder reserves that much as soon as it reads the prefix).
    fn holding(&mut self, data: &[u8]) -> usize {
        if self.received < 5 {
            let take = (5 - self.received).min(data.len());
            self.prefix[self.received..self.received + take].copy_from_slice(&data[..take]);
        }
        self.received += data.len();
        let announced = match (self.received >= 5, self.prefix) {
            (true, [_, a, b, c, d]) => 5 + u32::from_be_bytes([a, b, c, d]) as usize,
            _ => 0,
        };
        // Beyond the decoding limit the decoder refuses the message without reserving it.
        let announced = if announced > 5 + super::MAX_DECODED_MESSAGE { 0 } else { announced };
        self.received.max(announced).max(DECODER_BUFFER)
    }
}

impl HttpBody for Charged {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if let Some(status) = this.refused.take() {
            this.deadline = None;
            return Poll::Ready(Some(Err(status)));
        }
        let Some(deadline) = this.deadline.as_mut() else {
            return Pin::new(&mut this.inner).poll_frame(cx);
        };
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending if deadline.as_mut().poll(cx).is_ready() => {
                this.deadline = None;
                let secs = this.budget.settings.body_timeout.as_secs_f64();
                Poll::Ready(Some(Err(Status::deadline_exceeded(format!(
                    "the request message did not arrive whole within {secs}s"
                )))))
            }
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                let n = match frame.data_ref() {
                    Some(data) if !data.is_empty() => this.holding(data).saturating_sub(this.bytes),
                    _ => 0,
                };
                if n > 0 {
                    match this.budget.charge(this.peer, n) {
                        Ok(permit) => {
                            this.bytes += n;
                            match (&mut this.permit, permit) {
                                (Some(held), Some(more)) => held.merge(more),
                                (held, more) => *held = more,
                            }
                        }
                        Err(status) => {
                            this.deadline = None;
                            return Poll::Ready(Some(Err(status)));
                        }
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.deadline = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Charged {
    fn drop(&mut self) {
        self.budget.release(self.peer, self.bytes);
    }
}

/// The tower layer that charges every request body ([`Charged`]).
#[derive(Clone, Debug)]
pub(crate) struct BudgetLayer(pub(crate) Arc<Budget>);

impl<S> tower_layer::Layer<S> for BudgetLayer {
    type Service = Budgeted<S>;

    fn layer(&self, inner: S) -> Budgeted<S> {
        Budgeted { inner, budget: self.0.clone() }
    }
}

/// A service whose requests' bodies are charged to the budget.
#[derive(Clone, Debug)]
pub(crate) struct Budgeted<S> {
    inner: S,
    budget: Arc<Budget>,
}

impl<S> tower_service::Service<Request<Body>> for Budgeted<S>
where
    S: tower_service::Service<Request<Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let peer = peer(&request);
        let budget = self.budget.clone();
        let request = request.map(|inner| {
            if inner.is_end_stream() {
                return inner;
            }
            Body::new(Charged::new(inner, budget, peer))
        });
        Box::pin(self.inner.call(request))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn budget(total: usize, per_connection: usize) -> Arc<Budget> {
        Budget::new(Settings { total, per_connection, body_timeout: Duration::from_secs(10) })
    }

    #[test]
    fn a_connection_is_refused_past_its_share_and_given_it_back() {
        let b = budget(1000, 100);
        let (a, c) = (Some("10.0.0.1:1".parse().unwrap()), Some("10.0.0.1:2".parse().unwrap()));
        let first = b.charge(a, 60).unwrap();
        assert_eq!(b.charge(a, 41).unwrap_err().code(), tonic::Code::ResourceExhausted);
        let second = b.charge(a, 40).unwrap();
        let third = b.charge(c, 100).expect("another connection has its own share");
        assert_eq!(b.held(), 200, "the refused charge took nothing");
        drop((first, second, third));
        b.release(c, 100);
        b.release(a, 100);
        assert!(b.charge(a, 100).is_ok(), "given back in full");
        assert!(b.held.lock().unwrap().get(&a.unwrap()).is_some());
        b.release(a, 100);
        assert!(b.held.lock().unwrap().get(&a.unwrap()).is_none(), "no entry for an idle connection");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_request_is_charged_what_the_decoder_holds_for_it() {
        let b = budget(1 << 20, 1 << 20);
        let mut c = Charged::new(Body::empty(), b, None);
        assert_eq!(c.holding(&[0, 0]), DECODER_BUFFER, "the decoder's initial buffer, prefix unfinished");
        assert_eq!(c.holding(&[0, 0x40, 0]), 5 + 0x4000, "the announced message");
        let mut small = Charged::new(Body::empty(), budget(1 << 20, 1 << 20), None);
        assert_eq!(small.holding(&[0, 0, 0, 0, 10, 1, 2]), DECODER_BUFFER);
        let mut huge = Charged::new(Body::empty(), budget(1 << 20, 1 << 20), None);
        assert_eq!(huge.holding(&[0, 0x7f, 0xff, 0xff, 0xff]), DECODER_BUFFER, "refused, never reserved");
        let mut many = Charged::new(Body::empty(), budget(1 << 20, 1 << 20), None);
        assert_eq!(many.holding(&[7; 30_000]), 30_000, "what came in, however the prefix reads");
    }

    #[test]
    fn the_process_wide_budget_refuses_once_spent_and_takes_nothing_from_the_connection() {
        let b = budget(150, 100);
        let peers: Vec<Option<SocketAddr>> =
            (1..=3).map(|p| Some(format!("10.0.0.1:{p}").parse().unwrap())).collect();
        let _one = b.charge(peers[0], 100).unwrap();
        let err = b.charge(peers[1], 60).unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        assert!(err.message().contains("retry"), "{err:?}");
        assert!(b.held.lock().unwrap().get(&peers[1].unwrap()).is_none(), "the refused charge is undone");
        let _two = b.charge(peers[2], 50).unwrap();
        assert_eq!(b.held(), 150);
    }

    #[tokio::test(flavor = "current_thread", start_paused = true)]
    async fn a_body_that_stalls_is_cut_at_the_deadline_and_its_bytes_given_back() {
        use http_body_util::BodyExt;
        let b = budget(1 << 20, 1 << 20);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, Status>>(4);
        let inner =
            Body::new(http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)));
        let peer = Some("10.0.0.1:1".parse().unwrap());
        let mut body = Charged::new(inner, b.clone(), peer);
        // A message announcing 20,000 bytes, 500 of them sent: the decoder reserves them all.
        let mut start = vec![0u8];
        start.extend(20_000u32.to_be_bytes());
        start.resize(500, b'a');
        tx.send(Ok(Frame::data(Bytes::from(start)))).await.unwrap();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().map(Bytes::len), Some(500));
        assert_eq!(b.held(), 20_005);
        let started = tokio::time::Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
        drop((body, tx));
        assert_eq!(b.held(), 0);
        assert!(b.held.lock().unwrap().is_empty());
    }
}
