//! What meshca and its clients agree on over gRPC beyond the messages: request and
//! response metadata, and the codec every generated service and client uses
//! ([`Codec`]: protobuf, with a small first buffer). A leaf module: the server's
//! adapters (`server::grpc`, `server::istio`), the refusal mapping (`status`) and
//! the client side (`agent`, `doctor`) all read these from here, so no client
//! depends on the server.

/// Response metadata: the server's wall-clock time at the request, Unix
/// milliseconds, so clients can estimate their clock offset.
pub(crate) const SERVER_TIME_HEADER: &str = "x-meshca-time";
/// Request metadata asking for a dry run (value `1`); the answer says `passed`.
pub(crate) const DRY_RUN_HEADER: &str = "x-meshca-dry-run";
/// Response metadata: the request id, as in the audit record and the log line.
pub(crate) const REQUEST_ID_HEADER: &str = "x-request-id";
/// Metadata on every refusal: its stable reason code, as in the audit record, so
/// that clients (`meshca doctor`) tell refusals apart without reading their text.
pub(crate) const REASON_HEADER: &str = "x-meshca-reason";
/// Metadata on a `ResourceExhausted` status: milliseconds to wait before retrying
/// (gRPC's retry pushback, proposal A6).
pub const RETRY_PUSHBACK_HEADER: &str = "grpc-retry-pushback-ms";

/// The first buffer tonic's decoder allocates for a message, before its length prefix
/// says how much to reserve: 1 KiB (tonic's default is 8 KiB). A Certify request is
/// about 2 KiB, so it costs one reservation either way; a stream that never sends its
/// message holds only this (`server::budget` charges it).
pub(crate) const DECODER_BUFFER: usize = 1024;

/// Protobuf over gRPC (tonic-prost's codec) with a [`DECODER_BUFFER`]-sized first
/// decode buffer; `build.rs` has every generated server and client use it.
#[derive(Debug, Clone)]
pub(crate) struct Codec<T, U>(std::marker::PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(std::marker::PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = <tonic_prost::ProstCodec<T, U> as tonic::codec::Codec>::Encoder;
    type Decoder = <tonic_prost::ProstCodec<T, U> as tonic::codec::Codec>::Decoder;

    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<T, U>::raw_encoder(tonic::codec::BufferSettings::default())
    }

    fn decoder(&mut self) -> Self::Decoder {
        // tonic's default yield threshold (32 KiB) with the small first buffer.
        let settings = tonic::codec::BufferSettings::new(DECODER_BUFFER, 32 * 1024);
        tonic_prost::ProstCodec::<T, U>::raw_decoder(settings)
    }
}
