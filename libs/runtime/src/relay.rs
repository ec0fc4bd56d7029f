//! The outbox relay of a service whose database is not the audit service's:
//! it ships undelivered outbox rows, in order and in batches, to the audit
//! service's `Append` (authenticated with a service token), and marks them
//! delivered only after the audit service answered that they are durable. The
//! audit log deduplicates by event id, so a crash in between only causes a
//! retry (R11).

use estate_proto::audit::AppendRequest;
use estate_proto::audit::audit_service_client::AuditServiceClient;
use estate_store::{Db, outbox};
use std::time::Duration;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};

/// Adds the service token to every call.
#[derive(Debug, Clone)]
pub struct ServiceBearer(AsciiMetadataValue);

impl tonic::service::Interceptor for ServiceBearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        req.metadata_mut().insert("authorization", self.0.clone());
        Ok(req)
    }
}

type Client = AuditServiceClient<InterceptedService<Channel, ServiceBearer>>;

/// Ships one batch; returns how many rows were delivered.
pub async fn ship_once(db: &Db, client: &mut Client, batch: i64) -> Result<usize, String> {
    let rows = outbox::pending(db.pool(), 0, batch.min(1000)).await.map_err(|e| e.to_string())?;
    if rows.is_empty() {
        return Ok(0);
    }
    let request = AppendRequest { events: rows.iter().map(|r| r.payload.clone()).collect() };
    client.append(request).await.map_err(|s| format!("{:?}: {}", s.code(), s.message()))?;
    let seqs: Vec<i64> = rows.iter().map(|r| r.seq).collect();
    outbox::mark_delivered(db, &seqs).await.map_err(|e| e.to_string())?;
    Ok(rows.len())
}

/// Starts the relay to `endpoint` with `token`, until the pool closes;
/// delivered rows older than `retention` are deleted (zero: kept).
pub fn spawn_remote_relay(
    db: Db,
    endpoint: &str,
    tls: Option<tonic::transport::ClientTlsConfig>,
    token: &str,
    batch: i64,
    interval: Duration,
    retention: Duration,
) -> Result<tokio::task::JoinHandle<()>, String> {
    let mut ep = Endpoint::from_shared(endpoint.to_owned()).map_err(|e| format!("audit.relay_to: {e}"))?;
    if let Some(tls) = tls {
        ep = ep.tls_config(tls).map_err(|e| format!("audit.relay_to tls: {e}"))?;
    }
    let channel = ep.connect_lazy();
    let bearer = AsciiMetadataValue::try_from(format!("Bearer {}", token.trim()))
        .map_err(|_| "audit.relay_token_file does not hold a valid token".to_owned())?;
    let mut client = AuditServiceClient::with_interceptor(channel, ServiceBearer(bearer));
    Ok(tokio::spawn(async move {
        let mut pruner = outbox::Pruner::new(retention);
        loop {
            if db.pool().is_closed() {
                return;
            }
            match ship_once(&db, &mut client, batch).await {
                Ok(n) if n as i64 >= batch => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "shipping the outbox to the audit service failed; will retry"),
            }
            pruner.tick(&db).await;
            tokio::time::sleep(interval).await;
        }
    }))
}
