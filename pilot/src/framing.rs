//! The ADS RPC on HTTP/2, its responses framed here rather than by tonic's
//! server codec.
//!
//! Why: tonic encodes a stream's responses into one buffer per stream that
//! grows to the stream's largest message and never shrinks. A proxy's
//! first push is its largest, so pilot would hold that much (tens of KiB)
//! for every proxy for as long as it stays connected: about 45 MB at 2,000
//! proxies (`bench-pilot`, heaptrack). Here each response is encoded into
//! an allocation of exactly its size, freed once HTTP/2 has written it.
//! Requests are still decoded by tonic's `Streaming`, and everything else
//! (the mutual-TLS listener, HTTP/2, routing) is still tonic's server.
//!
//! The wire format is gRPC's: each message behind a 5-byte prefix (not
//! compressed, big-endian length), `content-type: application/grpc`, and
//! the status in trailers.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::StreamExt;
use http_body::Frame;
use mesh_proto::discovery::aggregated_discovery_service_server::{
    AggregatedDiscoveryService, SERVICE_NAME,
};
use mesh_proto::discovery::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use prost::Message;
use tonic::codec::Codec;
use tonic::{Status, Streaming};

use crate::xds::Ads;

const DELTA: &str =
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources";

/// ADS as a service for tonic's router: delta xDS, the only method pilot
/// serves; any other is answered `UNIMPLEMENTED`.
#[derive(Clone)]
pub struct AdsServer(Arc<Ads>);

impl AdsServer {
    pub(crate) fn new(ads: Ads) -> Self {
        Self(Arc::new(ads))
    }
}

impl tonic::server::NamedService for AdsServer {
    const NAME: &'static str = SERVICE_NAME;
}

impl<B> tower::Service<http::Request<B>> for AdsServer
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let ads = self.0.clone();
        Box::pin(async move {
            if req.uri().path() != DELTA {
                return Ok(Status::unimplemented(format!(
                    "pilot serves {DELTA} only, not {}",
                    req.uri().path()
                ))
                .into_http());
            }
            let (parts, body) = req.into_parts();
            let decoder =
                mesh_proto::LeanCodec::<DeltaDiscoveryResponse, DeltaDiscoveryRequest>::default()
                    .decoder();
            let requests = Streaming::new_request(decoder, body, None, None);
            let request = tonic::Request::from_http(http::Request::from_parts(parts, requests));
            Ok(match ads.delta_aggregated_resources(request).await {
                Ok(responses) => http::Response::builder()
                    .header(http::header::CONTENT_TYPE, "application/grpc")
                    .body(tonic::body::Body::new(Framed {
                        responses: Some(responses.into_inner()),
                    }))
                    .expect("a valid response"),
                Err(status) => status.into_http(),
            })
        })
    }
}

type Responses = <Ads as AggregatedDiscoveryService>::DeltaAggregatedResourcesStream;

/// The response body: one data frame per message, then the status.
struct Framed {
    /// `None` once the trailers are out.
    responses: Option<Responses>,
}

impl http_body::Body for Framed {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let Some(responses) = self.responses.as_mut() else {
            return Poll::Ready(None);
        };
        let status = match ready!(responses.poll_next_unpin(cx)) {
            Some(Ok(message)) => return Poll::Ready(Some(Ok(Frame::data(frame(&message))))),
            Some(Err(status)) => status,
            None => Status::ok(""),
        };
        self.responses = None;
        let mut trailers = http::HeaderMap::new();
        if let Err(unsendable) = status.add_header(&mut trailers) {
            trailers.clear();
            let _ = unsendable.add_header(&mut trailers);
        }
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }

    fn is_end_stream(&self) -> bool {
        self.responses.is_none()
    }
}

/// `message` as one gRPC length-prefixed message, in a buffer of its size.
fn frame(message: &impl Message) -> Bytes {
    let len = message.encoded_len();
    let mut buf = Vec::with_capacity(5 + len);
    buf.push(0);
    let prefix = u32::try_from(len).expect("an xDS response is under 4 GiB");
    buf.extend_from_slice(&prefix.to_be_bytes());
    message
        .encode(&mut buf)
        .expect("the buffer holds the encoded length");
    Bytes::from(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_is_grpcs_length_prefixed_message() {
        let message = DeltaDiscoveryResponse {
            nonce: "1-1".into(),
            type_url: "t".into(),
            ..Default::default()
        };
        let framed = frame(&message);
        assert_eq!(framed[0], 0, "not compressed");
        let len = u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, framed.len() - 5);
        assert_eq!(
            DeltaDiscoveryResponse::decode(&framed[5..]).unwrap(),
            message
        );
    }
}
