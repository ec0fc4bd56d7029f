//! The all-in-one process: health and reflection are open to probes and
//! grpcurl-style clients, every service is discoverable, and the admin token
//! is written once, privately.

use estate_test_support::TestMesh;
use std::os::unix::fs::PermissionsExt;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test]
async fn health_reports_serving_without_a_token() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let mut health = HealthClient::new(mesh.channel());
    for service in [
        "",
        "estate.identity.v1.IdentityService",
        "estate.consent.v1.ConsentService",
        "estate.credentials.v1.CredentialService",
        "estate.audit.v1.AuditService",
    ] {
        let r = health.check(HealthCheckRequest { service: service.into() }).await?.into_inner();
        assert_eq!(r.status, ServingStatus::Serving as i32, "{service:?}");
    }
    mesh.stop().await
}

#[tokio::test]
async fn reflection_lists_every_service_and_resolves_its_schema() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let mut reflection = ServerReflectionClient::new(mesh.channel());
    let requests = vec![
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        },
        ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::FileContainingSymbol("estate.identity.v1.IdentityService".into())),
        },
    ];
    let mut stream = reflection.server_reflection_info(tokio_stream::iter(requests)).await?.into_inner();
    let first = stream.message().await?.and_then(|r| r.message_response);
    let Some(MessageResponse::ListServicesResponse(list)) = first else {
        anyhow::bail!("expected a service list, got {first:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "estate.identity.v1.IdentityService",
        "estate.consent.v1.ConsentService",
        "estate.credentials.v1.CredentialService",
        "estate.audit.v1.AuditService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
    let second = stream.message().await?.and_then(|r| r.message_response);
    let Some(MessageResponse::FileDescriptorResponse(files)) = second else {
        anyhow::bail!("expected descriptors, got {second:?}");
    };
    assert!(!files.file_descriptor_proto.is_empty());
    mesh.stop().await
}

#[tokio::test]
async fn admin_token_is_private_and_stable_across_restarts() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let path = mesh.data_dir.path().join("admin.token");
    let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let keys_mode = std::fs::metadata(mesh.data_dir.path().join("keys"))?.permissions().mode() & 0o777;
    assert_eq!(keys_mode, 0o700);
    let first = std::fs::read_to_string(&path)?;

    // A second start on the same data directory keeps keys and token.
    let dir = mesh.data_dir.path().to_path_buf();
    let db_url = mesh.db_url().to_owned();
    let again = estate_mesh_on(&dir, &db_url).await?;
    assert_eq!(std::fs::read_to_string(&path)?, first);
    drop(again);
    mesh.stop().await
}

async fn estate_mesh_on(dir: &std::path::Path, db_url: &str) -> anyhow::Result<TestMesh> {
    let dir = dir.to_path_buf();
    let url = db_url.to_owned();
    TestMesh::spawn_reusing(move |s| {
        s.data_dir = dir;
        s.database.url = Some(url);
    })
    .await
}
