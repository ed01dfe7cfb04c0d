//! The ADS service's gRPC framing, done here rather than by the generated tonic server. Each
//! response is encoded into a buffer of its own that is freed once written. tonic's encoder
//! keeps one buffer per stream that grows to the stream's largest message and stays that size
//! for the life of the stream: with 100 proxies each holding a ~1 MB CDS response that was
//! 100 MB of weftd's memory. Requests are decoded by tonic as before.

use std::convert::Infallible;
use std::marker::PhantomData;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{BufMut, Bytes};
use futures::{Stream, StreamExt};
use http_body_util::StreamBody;
use hyper::body::Frame;
use tonic::codec::{DecodeBuf, Decoder, Streaming};
use tonic::codegen::{BoxFuture, Service, StdError};
use tonic::server::NamedService;
use tonic::{Request, Response, Status};
use weft_xds_proto::envoy::service::discovery::v3::aggregated_discovery_service_server::AggregatedDiscoveryService;

use super::XdsServer;

const SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
const SOTW: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
const DELTA: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";
/// The largest request a proxy may send (its subscriptions): as the generated server had it.
const MAX_REQUEST: usize = 16 * 1024 * 1024;

/// ADS (state of the world and delta) as a tower service for tonic's router.
#[derive(Clone)]
pub struct AdsService(pub(super) XdsServer);

impl NamedService for AdsService {
    const NAME: &'static str = SERVICE;
}

/// Decodes protobuf requests (what tonic's prost codec does).
struct ProtoDecoder<T>(PhantomData<T>);

impl<T: prost::Message + Default> Decoder for ProtoDecoder<T> {
    type Item = T;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<T>, Status> {
        T::decode(buf)
            .map(Some)
            .map_err(|e| Status::internal(format!("undecodable request: {e}")))
    }
}

fn requests<T, B>(req: http::Request<B>) -> Request<Streaming<T>>
where
    T: prost::Message + Default + Send + 'static,
    B: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send,
{
    Request::from_http(req.map(|body| {
        Streaming::new_request(
            ProtoDecoder::<T>(PhantomData),
            body,
            None,
            Some(MAX_REQUEST),
        )
    }))
}

/// One length-prefixed gRPC message, in a buffer of its own.
pub fn frame(msg: &impl prost::Message) -> Bytes {
    let len = msg.encoded_len();
    let mut buf = Vec::with_capacity(5 + len);
    buf.put_u8(0);
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
    msg.encode(&mut buf).expect("a Vec grows to any message");
    Bytes::from(buf)
}

fn trailers(status: &Status) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    if status.add_header(&mut map).is_err() {
        map.insert("grpc-status", http::HeaderValue::from(status.code() as i32));
    }
    map
}

type Frames = Pin<Box<dyn Stream<Item = Result<Frame<Bytes>, Status>> + Send>>;

/// The streamed responses as a gRPC response: a DATA frame per message, then trailers with the
/// stream's status (OK when the server ends it, the error when a session fails).
fn respond<M: prost::Message + 'static>(
    result: Result<Response<super::ResponseStream<M>>, Status>,
) -> http::Response<tonic::body::Body> {
    let response = match result {
        Ok(r) => r,
        Err(status) => return status.into_http(),
    };
    let (metadata, messages, extensions) = response.into_parts();
    let mut ended = false;
    let frames = messages
        .map(Some)
        .chain(futures::stream::iter([None]))
        .filter_map(move |item| {
            let out = match (ended, item) {
                (true, _) => None,
                (false, Some(Ok(msg))) => Some(Ok(Frame::data(frame(&msg)))),
                (false, Some(Err(status))) => {
                    ended = true;
                    Some(Ok(Frame::trailers(trailers(&status))))
                }
                (false, None) => Some(Ok(Frame::trailers(trailers(&Status::ok(""))))),
            };
            std::future::ready(out)
        });
    let frames: Frames = Box::pin(frames);
    let mut http = http::Response::new(tonic::body::Body::new(StreamBody::new(frames)));
    *http.headers_mut() = metadata.into_headers();
    http.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    *http.extensions_mut() = extensions;
    http
}

impl<B> Service<http::Request<B>> for AdsService
where
    B: tonic::codegen::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let server = self.0.clone();
        Box::pin(async move {
            Ok(match req.uri().path() {
                SOTW => respond(server.stream_aggregated_resources(requests(req)).await),
                DELTA => respond(server.delta_aggregated_resources(requests(req)).await),
                path => Status::unimplemented(format!("{path} is not a method of {SERVICE}"))
                    .into_http(),
            })
        })
    }
}

/// Reads length-prefixed messages back (for tests of the framing).
#[cfg(test)]
pub fn unframe<M: prost::Message + Default>(mut bytes: Bytes) -> Vec<M> {
    use bytes::Buf;
    let mut out = Vec::new();
    while bytes.has_remaining() {
        assert_eq!(bytes.get_u8(), 0, "uncompressed");
        let len = bytes.get_u32() as usize;
        out.push(M::decode(bytes.split_to(len)).unwrap());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_xds_proto::envoy::service::discovery::v3::DiscoveryResponse;

    #[test]
    fn frames_are_length_prefixed_messages() {
        let msg = DiscoveryResponse {
            version_info: "v1".into(),
            nonce: "7".into(),
            ..Default::default()
        };
        let mut two = frame(&msg).to_vec();
        two.extend_from_slice(&frame(&DiscoveryResponse::default()));
        let back: Vec<DiscoveryResponse> = unframe(Bytes::from(two));
        assert_eq!(back, vec![msg, DiscoveryResponse::default()]);
    }

    #[test]
    fn statuses_become_trailers() {
        let t = trailers(&Status::invalid_argument("node id \"x\": bad"));
        assert_eq!(t["grpc-status"], "3");
        assert!(t["grpc-message"].to_str().unwrap().contains("node"));
        assert_eq!(trailers(&Status::ok(""))["grpc-status"], "0");
    }
}
