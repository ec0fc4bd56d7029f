//! Idempotency keys (distributed issue, point 1): a retried call with the
//! same `idempotency-key` gets the first call's answer and changes nothing
//! again; the key is the caller's own; answers with secrets are kept sealed;
//! in the distributed mode a retry that lands on another replica is
//! answered from Redis.

mod support;

use estate_proto::credentials::{IssueCredentialRequest, QrSecret, issue_credential_request};
use estate_proto::identity::*;
use estate_test_support::{IdentityClient, TestMesh};
use support::*;
use tonic::Code;
use tonic::metadata::AsciiMetadataValue;

fn keyed<T>(message: T, key: &str) -> anyhow::Result<tonic::Request<T>> {
    let mut req = tonic::Request::new(message);
    req.metadata_mut().insert("idempotency-key", AsciiMetadataValue::try_from(key)?);
    Ok(req)
}

fn person(name: &str) -> CreatePersonRequest {
    CreatePersonRequest { display_name: name.into(), birth_date: "1990-02-03".into(), ..Default::default() }
}

fn replayed<T>(r: &tonic::Response<T>) -> bool {
    r.metadata().get("idempotent-replay").is_some()
}

async fn persons(op: &mut IdentityClient) -> anyhow::Result<usize> {
    Ok(op.list_persons(ListPersonsRequest { page_size: 500, ..Default::default() }).await?.into_inner().persons.len())
}

#[tokio::test]
async fn a_retried_call_runs_once() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Alpha", "120101").await?;
    let mut op = operator(&mesh, &w)?;
    let before = (persons(&mut op).await?, outbox_count(&mesh, &w.tenant.id).await?);

    let first = op.create_person(keyed(person("Zhao Lei"), "k-1")?).await?;
    let again = op.create_person(keyed(person("Zhao Lei"), "k-1")?).await?;
    assert!(!replayed(&first) && replayed(&again));
    assert_eq!(first.get_ref(), again.get_ref(), "the retry got another answer");
    assert_eq!(persons(&mut op).await?, before.0 + 1, "the retry created a second person");
    assert_eq!(outbox_count(&mesh, &w.tenant.id).await?, before.1 + 1, "the retry wrote a second audit event");

    // The same key for another request: refused, nothing created.
    let other = op.create_person(keyed(person("Qian Fang"), "k-1")?).await.map(|_| ());
    let status = other.err().map(|s| (s.code(), s.message().to_owned()));
    assert!(matches!(&status, Some((Code::InvalidArgument, m)) if m.contains("different request")), "{status:?}");
    // Without a key, the same request runs again (a second Zhao Lei).
    op.create_person(person("Zhao Lei")).await?;
    assert_eq!(persons(&mut op).await?, before.0 + 2);

    // A call that failed keeps nothing: its retry runs again.
    for _ in 0..2 {
        let bad = op.create_person(keyed(person(""), "k-2")?).await.map(|_| ());
        assert_eq!(bad.err().map(|s| s.code()), Some(Code::InvalidArgument));
    }
    let fixed = op.create_person(keyed(person("Sun Li"), "k-2")?).await?;
    assert!(!replayed(&fixed));

    // Keys are the caller's own: another operator login with the same key
    // runs its own call.
    let colleague = mesh
        .admin()?
        .issue_token(IssueTokenRequest {
            principal: Some(grant_operator(&w.tenant.id, vec![])),
            subject: "night-shift@Alpha".into(),
            ttl_seconds: 600,
        })
        .await?
        .into_inner()
        .token;
    let theirs = mesh.identity(&colleague)?.create_person(keyed(person("Zhao Lei"), "k-1")?).await?;
    assert!(!replayed(&theirs));
    assert_ne!(theirs.get_ref().id, first.get_ref().id);

    // Malformed keys and streaming RPCs are refused, saying why.
    let bad = op.create_person(keyed(person("Wu Hao"), "has space")?).await.map(|_| ());
    assert_eq!(bad.err().map(|s| s.code()), Some(Code::InvalidArgument));
    let gate_token = gate(&mesh, &w)?;
    let stream = mesh
        .gate(&gate_token)?
        .watch_changes(keyed(estate_proto::gate::WatchChangesRequest::default(), "k-3")?)
        .await
        .map(|_| ());
    let status = stream.err().map(|s| (s.code(), s.message().to_owned()));
    assert!(matches!(&status, Some((Code::InvalidArgument, m)) if m.contains("unary")), "{status:?}");
    mesh.stop().await
}

