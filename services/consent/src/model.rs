//! Consent rows and their protobuf form.

use estate_core::ms_to_timestamp_parts;
use estate_proto::consent::{
    Consent, ConsentMethod, ConsentStatus, DeletionReason, DeletionRequest, ImpactAssessment, Purpose,
};
use prost_types::Timestamp;

pub(crate) const ACTIVE: &str = "active";
pub(crate) const WITHDRAWN: &str = "withdrawn";
pub(crate) const ENDED: &str = "ended";
pub(crate) const FACE_PURPOSE: &str = "face_verification_at_gates";

pub(crate) fn ts(ms: i64) -> Option<Timestamp> {
    let (seconds, nanos) = ms_to_timestamp_parts(ms);
    Some(Timestamp { seconds, nanos })
}

pub(crate) fn method_name(m: ConsentMethod) -> Option<&'static str> {
    match m {
        ConsentMethod::AppTap => Some("app_tap"),
        ConsentMethod::SignedPaperForm => Some("signed_paper_form"),
        ConsentMethod::Unspecified => None,
    }
}

pub(crate) fn reason_name(r: DeletionReason) -> &'static str {
    match r {
        DeletionReason::ConsentWithdrawn => "consent_withdrawn",
        DeletionReason::ResidencyEnded => "residency_ended",
        DeletionReason::PersonRequest => "person_request",
        DeletionReason::RetentionExpired => "retention_expired",
        DeletionReason::Unspecified => "unspecified",
    }
}

fn reason_from(name: &str) -> DeletionReason {
    match name {
        "consent_withdrawn" => DeletionReason::ConsentWithdrawn,
        "residency_ended" => DeletionReason::ResidencyEnded,
        "person_request" => DeletionReason::PersonRequest,
        "retention_expired" => DeletionReason::RetentionExpired,
        _ => DeletionReason::Unspecified,
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct ConsentRow {
    pub tenant_id: String,
    pub id: String,
    pub estate_id: String,
    pub person_id: String,
    pub person_pseudonym: String,
    pub purpose: String,
    pub notice_id: String,
    pub notice_version: i64,
    pub notice_text_sha256: String,
    pub method: String,
    pub paper_form_scan_sha256: String,
    pub granted_by_guardian: i64,
    pub guardian_person_id: Option<String>,
    pub concerns_minor: i64,
    pub status: String,
    pub granted_at: i64,
    pub withdrawn_at: Option<i64>,
    pub deletion_request_id: Option<String>,
}

pub(crate) const CONSENT_COLS: &str = "tenant_id, id, estate_id, person_id, person_pseudonym, purpose, notice_id, \
     notice_version, notice_text_sha256, method, paper_form_scan_sha256, granted_by_guardian, guardian_person_id, \
     concerns_minor, status, granted_at, withdrawn_at, deletion_request_id";

impl From<ConsentRow> for Consent {
    fn from(r: ConsentRow) -> Self {
        Consent {
            id: r.id,
            tenant_id: r.tenant_id,
            estate_id: r.estate_id,
            person_id: r.person_id,
            person_pseudonym: r.person_pseudonym,
            purpose: if r.purpose == FACE_PURPOSE { Purpose::FaceVerificationAtGates as i32 } else { 0 },
            notice_version: r.notice_version,
            notice_text_sha256: r.notice_text_sha256,
            method: match r.method.as_str() {
                "app_tap" => ConsentMethod::AppTap as i32,
                "signed_paper_form" => ConsentMethod::SignedPaperForm as i32,
                _ => 0,
            },
            paper_form_scan_sha256: r.paper_form_scan_sha256,
            granted_by_guardian: r.granted_by_guardian != 0,
            guardian_person_id: r.guardian_person_id.unwrap_or_default(),
            concerns_minor: r.concerns_minor != 0,
            status: match r.status.as_str() {
                ACTIVE => ConsentStatus::Active as i32,
                WITHDRAWN => ConsentStatus::Withdrawn as i32,
                _ => ConsentStatus::Ended as i32,
            },
            granted_at: ts(r.granted_at),
            withdrawn_at: r.withdrawn_at.and_then(ts),
            deletion_request_id: r.deletion_request_id.unwrap_or_default(),
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct DeletionRow {
    pub tenant_id: String,
    pub id: String,
    pub estate_id: String,
    pub person_pseudonym: String,
    pub reason: String,
    pub source_id: String,
    pub requested_at: i64,
    pub fulfilled_at: Option<i64>,
    pub certificate_id: Option<String>,
}

pub(crate) const DELETION_COLS: &str =
    "tenant_id, id, estate_id, person_pseudonym, reason, source_id, requested_at, fulfilled_at, certificate_id";

impl From<DeletionRow> for DeletionRequest {
    fn from(r: DeletionRow) -> Self {
        DeletionRequest {
            id: r.id,
            tenant_id: r.tenant_id,
            estate_id: r.estate_id,
            person_pseudonym: r.person_pseudonym,
            reason: reason_from(&r.reason) as i32,
            source_id: r.source_id,
            requested_at: ts(r.requested_at),
            fulfilled: r.fulfilled_at.is_some(),
            fulfilled_at: r.fulfilled_at.and_then(ts),
            certificate_id: r.certificate_id.unwrap_or_default(),
        }
    }
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct AssessmentRow {
    pub id: String,
    pub estate_id: String,
    pub author: String,
    pub assessed_on: String,
    pub document_sha256: String,
    pub recorded_at: i64,
}

impl From<AssessmentRow> for ImpactAssessment {
    fn from(r: AssessmentRow) -> Self {
        ImpactAssessment {
            id: r.id,
            estate_id: r.estate_id,
            author: r.author,
            assessed_on: r.assessed_on,
            document_sha256: r.document_sha256,
            recorded_at: ts(r.recorded_at),
        }
    }
}
