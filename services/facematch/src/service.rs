//! The gRPC face of facematch: who may call what (R14), then the engine of
//! the caller's tenant. No RPC returns a template or an image (R8).

use crate::journal::actor_of;
use crate::registry::FaceRegistry;
use estate_auth::{Caller, Principal};
use estate_core::{Error, Result, now_ms};
use estate_proto::consent::VerifyingKeys;
use estate_proto::facematch::facematch_service_server::FacematchService;
use estate_proto::facematch::*;
use std::sync::Arc;

/// The facematch gRPC service.
#[derive(Debug, Clone)]
pub struct FacematchDesk {
    registry: Arc<FaceRegistry>,
}

/// Names of the mesh services allowed to call a dedicated instance with a
/// service token.
const GATE_SERVICE: &str = "gate";
const CONSENT_SERVICE: &str = "consent";

impl FacematchDesk {
    /// The service over `registry`.
    pub fn new(registry: Arc<FaceRegistry>) -> Self {
        Self { registry }
    }

    /// The tenant a service principal acts for: the instance's one tenant.
    fn service_tenant(&self, name: &str, allowed: &[&str]) -> Result<String> {
        if !allowed.contains(&name) {
            return Err(Error::denied(format!("the {name} service may not make this call")));
        }
        self.registry.only_tenant().map(str::to_owned).ok_or_else(|| {
            Error::denied("service tokens are accepted only by a dedicated (single-tenant) facematch instance")
        })
    }

    /// Tenant of a caller allowed to act at `estate_id`: an operator of that
    /// estate, a gate of that estate (when `gates`), or one of the `services`.
    fn tenant_for_estate(&self, caller: &Caller, estate_id: &str, gates: bool, services: &[&str]) -> Result<String> {
        match &caller.principal {
            Principal::Operator { .. } => caller.operator_for_estate(estate_id).map(str::to_owned),
            Principal::Gate { tenant_id, estate_id: own, .. } if gates => {
                if own == estate_id {
                    Ok(tenant_id.clone())
                } else {
                    Err(Error::denied("a gate may use only its own estate's gallery"))
                }
            }
            Principal::Service { name } => self.service_tenant(name, services),
            _ => Err(Error::denied("this call needs an operator or gate token of the estate")),
        }
    }

    fn tenant_of_staff(&self, caller: &Caller, services: &[&str]) -> Result<String> {
        match &caller.principal {
            Principal::Operator { .. } => caller.unrestricted_operator_tenant().map(str::to_owned),
            Principal::Service { name } => self.service_tenant(name, services),
            _ => Err(Error::denied("this call needs an operator token valid for every estate of the tenant")),
        }
    }

    async fn enrol(&self, caller: &Caller, req: EnrolRequest) -> Result<EnrolResponse> {
        // A resident enrols through their app with the attestation consent
        // issued to them (or their guardian); the attestation names the
        // person and estate, and the engine checks both.
        let tenant = match &caller.principal {
            Principal::Resident { tenant_id, .. } => tenant_id.clone(),
            _ => self.tenant_for_estate(caller, &req.estate_id, true, &[CONSENT_SERVICE])?,
        };
        let actor = actor_of(caller, &req.person_pseudonym);
        self.registry.engine(&tenant).await?.enrol(req, now_ms() / 1000, actor).await
    }

    async fn identify(&self, caller: &Caller, req: IdentifyRequest) -> Result<MatchResult> {
        let tenant = self.tenant_for_estate(caller, &req.estate_id, true, &[GATE_SERVICE])?;
        self.registry.engine(&tenant).await?.identify(req, searcher(caller)).await
    }

    async fn verify(&self, caller: &Caller, req: VerifyRequest) -> Result<MatchResult> {
        let tenant = self.tenant_for_estate(caller, &req.estate_id, true, &[GATE_SERVICE])?;
        self.registry.engine(&tenant).await?.verify(req, searcher(caller)).await
    }

    async fn delete(&self, caller: &Caller, req: DeleteRequest) -> Result<DeletionCertificate> {
        let tenant = if req.estate_id.is_empty() {
            self.tenant_of_staff(caller, &[CONSENT_SERVICE])?
        } else {
            self.tenant_for_estate(caller, &req.estate_id, false, &[CONSENT_SERVICE])?
        };
        self.registry.engine(&tenant).await?.delete(req, actor_of(caller, "")).await
    }

    async fn get_certificate(&self, caller: &Caller, req: GetCertificateRequest) -> Result<DeletionCertificate> {
        let tenant = self.tenant_of_staff(caller, &[CONSENT_SERVICE])?;
        self.registry.engine(&tenant).await?.certificate(&req.certificate_id).await
    }

    async fn list_enrolled(&self, caller: &Caller, req: ListEnrolledRequest) -> Result<ListEnrolledResponse> {
        let tenant = self.tenant_for_estate(caller, &req.estate_id, false, &[CONSENT_SERVICE])?;
        let persons = self.registry.engine(&tenant).await?.list_enrolled(&req.estate_id).await?;
        Ok(ListEnrolledResponse { persons })
    }

    async fn count_persons(&self, caller: &Caller, _req: CountPersonsRequest) -> Result<PersonCount> {
        let tenant = self.tenant_of_staff(caller, &[CONSENT_SERVICE])?;
        self.registry.engine(&tenant).await?.count().await
    }

    async fn get_certificate_keys(&self, caller: &Caller, _req: GetCertificateKeysRequest) -> Result<VerifyingKeys> {
        let tenant = match &caller.principal {
            Principal::Service { name } => self.service_tenant(name, &[CONSENT_SERVICE, GATE_SERVICE])?,
            _ => caller.tenant_id()?.to_owned(),
        };
        let engine = self.registry.engine(&tenant).await?;
        Ok(VerifyingKeys { keys: vec![engine.certificate_key()] })
    }

    async fn set_threshold(&self, caller: &Caller, req: SetThresholdRequest) -> Result<Threshold> {
        let tenant = caller.operator_for_estate(&req.estate_id)?.to_owned();
        self.registry.engine(&tenant).await?.set_threshold(&req.estate_id, req.threshold, actor_of(caller, "")).await
    }

    async fn read_journal(&self, caller: &Caller, req: ReadJournalRequest) -> Result<JournalPage> {
        let tenant = self.tenant_of_staff(caller, &[CONSENT_SERVICE])?;
        let entries = self.registry.engine(&tenant).await?.journal(req.after_seq, req.limit).await?;
        Ok(JournalPage { entries })
    }
}

/// Who a search is journalled as: everyone but the gate service, whose
/// decisions (which include the search) the gate audits itself.
fn searcher(caller: &Caller) -> Option<estate_proto::common::Actor> {
    match &caller.principal {
        Principal::Service { name } if name == GATE_SERVICE => None,
        _ => Some(actor_of(caller, "")),
    }
}

#[tonic::async_trait]
impl FacematchService for FacematchDesk {
    estate_auth::unary_rpcs! {
        "facematch", FacematchDesk;
        enrol(EnrolRequest) -> EnrolResponse;
        identify(IdentifyRequest) -> MatchResult;
        verify(VerifyRequest) -> MatchResult;
        delete(DeleteRequest) -> DeletionCertificate;
        get_certificate(GetCertificateRequest) -> DeletionCertificate;
        list_enrolled(ListEnrolledRequest) -> ListEnrolledResponse;
        count_persons(CountPersonsRequest) -> PersonCount;
        get_certificate_keys(GetCertificateKeysRequest) -> VerifyingKeys;
        set_threshold(SetThresholdRequest) -> Threshold;
        read_journal(ReadJournalRequest) -> JournalPage;
    }
}
