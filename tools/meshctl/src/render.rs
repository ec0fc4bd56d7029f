//! Output as a table for people or JSON for scripts.

use estate_proto::common::{CredentialKind, RecordStatus};
use estate_proto::identity::*;
use serde_json::{Map, Value};

/// Output format chosen with `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns.
    Table,
    /// One JSON document (an array for lists).
    Json,
    /// Only the id (the token, for `token issue`), one per line: for scripts.
    Id,
}

/// Something meshctl can print: named fields in a fixed order.
pub trait Fields {
    /// (column, value) pairs.
    fn fields(&self) -> Vec<(&'static str, String)>;
}

fn time(t: &Option<prost_types::Timestamp>) -> String {
    let Some(t) = t else { return String::new() };
    time::OffsetDateTime::from_unix_timestamp(t.seconds)
        .ok()
        .and_then(|d| d.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

fn status(s: i32) -> String {
    match RecordStatus::try_from(s) {
        Ok(RecordStatus::Active) => "active".into(),
        Ok(RecordStatus::Deactivated) => "deactivated".into(),
        _ => "unknown".into(),
    }
}

fn kinds(k: &[i32]) -> String {
    k.iter()
        .map(|k| match CredentialKind::try_from(*k) {
            Ok(CredentialKind::Card) => "card",
            Ok(CredentialKind::Pin) => "pin",
            Ok(CredentialKind::Qr) => "qr",
            Ok(CredentialKind::Visitor) => "visitor",
            Ok(CredentialKind::Face) => "face",
            _ => "?",
        })
        .collect::<Vec<_>>()
        .join(",")
}

impl Fields for Tenant {
    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.clone()),
            ("name", self.name.clone()),
            ("jurisdiction", self.jurisdiction_code.clone()),
            ("status", status(self.status)),
            ("created", time(&self.created_at)),
        ]
    }
}

impl Fields for Estate {
    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.clone()),
            ("name", self.name.clone()),
            ("address", self.address.clone()),
            ("jurisdiction", self.jurisdiction_code.clone()),
            ("status", status(self.status)),
        ]
    }
}

impl Fields for Gate {
    fn fields(&self) -> Vec<(&'static str, String)> {
        let direction = match GateDirection::try_from(self.direction) {
            Ok(GateDirection::In) => "in",
            Ok(GateDirection::Out) => "out",
            Ok(GateDirection::Both) => "both",
            _ => "?",
        };
        vec![
            ("id", self.id.clone()),
            ("estate", self.estate_id.clone()),
            ("name", self.name.clone()),
            ("direction", direction.into()),
            ("kinds", kinds(&self.supported_kinds)),
            ("status", status(self.status)),
        ]
    }
}

impl Fields for Unit {
    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.clone()),
            ("estate", self.estate_id.clone()),
            ("building", self.building.clone()),
            ("unit", self.unit.clone()),
            ("room", self.room.clone()),
            ("status", status(self.status)),
        ]
    }
}

impl Fields for Person {
    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.clone()),
            ("name", self.display_name.clone()),
            ("phone", if self.phone_last4.is_empty() { String::new() } else { format!("…{}", self.phone_last4) }),
            ("birth_date", self.birth_date.clone()),
            ("minor", self.is_minor.to_string()),
            ("guardian", self.guardian_person_id.clone()),
            ("pseudonym", self.pseudonym.clone()),
            ("status", status(self.status)),
        ]
    }
}

impl Fields for Residency {
    fn fields(&self) -> Vec<(&'static str, String)> {
        let role = match ResidencyRole::try_from(self.role) {
            Ok(ResidencyRole::Owner) => "owner",
            Ok(ResidencyRole::Occupant) => "occupant",
            Ok(ResidencyRole::Renter) => "renter",
            Ok(ResidencyRole::Staff) => "staff",
            _ => "?",
        };
        let status = if self.status == ResidencyStatus::Ended as i32 { "ended" } else { "active" };
        vec![
            ("id", self.id.clone()),
            ("person", self.person_id.clone()),
            ("unit", self.unit_id.clone()),
            ("estate", self.estate_id.clone()),
            ("role", role.into()),
            ("from", time(&self.valid_from)),
            ("until", time(&self.valid_until)),
            ("status", status.into()),
        ]
    }
}

