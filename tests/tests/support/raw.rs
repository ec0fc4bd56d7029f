//! Calls any RPC of the mesh by path with raw protobuf bytes, and lists every
//! RPC from the descriptor set the servers publish.

// Each test binary compiles this module on its own and uses part of it.
#![allow(dead_code)]

use prost::Message;
use prost::bytes::{Buf, BufMut};
use tonic::Status;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::AsciiMetadataValue;

/// Sends and receives raw protobuf bytes, so any method can be called.
#[derive(Debug, Clone, Copy, Default)]
pub struct Raw;

impl Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = Raw;
    type Decoder = Raw;
    fn encoder(&mut self) -> Raw {
        Raw
    }
    fn decoder(&mut self) -> Raw {
        Raw
    }
}

impl Encoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl Decoder for Raw {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

/// One RPC of the contract, with its request message's descriptor.
#[derive(Debug, Clone)]
pub struct Rpc {
    /// `/estate.gate.v1.GateService/Decide`
    pub path: String,
    /// `Decide`
    pub method: String,
    /// `identity`, `gate`, …
    pub service: String,
    /// The request message's descriptor.
    pub input: prost_types::DescriptorProto,
    /// Whether the RPC streams (the server's answer, here).
    pub streaming: bool,
}

/// Every RPC of the mesh's own services (`estate_proto::rpcs`), with the
/// descriptors of their requests.
pub fn every_rpc() -> anyhow::Result<Vec<Rpc>> {
    let set = prost_types::FileDescriptorSet::decode(estate_proto::FILE_DESCRIPTOR_SET)?;
    let mut messages = std::collections::HashMap::new();
    for file in set.file {
        let package = file.package.unwrap_or_default();
        for m in file.message_type {
            messages.insert(format!(".{package}.{}", m.name.clone().unwrap_or_default()), m);
        }
    }
    estate_proto::rpcs()
        .into_iter()
        .map(|r| {
            let input = messages
                .get(&r.input_type)
                .cloned()
                .ok_or_else(|| anyhow::anyhow!("no descriptor for {}", r.input_type))?;
            Ok(Rpc { path: r.path, method: r.method, service: r.service, input, streaming: r.streaming })
        })
        .collect()
}

/// Calls `path` with `body` and an optional bearer token. For a streaming
/// RPC, the answer is the first message's or the stream's status.
pub async fn call(
    channel: tonic::transport::Channel,
    rpc: &Rpc,
    body: Vec<u8>,
    token: Option<&str>,
) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let mut req = tonic::Request::new(body);
    if let Some(t) = token
        && let Ok(v) = AsciiMetadataValue::try_from(format!("Bearer {t}"))
    {
        req.metadata_mut().insert("authorization", v);
    }
    let path = http::uri::PathAndQuery::try_from(rpc.path.as_str()).map_err(|e| Status::internal(e.to_string()))?;
    if rpc.streaming {
        let mut stream = grpc.server_streaming(req, path, Raw).await?.into_inner();
        match stream.message().await? {
            Some(first) => Ok(first),
            None => Ok(Vec::new()),
        }
    } else {
        grpc.unary(req, path, Raw).await.map(tonic::Response::into_inner)
    }
}