/// A keyed request is buffered to compare retries: it is bounded by the
/// same limit as any message.
#[tokio::test]
async fn keyed_requests_are_bounded_by_the_message_limit() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn_with(|s| s.limits.max_message_bytes = 16 * 1024).await?;
    let w = world(&mesh, "Alpha", "120101").await?;
    let mut op = operator(&mesh, &w)?;
    let huge = CreatePersonRequest { display_name: "x".repeat(64 * 1024), ..person("") };
    let status =
        op.create_person(keyed(huge, "big")?).await.map(|_| ()).err().map(|s| (s.code(), s.message().to_owned()));
    assert!(
        matches!(&status, Some((Code::ResourceExhausted, m)) if m.contains("limits.max_message_bytes")),
        "{status:?}"
    );
    // The key was never taken: a proper request with it runs.
    assert!(!replayed(&op.create_person(keyed(person("Zhou Min"), "big")?).await?));
    mesh.stop().await
}

#[tokio::test]
async fn concurrent_retries_create_one_unit() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Alpha", "120101").await?;
    let unit = || CreateUnitRequest {
        estate_id: w.estate.id.clone(),
        building: "7".into(),
        unit: "1".into(),
        room: "707".into(),
    };
    let mut calls = Vec::new();
    for _ in 0..8 {
        let mut op = operator(&mesh, &w)?;
        let req = keyed(unit(), "same-key")?;
        calls.push(tokio::spawn(async move { op.create_unit(req).await.map(tonic::Response::into_inner) }));
    }
    let mut ids = std::collections::HashSet::new();
    for call in calls {
        match call.await? {
            Ok(u) => {
                ids.insert(u.id);
            }
            Err(s) => assert_eq!(s.code(), Code::Aborted, "{s:?}"),
        }
    }
    assert_eq!(ids.len(), 1, "concurrent calls with one key created {} units", ids.len());
    let units = operator(&mesh, &w)?
        .list_units(ListUnitsRequest { estate_id: w.estate.id.clone(), ..Default::default() })
        .await?
        .into_inner()
        .units;
    assert_eq!(units.iter().filter(|u| u.room == "707").count(), 1);
    mesh.stop().await
}

/// A QR credential's seed is shown to the caller once; a retry shows the
/// same seed again, and the kept answer does not hold it in clear. With
/// Redis, the retry is answered by a second replica.
#[tokio::test]
async fn answers_are_kept_sealed_and_shared_by_replicas() -> anyhow::Result<()> {
    let mesh = TestMesh::spawn().await?;
    let w = world(&mesh, "Alpha", "120101").await?;
    let qr = || IssueCredentialRequest {
        person_id: w.person.id.clone(),
        estate_ids: vec![w.estate.id.clone()],
        secret: Some(issue_credential_request::Secret::Qr(QrSecret {})),
        ..Default::default()
    };
    let key = format!("qr-{}", random_id());
    let first = mesh.credentials(&w.operator_token)?.issue_credential(keyed(qr(), &key)?).await?.into_inner();
    assert!(!first.secret.is_empty());

    let redis = std::env::var("ESTATE_TEST_REDIS_URL").ok();
    let replica = match &redis {
        Some(_) => {
            let dir = mesh.data_dir.path().to_path_buf();
            let url = mesh.db_url().to_owned();
            Some(
                TestMesh::spawn_reusing(move |s| {
                    s.data_dir = dir;
                    s.database.url = Some(url);
                })
                .await?,
            )
        }
        None => None,
    };
    let again =
        replica.as_ref().unwrap_or(&mesh).credentials(&w.operator_token)?.issue_credential(keyed(qr(), &key)?).await?;
    assert!(replayed(&again));
    assert_eq!(again.get_ref(), &first, "the retry got another credential or seed");

    if let Some(url) = redis {
        let client = redis::Client::open(url)?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let keys: Vec<String> = redis::cmd("KEYS").arg("estate:idem:*").query_async(&mut conn).await?;
        assert!(!keys.is_empty(), "no idempotency key in Redis");
        for k in keys {
            let v: Vec<u8> = redis::cmd("GET").arg(&k).query_async(&mut conn).await.unwrap_or_default();
            assert!(
                !v.windows(first.secret.len()).any(|w| w == first.secret.as_bytes()),
                "a kept answer holds a QR seed in clear"
            );
        }
        eprintln!("retry answered by a second replica from Redis");
    }
    if let Some(r) = replica {
        r.stop().await?;
    }
    mesh.stop().await
}