impl Fields for IssueTokenResponse {
    fn fields(&self) -> Vec<(&'static str, String)> {
        vec![("token", self.token.clone()), ("token_id", self.token_id.clone()), ("expires", time(&self.expires_at))]
    }
}

impl Fields for WhoAmIResponse {
    fn fields(&self) -> Vec<(&'static str, String)> {
        let kind = match estate_proto::common::ActorKind::try_from(self.kind) {
            Ok(estate_proto::common::ActorKind::PlatformAdmin) => "platform_admin",
            Ok(estate_proto::common::ActorKind::Operator) => "operator",
            Ok(estate_proto::common::ActorKind::Gate) => "gate",
            Ok(estate_proto::common::ActorKind::Resident) => "resident",
            Ok(estate_proto::common::ActorKind::Regulator) => "regulator",
            _ => "?",
        };
        vec![
            ("kind", kind.into()),
            ("subject", self.subject.clone()),
            ("tenant", self.tenant_id.clone()),
            ("estates", self.estate_ids.join(",")),
            ("gate", self.gate_id.clone()),
            ("person", self.person_id.clone()),
            ("jurisdictions", self.jurisdiction_codes.join(",")),
            ("expires", time(&self.expires_at)),
        ]
    }
}

fn id_of(f: &[(&'static str, String)]) -> String {
    f.iter().find(|(k, _)| *k == "token" || *k == "id").map(|(_, v)| v.clone()).unwrap_or_default()
}

fn json_of(f: &[(&'static str, String)]) -> Value {
    let mut m = Map::new();
    for (k, v) in f {
        m.insert((*k).to_owned(), Value::String(v.clone()));
    }
    Value::Object(m)
}

/// Formats one item.
pub fn one<T: Fields>(item: &T, output: Output) -> String {
    let f = item.fields();
    match output {
        Output::Json => serde_json::to_string_pretty(&json_of(&f)).unwrap_or_default(),
        Output::Id => id_of(&f),
        Output::Table => {
            let width = f.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
            f.iter().map(|(k, v)| format!("{k:<width$}  {v}")).collect::<Vec<_>>().join("\n")
        }
    }
}

/// Formats a list.
pub fn many<T: Fields>(items: &[T], output: Output) -> String {
    let rows: Vec<Vec<(&'static str, String)>> = items.iter().map(Fields::fields).collect();
    match output {
        Output::Json => {
            serde_json::to_string_pretty(&Value::Array(rows.iter().map(|r| json_of(r)).collect())).unwrap_or_default()
        }
        Output::Id => rows.iter().map(|r| id_of(r)).collect::<Vec<_>>().join("\n"),
        Output::Table => {
            let Some(first) = rows.first() else { return "(none)".into() };
            let headers: Vec<&str> = first.iter().map(|(k, _)| *k).collect();
            let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
            for r in &rows {
                for (i, (_, v)) in r.iter().enumerate() {
                    widths[i] = widths[i].max(v.chars().count());
                }
            }
            let line = |cells: Vec<&str>| {
                cells
                    .iter()
                    .enumerate()
                    .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
                    .collect::<Vec<_>>()
                    .join("  ")
                    .trim_end()
                    .to_owned()
            };
            let mut out = vec![line(
                headers.iter().map(|h| h.to_uppercase()).collect::<Vec<_>>().iter().map(String::as_str).collect(),
            )];
            for r in &rows {
                out.push(line(r.iter().map(|(_, v)| v.as_str()).collect()));
            }
            out.join("\n")
        }
    }
}

mod consent_fields {
    use super::{Fields, time};
    use estate_proto::consent::*;

    fn consent_status(s: i32) -> &'static str {
        match ConsentStatus::try_from(s) {
            Ok(ConsentStatus::Active) => "active",
            Ok(ConsentStatus::Withdrawn) => "withdrawn",
            Ok(ConsentStatus::Ended) => "ended",
            _ => "?",
        }
    }

    impl Fields for NoticeText {
        fn fields(&self) -> Vec<(&'static str, String)> {
            vec![
                ("id", self.notice_id.clone()),
                ("estate", self.estate_id.clone()),
                ("version", self.version.to_string()),
                ("language", self.language.clone()),
                ("sha256", self.text_sha256.clone()),
                ("effective", time(&self.effective_from)),
                ("text", self.text.clone()),
            ]
        }
    }

    impl Fields for Notice {
        fn fields(&self) -> Vec<(&'static str, String)> {
            let hashes = self.texts.iter().map(|t| format!("{}={}", t.language, t.text_sha256)).collect::<Vec<_>>();
            vec![
                ("id", self.id.clone()),
                ("estate", self.estate_id.clone()),
                ("version", self.version.to_string()),
                ("sha256", hashes.join(" ")),
                ("effective", time(&self.effective_from)),
            ]
        }
    }

    impl Fields for Consent {
        fn fields(&self) -> Vec<(&'static str, String)> {
            vec![
                ("id", self.id.clone()),
                ("estate", self.estate_id.clone()),
                ("person", self.person_id.clone()),
                ("notice_version", self.notice_version.to_string()),
                ("by_guardian", self.granted_by_guardian.to_string()),
                ("minor", self.concerns_minor.to_string()),
                ("status", consent_status(self.status).into()),
                ("granted", time(&self.granted_at)),
                ("withdrawn", time(&self.withdrawn_at)),
                ("deletion_request", self.deletion_request_id.clone()),
            ]
        }
    }

    impl Fields for SignedAttestation {
        fn fields(&self) -> Vec<(&'static str, String)> {
            use base64::Engine;
            let b64 = base64::engine::general_purpose::STANDARD;
            let d = self.decoded.clone().unwrap_or_default();
            vec![
                ("id", d.consent_id.clone()),
                ("key_id", self.key_id.clone()),
                ("person_pseudonym", d.person_pseudonym),
                ("estate", d.estate_id),
                ("expires_at_unix", d.expires_at_unix.to_string()),
                ("claims_b64", b64.encode(&self.claims)),
                ("signature_b64", b64.encode(&self.signature)),
            ]
        }
    }

    impl Fields for ImpactAssessment {
        fn fields(&self) -> Vec<(&'static str, String)> {
            vec![
                ("id", self.id.clone()),
                ("estate", self.estate_id.clone()),
                ("author", self.author.clone()),
                ("assessed_on", self.assessed_on.clone()),
                ("document_sha256", self.document_sha256.clone()),
            ]
        }
    }

    impl Fields for FaceVerificationStatus {
        fn fields(&self) -> Vec<(&'static str, String)> {
            vec![
                ("id", self.estate_id.clone()),
                ("face_enabled", self.enabled.to_string()),
                ("assessment", self.assessment_id.clone()),
                ("updated", time(&self.updated_at)),
            ]
        }
    }

    impl Fields for FilingStatus {
        fn fields(&self) -> Vec<(&'static str, String)> {
            let level = match FilingLevel::try_from(self.level) {
                Ok(FilingLevel::Ok) => "ok",
                Ok(FilingLevel::Warning) => "WARNING",
                Ok(FilingLevel::FilingRequired) => "FILING REQUIRED",
                _ => "?",
            };
            vec![
                ("persons_with_face_consent", self.persons_with_face_consent.to_string()),
                ("level", level.into()),
                ("warning_at", self.warning_at.to_string()),
                ("filing_threshold", self.filing_threshold.to_string()),
                ("message", self.message.clone()),
            ]
        }
    }

    impl Fields for DeletionRequest {
        fn fields(&self) -> Vec<(&'static str, String)> {
            let reason = match DeletionReason::try_from(self.reason) {
                Ok(DeletionReason::ConsentWithdrawn) => "consent withdrawn",
                Ok(DeletionReason::ResidencyEnded) => "residency ended",
                Ok(DeletionReason::PersonRequest) => "person request",
                Ok(DeletionReason::RetentionExpired) => "retention expired",
                _ => "?",
            };
            vec![
                ("id", self.id.clone()),
                ("estate", self.estate_id.clone()),
                ("person_pseudonym", self.person_pseudonym.clone()),
                ("reason", reason.into()),
                ("requested", time(&self.requested_at)),
                ("fulfilled", time(&self.fulfilled_at)),
                ("certificate", self.certificate_id.clone()),
            ]
        }
    }
}

mod credential_fields {
    use super::{Fields, kinds, time};
    use estate_proto::credentials::*;

    impl Fields for Credential {
        fn fields(&self) -> Vec<(&'static str, String)> {
            let status = match CredentialStatus::try_from(self.status) {
                Ok(CredentialStatus::Active) => "active",
                Ok(CredentialStatus::Suspended) => "suspended",
                Ok(CredentialStatus::Revoked) => "revoked",
                _ => "?",
            };
            vec![
                ("id", self.id.clone()),
                ("kind", kinds(&[self.kind])),
                ("person", self.person_id.clone()),
                ("estates", self.estate_ids.join(",")),
                ("status", status.into()),
                ("until", time(&self.valid_until)),
                (
                    "entries",
                    if self.max_entries > 0 {
                        format!("{}/{}", self.entries_used, self.max_entries)
                    } else {
                        String::new()
                    },
                ),
                ("version", self.version.to_string()),
            ]
        }
    }

    impl Fields for IssuedCredential {
        fn fields(&self) -> Vec<(&'static str, String)> {
            let mut f = self.credential.as_ref().map(Fields::fields).unwrap_or_default();
            if !self.secret.is_empty() {
                f.push(("secret_shown_once", self.secret.clone()));
            }
            f
        }
    }

    impl Fields for AlternativeGranted {
        fn fields(&self) -> Vec<(&'static str, String)> {
            let mut f = self.issued.as_ref().map(Fields::fields).unwrap_or_default();
            f.push(("card_request", self.card_request_id.clone()));
            f.push(("note", self.note.clone()));
            f
        }
    }

    impl Fields for EstatePolicy {
        fn fields(&self) -> Vec<(&'static str, String)> {
            vec![
                ("id", self.estate_id.clone()),
                ("accepted", kinds(&self.accepted_kinds)),
                ("alternatives", kinds(&self.alternative_kinds)),
                ("default", self.is_default.to_string()),
            ]
        }
    }

    impl Fields for Verification {
        fn fields(&self) -> Vec<(&'static str, String)> {
            let outcome = VerifyOutcome::try_from(self.outcome).map(|o| o.as_str_name()).unwrap_or("?");
            vec![
                ("outcome", outcome.trim_start_matches("VERIFY_OUTCOME_").to_owned()),
                ("id", self.credential_id.clone()),
                ("person_pseudonym", self.person_pseudonym.clone()),
                ("kind", kinds(&[self.kind])),
            ]
        }
    }
}

mod audit_fields {
    use super::{Fields, time};
    use estate_proto::audit::*;

    impl Fields for Entry {
        fn fields(&self) -> Vec<(&'static str, String)> {
            let d = self.decoded.clone().unwrap_or_default();
            vec![
                ("index", self.index.to_string()),
                ("when", time(&d.occurred_at)),
                ("action", d.action),
                ("estate", d.estate_id),
                ("person", d.person_pseudonym),
                ("minor", d.concerns_minor.to_string()),
                ("source", d.source),
            ]
        }
    }

    impl Fields for AccessReportLine {
        fn fields(&self) -> Vec<(&'static str, String)> {
            vec![
                ("when", time(&self.when)),
                ("what", self.what.clone()),
                ("estate", self.estate_id.clone()),
                ("by", self.by_role.clone()),
                ("why", self.why.clone()),
            ]
        }
    }
}

mod gate_fields {
    use super::{Fields, kinds, time};
    use estate_proto::gate::*;

    /// A verified offline bundle, summarised (never its hashes or key).
    #[derive(Debug)]
    pub struct BundleSummary {
        /// The verified contents.
        pub contents: BundleContents,
        /// Signing key id.
        pub key_id: String,
        /// Whether it was acknowledged.
        pub acknowledged: bool,
    }

    fn ms(ms: i64) -> String {
        time(&Some(prost_types::Timestamp { seconds: ms.div_euclid(1000), nanos: 0 }))
    }

    impl Fields for BundleSummary {
        fn fields(&self) -> Vec<(&'static str, String)> {
            let c = &self.contents;
            vec![
                ("version", c.version.to_string()),
                ("gate", c.gate_id.clone()),
                ("estate", c.estate_id.clone()),
                ("issued", ms(c.issued_at_ms)),
                ("expires", ms(c.expires_at_ms)),
                ("entries", c.entries.len().to_string()),
                ("accepted_kinds", kinds(&c.accepted_kinds)),
                ("signed_by", self.key_id.clone()),
                ("signature", "verified".into()),
                ("acknowledged", self.acknowledged.to_string()),
            ]
        }
    }

    impl Fields for Decision {
        fn fields(&self) -> Vec<(&'static str, String)> {
            let verdict = Verdict::try_from(self.verdict).map(|v| v.as_str_name()).unwrap_or("?");
            let reason = Reason::try_from(self.reason).map(|r| r.as_str_name()).unwrap_or("?");
            vec![
                ("id", self.decision_id.clone()),
                ("verdict", verdict.trim_start_matches("VERDICT_").to_owned()),
                ("reason", reason.trim_start_matches("REASON_").to_owned()),
                ("message", self.message.clone()),
                ("credential", self.credential_id.clone()),
                ("person_pseudonym", self.person_pseudonym.clone()),
                ("kind", kinds(&[self.kind])),
                ("gate", self.gate_id.clone()),
                ("at", time(&self.decided_at)),
            ]
        }
    }

    impl Fields for GateStatus {
        fn fields(&self) -> Vec<(&'static str, String)> {
            vec![
                ("id", self.gate_id.clone()),
                ("name", self.name.clone()),
                ("last_seen", time(&self.last_seen_at)),
                ("bundle_issued", self.bundle_version_issued.to_string()),
                ("bundle_acked", self.bundle_version_acked.to_string()),
                ("acked_expires", time(&self.acked_bundle_expires_at)),
                ("stale_credentials", self.stale_credential_ids.join(",")),
            ]
        }
    }

    impl Fields for GateRules {
        fn fields(&self) -> Vec<(&'static str, String)> {
            let windows = self
                .windows
                .iter()
                .map(|w| {
                    format!(
                        "{}={:02}:{:02}-{:02}:{:02}",
                        kinds(&[w.kind]),
                        w.start_minute / 60,
                        w.start_minute % 60,
                        w.end_minute / 60,
                        w.end_minute % 60
                    )
                })
                .collect::<Vec<_>>()
                .join(",");
            vec![
                ("id", self.gate_id.clone()),
                ("estate", self.estate_id.clone()),
                ("anti_passback", self.anti_passback.to_string()),
                ("windows", windows),
                ("bundle_ttl_secs", self.bundle_ttl_secs.to_string()),
                ("utc_offset_minutes", self.utc_offset_minutes.to_string()),
                ("default", self.is_default.to_string()),
            ]
        }
    }
}

pub use gate_fields::BundleSummary;

/// A verified (or fetched) deletion certificate's signed contents.
#[derive(Debug)]
pub struct Certificate(pub estate_proto::facematch::CertificateBody);

impl Fields for Certificate {
    fn fields(&self) -> Vec<(&'static str, String)> {
        let b = &self.0;
        let reason = estate_proto::facematch::DeletionReason::try_from(b.reason)
            .map(|r| r.as_str_name().trim_start_matches("DELETION_REASON_").to_lowercase())
            .unwrap_or_default();
        vec![
            ("id", b.certificate_id.clone()),
            ("tenant", b.tenant_id.clone()),
            ("estates", b.estate_ids.join(",")),
            ("person", b.person_pseudonym.clone()),
            ("templates_deleted", b.templates_deleted.to_string()),
            ("keys_destroyed", b.key_ids_destroyed.join(",")),
            ("deleted_at", time(&Some(prost_types::Timestamp { seconds: b.deleted_at_unix, nanos: 0 }))),
            ("reason", reason),
            ("request", b.request_id.clone()),
        ]
    }
}
