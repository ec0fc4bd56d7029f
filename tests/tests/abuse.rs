//! Abuse matrix generated from the contract (issue: hardening, point 2): every
//! RPC of every mesh service, as listed in the descriptor set the servers
//! publish, is called with no token, a forged token (signed by a key the mesh
//! does not know) and an expired token, and must answer UNAUTHENTICATED before
//! any handler runs; the three open RPCs (published keys) must answer
//! without a token.

mod support;

use estate_auth::{Principal, TokenAuthority};
use estate_test_support::TestMesh;
use support::raw::{Rpc, call, every_rpc};
use tonic::Code;

const OPEN: [&str; 3] = [
    "/estate.consent.v1.ConsentService/GetVerifyingKeys",
    "/estate.audit.v1.AuditService/GetVerifyingKeys",
    "/estate.gate.v1.GateService/GetBundleKeys",
];

#[tokio::test]
async fn every_rpc_refuses_missing_forged_and_expired_tokens() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let rpcs: Vec<Rpc> = every_rpc()?;
    // The contract has many services; a shrinking list would hide RPCs.
    assert!(rpcs.len() >= 80, "only {} RPCs found", rpcs.len());
    for service in ["identity", "consent", "credentials", "audit", "gate", "facematch"] {
        assert!(rpcs.iter().any(|r| r.service == service), "{service} missing");
    }
    let principal = Principal::Operator { tenant_id: uuid::Uuid::now_v7().to_string(), estate_ids: vec![] };
    let forged = TokenAuthority::new("estate-mesh", &estate_crypto::SigningKeyPair::generate()?)?
        .issue(principal.clone(), "mallory", 3600)?
        .token;
    let now = estate_core::now_ms() / 1000;
    let expired = mesh.tokens().issue_between(principal, "late", now - 7200, now - 3600)?.token;
    let mut checked = 0;
    for rpc in &rpcs {
        if OPEN.contains(&rpc.path.as_str()) {
            let answer = call(mesh.channel(), rpc, Vec::new(), None).await;
            assert!(answer.is_ok(), "{} is open but answered {answer:?}", rpc.path);
            continue;
        }
        for (label, token) in
            [("no token", None), ("forged", Some(forged.as_str())), ("expired", Some(expired.as_str()))]
        {
            let status = call(mesh.channel(), rpc, Vec::new(), token).await.err().map(|s| s.code());
            assert_eq!(status, Some(Code::Unauthenticated), "{} with {label}", rpc.path);
            checked += 1;
        }
    }
    eprintln!("{} RPCs; {checked} refusals checked", rpcs.len());
    mesh.stop().await
}
