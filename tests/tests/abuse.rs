//! Abuse matrix generated from the contract (issue: hardening, point 2): every
//! RPC of every mesh service, as listed in the descriptor set the servers
//! publish, is called with no token, a forged token (signed by a key the mesh
//! does not know) and an expired token, and must answer UNAUTHENTICATED before
//! any handler runs; the three open RPCs (published keys) must answer
//! without a token.

mod support;

use estate_auth::{Principal, TokenAuthority};
use estate_test_support::TestMesh;
use prost::Message;
use prost::bytes::{Buf, BufMut};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::metadata::AsciiMetadataValue;
use tonic::{Code, Status};

/// Sends and receives raw protobuf bytes, so any method can be called.
#[derive(Debug, Clone, Copy, Default)]
struct Raw;

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

const OPEN: [&str; 3] = [
    "/estate.consent.v1.ConsentService/GetVerifyingKeys",
    "/estate.audit.v1.AuditService/GetVerifyingKeys",
    "/estate.gate.v1.GateService/GetBundleKeys",
];

/// Every RPC path of the mesh's own services.
fn every_rpc() -> anyhow::Result<Vec<String>> {
    let set = prost_types::FileDescriptorSet::decode(estate_proto::FILE_DESCRIPTOR_SET)?;
    let mut out = Vec::new();
    for file in set.file {
        let package = file.package.unwrap_or_default();
        if !package.starts_with("estate.") {
            continue;
        }
        for service in file.service {
            for method in service.method {
                out.push(format!(
                    "/{package}.{}/{}",
                    service.name.clone().unwrap_or_default(),
                    method.name.unwrap_or_default()
                ));
            }
        }
    }
    Ok(out)
}

async fn call(mesh: &TestMesh, path: &str, token: Option<&str>) -> Result<Vec<u8>, Status> {
    let mut grpc = tonic::client::Grpc::new(mesh.channel());
    grpc.ready().await.map_err(|e| Status::unavailable(e.to_string()))?;
    let mut req = tonic::Request::new(Vec::new());
    if let Some(t) = token
        && let Ok(v) = AsciiMetadataValue::try_from(format!("Bearer {t}"))
    {
        req.metadata_mut().insert("authorization", v);
    }
    let path = http::uri::PathAndQuery::try_from(path).map_err(|e| Status::internal(e.to_string()))?;
    grpc.unary(req, path, Raw).await.map(tonic::Response::into_inner)
}

#[tokio::test]
async fn every_rpc_refuses_missing_forged_and_expired_tokens() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let rpcs = every_rpc()?;
    // The contract has many services; a shrinking list would hide RPCs.
    assert!(rpcs.len() >= 80, "only {} RPCs found", rpcs.len());
    for service in ["identity", "consent", "credentials", "audit", "gate", "facematch"] {
        assert!(rpcs.iter().any(|r| r.starts_with(&format!("/estate.{service}.v1."))), "{service} missing");
    }
    let principal = Principal::Operator { tenant_id: uuid::Uuid::now_v7().to_string(), estate_ids: vec![] };
    let forged = TokenAuthority::new("estate-mesh", &estate_crypto::SigningKeyPair::generate()?)?
        .issue(principal.clone(), "mallory", 3600)?
        .token;
    let now = estate_core::now_ms() / 1000;
    let expired = mesh.tokens().issue_between(principal, "late", now - 7200, now - 3600)?.token;
    let mut checked = 0;
    for rpc in &rpcs {
        if OPEN.contains(&rpc.as_str()) {
            let answer = call(&mesh, rpc, None).await;
            assert!(answer.is_ok(), "{rpc} is open but answered {answer:?}");
            continue;
        }
        for (label, token) in
            [("no token", None), ("forged", Some(forged.as_str())), ("expired", Some(expired.as_str()))]
        {
            let status = call(&mesh, rpc, token).await.err().map(|s| s.code());
            assert_eq!(status, Some(Code::Unauthenticated), "{rpc} with {label}");
            checked += 1;
        }
    }
    eprintln!("{} RPCs; {checked} refusals checked", rpcs.len());
    mesh.stop().await
}
