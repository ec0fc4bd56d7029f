//! The engines of the tenants a process serves: exactly one for a separate
//! `estate-facematch` process (R9: one instance per tenant), one per tenant
//! for the embedded default, each with its own directory, database, vault
//! and keys.

use crate::engine::{EngineOptions, FaceEngine, tenant_dir};
use crate::model::Embedder;
use estate_attestation::KeySet;
use estate_core::{Error, Result, parse_id};
use estate_proto::consent::VerifyingKeys;
use estate_proto::facematch::{
    DeleteRequest, DeletionCertificate, EnrolledPerson, IdentifyRequest, JournalEntry, MatchResult, PersonCount,
};
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

/// What the gate and consent services need of facematch, in-process or over
/// gRPC. The caller has established that it acts for `tenant_id`. Searches
/// made through it are not journalled (the gate audits its decisions);
/// deletions are journalled as made by the consent service.
pub trait FaceMatcher: Send + Sync + std::fmt::Debug {
    /// 1:N within one estate.
    fn identify<'a>(&'a self, tenant_id: &'a str, req: IdentifyRequest) -> BoxFuture<'a, Result<MatchResult>>;
    /// Deletes and certifies (idempotent per request id).
    fn delete<'a>(&'a self, tenant_id: &'a str, req: DeleteRequest) -> BoxFuture<'a, Result<DeletionCertificate>>;
    /// Enrolled persons of an estate.
    fn list_enrolled<'a>(
        &'a self,
        tenant_id: &'a str,
        estate_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<EnrolledPerson>>>;
    /// Persons with templates.
    fn count<'a>(&'a self, tenant_id: &'a str) -> BoxFuture<'a, Result<PersonCount>>;
    /// Certificate verifying keys of the tenant's instance.
    fn certificate_keys<'a>(&'a self, tenant_id: &'a str) -> BoxFuture<'a, Result<VerifyingKeys>>;
    /// Journal entries after `after_seq` (at most `limit`), for the audit log.
    fn journal<'a>(
        &'a self,
        tenant_id: &'a str,
        after_seq: i64,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<JournalEntry>>>;
}

/// Where a tenant's key comes from.
#[derive(Debug, Clone)]
pub enum TenantKey {
    /// A key file (a mounted secret), generated if missing when allowed.
    File(PathBuf),
    /// `tenant.key` in each tenant's directory (embedded default).
    PerTenantDir,
}

/// How engines are opened.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Base directory; each tenant's engine lives in `<base>/<tenant>`.
    pub base: PathBuf,
    /// `Some`: serve this tenant only and refuse every other.
    pub only_tenant: Option<String>,
    /// The tenant key.
    pub tenant_key: TenantKey,
    /// Whether missing keys are generated.
    pub generate_keys: bool,
    /// Engine settings.
    pub engine: EngineOptions,
}

/// The engines of a process.
pub struct FaceRegistry {
    options: RegistryOptions,
    consent_keys: KeySet,
    embedder: Option<Arc<Embedder>>,
    engines: tokio::sync::Mutex<HashMap<String, Arc<FaceEngine>>>,
}

impl std::fmt::Debug for FaceRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaceRegistry").field("options", &self.options).finish_non_exhaustive()
    }
}

impl FaceRegistry {
    /// A registry; engines open on first use.
    pub fn new(options: RegistryOptions, consent_keys: KeySet, embedder: Option<Arc<Embedder>>) -> Self {
        Self { options, consent_keys, embedder, engines: tokio::sync::Mutex::new(HashMap::new()) }
    }

    /// The one tenant of a dedicated instance.
    pub fn only_tenant(&self) -> Option<&str> {
        self.options.only_tenant.as_deref()
    }

    /// The engine of `tenant_id`, opening it on first use; refuses a tenant
    /// this instance does not serve.
    pub async fn engine(&self, tenant_id: &str) -> Result<Arc<FaceEngine>> {
        if let Some(only) = &self.options.only_tenant
            && only != tenant_id
        {
            return Err(Error::denied(format!(
                "this facematch instance serves tenant {only} only; each tenant has its own instance"
            )));
        }
        let tenant_id = parse_id("tenant_id", tenant_id)?;
        let mut engines = self.engines.lock().await;
        if let Some(e) = engines.get(&tenant_id) {
            return Ok(e.clone());
        }
        let dir = tenant_dir(&self.options.base, &tenant_id);
        let key_path = match &self.options.tenant_key {
            TenantKey::File(p) => p.clone(),
            TenantKey::PerTenantDir => dir.join("tenant.key"),
        };
        let tenant_key = crate::vault::load_or_create_key(&key_path, self.options.generate_keys)
            .map_err(|e| Error::Unavailable(format!("facematch tenant key: {e}")))?;
        let engine = Arc::new(
            FaceEngine::open(
                &tenant_id,
                &dir,
                tenant_key,
                self.consent_keys.clone(),
                self.embedder.clone(),
                self.options.engine.clone(),
                self.options.generate_keys,
            )
            .await?,
        );
        engines.insert(tenant_id, engine.clone());
        Ok(engine)
    }

    /// Whether `tenant_id` has facematch data here (one file check; a
    /// dedicated instance always does). Readers use it so that asking about a
    /// tenant creates nothing.
    fn holds_data(&self, tenant_id: &str) -> bool {
        self.options.only_tenant.is_some()
            || parse_id("tenant_id", tenant_id)
                .is_ok_and(|t| tenant_dir(&self.options.base, &t).join("faces.db").exists())
    }

    /// Closes every open engine.
    pub async fn close(&self) {
        for engine in self.engines.lock().await.values() {
            engine.close().await;
        }
    }
}

impl FaceMatcher for FaceRegistry {
    fn identify<'a>(&'a self, tenant_id: &'a str, req: IdentifyRequest) -> BoxFuture<'a, Result<MatchResult>> {
        Box::pin(async move { self.engine(tenant_id).await?.identify(req, None).await })
    }

    fn delete<'a>(&'a self, tenant_id: &'a str, req: DeleteRequest) -> BoxFuture<'a, Result<DeletionCertificate>> {
        Box::pin(
            async move { self.engine(tenant_id).await?.delete(req, crate::journal::service_actor("consent")).await },
        )
    }

    fn list_enrolled<'a>(
        &'a self,
        tenant_id: &'a str,
        estate_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<EnrolledPerson>>> {
        Box::pin(async move {
            if !self.holds_data(tenant_id) {
                return Ok(Vec::new());
            }
            self.engine(tenant_id).await?.list_enrolled(estate_id).await
        })
    }

    fn count<'a>(&'a self, tenant_id: &'a str) -> BoxFuture<'a, Result<PersonCount>> {
        Box::pin(async move {
            if !self.holds_data(tenant_id) {
                return Ok(PersonCount { tenant_id: tenant_id.to_owned(), persons: 0, templates: 0 });
            }
            self.engine(tenant_id).await?.count().await
        })
    }

    fn certificate_keys<'a>(&'a self, tenant_id: &'a str) -> BoxFuture<'a, Result<VerifyingKeys>> {
        Box::pin(async move {
            let engine = self.engine(tenant_id).await?;
            Ok(VerifyingKeys { keys: vec![engine.certificate_key()] })
        })
    }

    fn journal<'a>(
        &'a self,
        tenant_id: &'a str,
        after_seq: i64,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<JournalEntry>>> {
        Box::pin(async move {
            if !self.holds_data(tenant_id) {
                return Ok(Vec::new());
            }
            self.engine(tenant_id).await?.journal(after_seq, limit).await
        })
    }
}
