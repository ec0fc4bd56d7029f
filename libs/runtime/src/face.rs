//! The gate and consent services' client of a remote facematch (distributed
//! mode): one endpoint per tenant, a service token, a deadline per call, and
//! the trace context in the metadata. Facematch never calls back (R9).

use crate::StartError;
use estate_core::{Error, Result};
use estate_facematch::FaceMatcher;
use estate_proto::consent::VerifyingKeys;
use estate_proto::facematch::facematch_service_client::FacematchServiceClient;
use estate_proto::facematch::{
    CountPersonsRequest, DeleteRequest, DeletionCertificate, EnrolledPerson, GetCertificateKeysRequest,
    IdentifyRequest, JournalEntry, ListEnrolledRequest, MatchResult, PersonCount, ReadJournalRequest,
};
use futures_util::future::BoxFuture;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Channel, Endpoint};

/// Facematch instances by tenant, over gRPC.
#[derive(Debug, Clone)]
pub struct RemoteFaceMatcher {
    channels: HashMap<String, Channel>,
    bearer: AsciiMetadataValue,
    timeout: Duration,
}

fn status_error(s: tonic::Status) -> Error {
    let m = s.message().to_owned();
    match s.code() {
        tonic::Code::InvalidArgument => Error::InvalidArgument { field: "face", reason: m },
        tonic::Code::NotFound => Error::NotFound("facematch object"),
        tonic::Code::PermissionDenied => Error::PermissionDenied(format!("facematch: {m}")),
        tonic::Code::FailedPrecondition => Error::FailedPrecondition(format!("facematch: {m}")),
        tonic::Code::Unauthenticated => Error::Unavailable(format!("facematch refused this service's token: {m}")),
        _ => Error::Unavailable(format!("facematch: {:?}: {m}", s.code())),
    }
}

impl RemoteFaceMatcher {
    fn client(&self, tenant_id: &str) -> Result<FacematchServiceClient<Channel>> {
        let channel = self
            .channels
            .get(tenant_id)
            .cloned()
            .ok_or_else(|| Error::Unavailable("no facematch endpoint is configured for this tenant".into()))?;
        Ok(FacematchServiceClient::new(channel))
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(message);
        req.set_timeout(self.timeout);
        req.metadata_mut().insert("authorization", self.bearer.clone());
        if let Some(tp) = estate_telemetry::current_traceparent()
            && let Ok(v) = AsciiMetadataValue::try_from(tp)
        {
            req.metadata_mut().insert("traceparent", v);
        }
        req
    }
}

impl FaceMatcher for RemoteFaceMatcher {
    fn identify<'a>(&'a self, tenant_id: &'a str, req: IdentifyRequest) -> BoxFuture<'a, Result<MatchResult>> {
        Box::pin(async move {
            let mut c = self.client(tenant_id)?;
            Ok(c.identify(self.request(req)).await.map_err(status_error)?.into_inner())
        })
    }

    fn delete<'a>(&'a self, tenant_id: &'a str, req: DeleteRequest) -> BoxFuture<'a, Result<DeletionCertificate>> {
        Box::pin(async move {
            let mut c = self.client(tenant_id)?;
            Ok(c.delete(self.request(req)).await.map_err(status_error)?.into_inner())
        })
    }

    fn list_enrolled<'a>(
        &'a self,
        tenant_id: &'a str,
        estate_id: &'a str,
    ) -> BoxFuture<'a, Result<Vec<EnrolledPerson>>> {
        Box::pin(async move {
            let mut c = self.client(tenant_id)?;
            let req = self.request(ListEnrolledRequest { estate_id: estate_id.to_owned() });
            Ok(c.list_enrolled(req).await.map_err(status_error)?.into_inner().persons)
        })
    }

    fn count<'a>(&'a self, tenant_id: &'a str) -> BoxFuture<'a, Result<PersonCount>> {
        Box::pin(async move {
            let mut c = self.client(tenant_id)?;
            Ok(c.count_persons(self.request(CountPersonsRequest {})).await.map_err(status_error)?.into_inner())
        })
    }

    fn certificate_keys<'a>(&'a self, tenant_id: &'a str) -> BoxFuture<'a, Result<VerifyingKeys>> {
        Box::pin(async move {
            let mut c = self.client(tenant_id)?;
            Ok(c.get_certificate_keys(self.request(GetCertificateKeysRequest {}))
                .await
                .map_err(status_error)?
                .into_inner())
        })
    }

    fn journal<'a>(
        &'a self,
        tenant_id: &'a str,
        after_seq: i64,
        limit: u32,
    ) -> BoxFuture<'a, Result<Vec<JournalEntry>>> {
        Box::pin(async move {
            let mut c = self.client(tenant_id)?;
            let req = self.request(ReadJournalRequest { after_seq, limit });
            Ok(c.read_journal(req).await.map_err(status_error)?.into_inner().entries)
        })
    }
}

/// The remote facematch of `facematch.endpoints`, or `None` when none is
/// configured. `service` names the caller in errors ("gate", "consent").
pub fn remote_face_matcher(
    runtime: &crate::Runtime,
    service: &str,
) -> Result<Option<Arc<dyn FaceMatcher>>, StartError> {
    let f = &runtime.settings.facematch;
    if f.endpoints.is_empty() {
        return Ok(None);
    }
    let path = f.token_file.as_ref().ok_or_else(|| {
        StartError::Tokens(format!(
            "facematch.endpoints is set but facematch.token_file (the {service} service token) is not"
        ))
    })?;
    let token = std::fs::read_to_string(path)
        .map_err(|e| StartError::Tokens(format!("cannot read {}: {e}", path.display())))?;
    let bearer = AsciiMetadataValue::try_from(format!("Bearer {}", token.trim()))
        .map_err(|_| StartError::Tokens("facematch.token_file does not hold a valid token".into()))?;
    let mut channels = HashMap::new();
    for (tenant, url) in &f.endpoints {
        let mut ep = Endpoint::from_shared(url.clone())
            .map_err(|e| StartError::Tokens(format!("facematch.endpoints.{tenant}: {e}")))?
            .connect_timeout(Duration::from_millis(f.call_timeout_ms.max(100)));
        if let Some(tls) = estate_auth::tls::client_config(&runtime.settings.tls, url).map_err(StartError::Tls)? {
            ep = ep.tls_config(tls).map_err(|e| StartError::Tls(format!("facematch.endpoints.{tenant}: {e}")))?;
        }
        let channel = ep.connect_lazy();
        channels.insert(tenant.clone(), channel);
    }
    Ok(Some(Arc::new(RemoteFaceMatcher {
        channels,
        bearer,
        timeout: Duration::from_millis(f.call_timeout_ms.max(100)),
    })))
}
