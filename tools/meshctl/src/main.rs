//! `meshctl`: the operator's command line for the estate access mesh.
//!
//! The endpoint and token come from `--endpoint` / `--token` (or
//! `--token-file`), or from `ESTATE_ENDPOINT` / `ESTATE_TOKEN`.

mod render;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use estate_proto::audit::audit_service_client::AuditServiceClient;
use estate_proto::audit::*;
use estate_proto::common::CredentialKind;
use estate_proto::consent::consent_service_client::ConsentServiceClient;
use estate_proto::consent::*;
use estate_proto::credentials::credential_service_client::CredentialServiceClient;
use estate_proto::credentials::*;
use estate_proto::gate::gate_service_client::GateServiceClient;
use estate_proto::identity::identity_service_client::IdentityServiceClient;
use estate_proto::identity::*;
use render::{Output, many, one};
use std::path::PathBuf;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about = "Operate the estate access mesh")]
struct Cli {
    /// gRPC endpoint of the mesh.
    #[arg(long, env = "ESTATE_ENDPOINT", default_value = "http://127.0.0.1:50051", global = true)]
    endpoint: String,
    /// Bearer token (prefer ESTATE_TOKEN or --token-file: flags show in `ps`).
    #[arg(long, env = "ESTATE_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
    /// Read the bearer token from a file, e.g. ./data/admin.token.
    #[arg(long, global = true, conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Property groups (platform admin).
    #[command(subcommand)]
    Tenant(TenantCmd),
    /// Compounds of the caller's tenant.
    #[command(subcommand)]
    Estate(EstateCmd),
    /// Gates of an estate.
    #[command(subcommand)]
    Gate(GateCmd),
    /// Units (building / unit / room) of an estate.
    #[command(subcommand)]
    Unit(UnitCmd),
    /// Persons of the caller's tenant.
    #[command(subcommand)]
    Person(PersonCmd),
    /// Who lives or works where.
    #[command(subcommand)]
    Residency(ResidencyCmd),
    /// Access tokens.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Notices (告知) shown before face consent.
    #[command(subcommand)]
    Notice(NoticeCmd),
    /// Separate consent to face verification (residents and guardians).
    #[command(subcommand)]
    Consent(ConsentCmd),
    /// Impact assessments (needed before face is enabled).
    #[command(subcommand)]
    Assessment(AssessmentCmd),
    /// Face verification at an estate: enable, disable, status; enrol and
    /// identify against the tenant's facematch.
    #[command(subcommand)]
    Face(FaceCmd),
    /// Deletion certificates of face data (R6): fetch, and verify offline.
    #[command(subcommand)]
    Deletion(DeletionCmd),
    /// Cards, PINs, QR passes, visitor passes.
    #[command(subcommand)]
    Credential(CredentialCmd),
    /// Which credential kinds an estate accepts (never face alone).
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// A resident's non-face way in, issued at once.
    #[command(subcommand)]
    Alternative(AlternativeCmd),
    /// The audit log: entries, exports, offline verification, access report.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Checks a presented credential at an estate, as a gate would.
    Verify {
        #[arg(long, default_value = "")]
        estate: String,
        #[arg(long, conflicts_with_all = ["pin", "qr", "visitor"])]
        card: Option<String>,
        /// PIN entered at the unit given with --unit.
        #[arg(long, requires = "unit")]
        pin: Option<String>,
        #[arg(long, default_value = "")]
        unit: String,
        /// The QR payload "EM1.<id>.<code>".
        #[arg(long)]
        qr: Option<String>,
        #[arg(long)]
        visitor: Option<String>,
    },
    /// Shows the principal of the token in use.
    Whoami,
}

#[derive(Debug, Subcommand)]
enum TenantCmd {
    /// Creates a tenant (platform admin).
    Create {
        #[arg(long)]
        name: String,
        /// Six-digit administrative division code, e.g. 120101.
        #[arg(long)]
        jurisdiction: String,
    },
    /// Shows a tenant (default: the caller's own).
    Get { id: Option<String> },
    /// Lists tenants visible to the caller.
    List {
        #[arg(long)]
        include_deactivated: bool,
    },
    /// Deactivates a tenant (platform admin).
    Deactivate { id: String },
}

#[derive(Debug, Subcommand)]
enum EstateCmd {
    /// Creates an estate in the caller's tenant.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long)]
        address: String,
        #[arg(long)]
        jurisdiction: String,
    },
    /// Shows an estate.
    Get { id: String },
    /// Lists estates.
    List {
        #[arg(long)]
        include_deactivated: bool,
    },
    /// Deactivates an estate with no active residencies.
    Deactivate { id: String },
}

#[derive(Debug, Subcommand)]
enum GateCmd {
    /// Adds a gate to an estate.
    Add {
        #[arg(long)]
        estate: String,
        #[arg(long)]
        name: String,
        /// in, out or both.
        #[arg(long, default_value = "both")]
        direction: String,
        /// Credential kinds the hardware reads: card,pin,qr,visitor,face.
        #[arg(long, value_delimiter = ',', default_value = "card,pin,qr")]
        kinds: Vec<String>,
    },
    /// Shows a gate.
    Get { id: String },
    /// Lists gates.
    List {
        #[arg(long)]
        estate: Option<String>,
        #[arg(long)]
        include_deactivated: bool,
    },
    /// Deactivates a gate.
    Deactivate { id: String },
    /// Decides as the gate would (manual test): operators name --gate; with
    /// a gate token, the gate decides for itself.
    Decide {
        #[arg(long, default_value = "")]
        gate: String,
        #[arg(long, conflicts_with_all = ["pin", "qr", "visitor"])]
        card: Option<String>,
        /// Facility code printed on the card, if any.
        #[arg(long, default_value = "")]
        facility: String,
        /// PIN entered at the unit given with --unit.
        #[arg(long, requires = "unit")]
        pin: Option<String>,
        #[arg(long, default_value = "")]
        unit: String,
        /// The QR payload "EM1.<id>.<code>".
        #[arg(long)]
        qr: Option<String>,
        #[arg(long)]
        visitor: Option<String>,
    },
    /// Fetches the gate's signed offline bundle (gate token), verifies it
    /// against the mesh's published keys and prints a summary; --out saves it.
    Bundle {
        #[arg(long)]
        out: Option<PathBuf>,
        /// Do not acknowledge the bundle (by default the gate applied it).
        #[arg(long)]
        no_ack: bool,
    },
    /// Gates of an estate: last seen, offline bundle issued and acknowledged,
    /// revoked credentials an acknowledged bundle still holds.
    Status {
        #[arg(long)]
        estate: String,
        /// Only gates still holding a revoked or suspended credential.
        #[arg(long)]
        stale: bool,
    },
    /// Shows a gate's rules.
    Rules { id: String },
    /// Sets a gate's rules (replaces them all).
    SetRules {
        id: String,
        /// Refuse a second entry without an exit (IN / OUT gates).
        #[arg(long)]
        anti_passback: bool,
        /// KIND=HH:MM-HH:MM, local time; repeat for several kinds.
        #[arg(long = "window")]
        windows: Vec<String>,
        /// Offline bundle lifetime in seconds (default 86400).
        #[arg(long, default_value_t = 0)]
        bundle_ttl: i64,
        /// Minutes east of UTC of the gate's clock (default 480, China).
        #[arg(long, allow_hyphen_values = true)]
        utc_offset: Option<i32>,
    },
}

#[derive(Debug, Subcommand)]
enum UnitCmd {
    /// Adds a unit to an estate.
    Add {
        #[arg(long)]
        estate: String,
        #[arg(long)]
        building: String,
        /// Entrance / stairwell (单元).
        #[arg(long, default_value = "")]
        unit: String,
        #[arg(long)]
        room: String,
    },
    /// Lists units.
    List {
        #[arg(long)]
        estate: Option<String>,
        #[arg(long)]
        include_deactivated: bool,
    },
    /// Deactivates a unit with no active residencies.
    Deactivate { id: String },
}

#[derive(Debug, Subcommand)]
enum PersonCmd {
    /// Adds a person.
    Add {
        #[arg(long)]
        name: String,
        /// Stored only as a keyed hash and its last four digits.
        #[arg(long, default_value = "")]
        phone: String,
        /// YYYY-MM-DD; under-14s are minors (guardian consent).
        #[arg(long, default_value = "")]
        birth_date: String,
        /// Person id of the guardian of a minor.
        #[arg(long, default_value = "")]
        guardian: String,
    },
    /// Shows a person.
    Get { id: String },
    /// Lists persons, or finds them by phone.
    List {
        #[arg(long, default_value = "")]
        phone: String,
        #[arg(long)]
        include_deactivated: bool,
    },
    /// Deactivates a person and ends their residencies.
    Deactivate { id: String },
}

#[derive(Debug, Subcommand)]
enum ResidencyCmd {
    /// Records that a person lives or works in a unit.
    Add {
        #[arg(long)]
        person: String,
        #[arg(long)]
        unit: String,
        /// owner, occupant, renter or staff.
        #[arg(long, default_value = "owner")]
        role: String,
    },
    /// Ends a residency (move-out); face data at the estate is then deleted.
    End {
        id: String,
        #[arg(long, default_value = "moved out")]
        reason: String,
    },
    /// Lists residencies.
    List {
        #[arg(long, default_value = "")]
        person: String,
        #[arg(long, default_value = "")]
        unit: String,
        #[arg(long, default_value = "")]
        estate: String,
        #[arg(long)]
        include_ended: bool,
    },
}

#[derive(Debug, Subcommand)]
enum NoticeCmd {
    /// Publishes a new notice version (immutable) for an estate.
    Publish {
        #[arg(long)]
        estate: String,
        /// File holding the Chinese text (required).
        #[arg(long)]
        zh_file: PathBuf,
        /// File holding the English text.
        #[arg(long)]
        en_file: Option<PathBuf>,
    },
    /// Shows the notice in effect, with the hash a grant must quote.
    Show {
        #[arg(long)]
        estate: String,
        /// zh-CN or en.
        #[arg(long, default_value = "zh-CN")]
        language: String,
    },
    /// Lists every version of an estate's notice.
    List {
        #[arg(long)]
        estate: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConsentCmd {
    /// Grants consent to face verification at one estate's gates (resident token).
    Grant {
        #[arg(long)]
        estate: String,
        /// The notice version shown (see `notice show`).
        #[arg(long)]
        notice_version: i64,
        /// SHA-256 of the notice text shown (see `notice show`).
        #[arg(long)]
        notice_sha256: String,
        /// A guardian names the minor here.
        #[arg(long, default_value = "")]
        person: String,
        /// Records a signed paper form, by the SHA-256 of its scan.
        #[arg(long)]
        paper_form_sha256: Option<String>,
        /// Your explicit affirmative act: without it nothing is granted.
        #[arg(long)]
        affirm: bool,
    },
    /// Withdraws a consent; face data at the estate is then deleted.
    Withdraw { id: String },
    /// Lists consents (a resident's own and their minors'; an operator's tenant).
    List {
        #[arg(long, default_value = "")]
        estate: String,
        #[arg(long, default_value = "")]
        person: String,
        /// Include withdrawn and ended consents.
        #[arg(long)]
        all: bool,
    },
    /// Issues a short-lived signed attestation of an active consent.
    Attest {
        id: String,
        #[arg(long, default_value_t = 0)]
        ttl: i64,
    },
    /// Persons with face consent against the filing threshold (R16).
    Filing,
    /// Face data deletion requests of an estate.
    Deletions {
        #[arg(long, default_value = "")]
        estate: String,
        #[arg(long)]
        pending: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AssessmentCmd {
    /// Records an impact assessment; the document is hashed, not uploaded.
    Record {
        #[arg(long)]
        estate: String,
        #[arg(long)]
        author: String,
        /// YYYY-MM-DD.
        #[arg(long)]
        date: String,
        /// The assessment document.
        #[arg(long)]
        document: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum FaceCmd {
    /// Enables face verification (needs a recorded impact assessment).
    Enable {
        #[arg(long)]
        estate: String,
    },
    /// Disables face verification.
    Disable {
        #[arg(long)]
        estate: String,
    },
    /// Shows whether face verification is enabled.
    Status {
        #[arg(long)]
        estate: String,
    },
    /// Enrols a face under a granted consent (an attestation is issued for
    /// it): an aligned face image (PNG / JPEG) or a template file (one number
    /// per line).
    Enrol {
        #[arg(long)]
        consent: String,
        #[arg(long, conflicts_with = "template")]
        image: Option<PathBuf>,
        #[arg(long)]
        template: Option<PathBuf>,
    },
    /// 1:N search of an estate's gallery with an aligned face image (test).
    Identify {
        #[arg(long)]
        estate: String,
        #[arg(long)]
        image: PathBuf,
    },
    /// Persons with templates in the tenant (R16).
    Count,
}

#[derive(Debug, Subcommand)]
enum DeletionCmd {
    /// Fetches the certificate of a fulfilled deletion request (the person or
    /// an operator) and saves it for offline verification.
    Show {
        /// The deletion request id (shown on the withdrawn consent).
        #[arg(long, required_unless_present = "consent", conflicts_with = "consent")]
        request: Option<String>,
        /// Or the withdrawn consent whose deletion it is.
        #[arg(long)]
        consent: Option<String>,
        /// Where to save the certificate (default: deletion-<request>.cert).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Asks for your face data at an estate to be deleted now (resident
    /// token; a guardian may name their ward with --person).
    Request {
        #[arg(long)]
        estate: String,
        #[arg(long, default_value = "")]
        person: String,
    },
    /// Prints the facematch certificate verifying keys as a key file.
    Keys,
    /// Verifies a saved certificate offline against a key file.
    Verify {
        certificate: PathBuf,
        /// Key file as printed by `meshctl deletion keys`.
        #[arg(long)]
        keys: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum CredentialCmd {
    /// Issues a credential; a QR secret or visitor code is printed once.
    Issue {
        /// card, pin, qr or visitor.
        kind: String,
        /// The holder (operators); residents issue visitor passes for themselves.
        #[arg(long, default_value = "")]
        person: String,
        /// Estates where it works (repeat or comma-separate).
        #[arg(long = "estate", value_delimiter = ',', required = true)]
        estates: Vec<String>,
        /// Card UID (for card).
        #[arg(long, default_value = "")]
        uid: String,
        /// PIN (for pin; read from ESTATE_PIN if unset, never echoed).
        #[arg(long, env = "ESTATE_PIN", hide_env_values = true, default_value = "")]
        pin: String,
        /// Unit the PIN is entered for (for pin).
        #[arg(long, default_value = "")]
        unit: String,
        /// Entries allowed (for visitor).
        #[arg(long, default_value_t = 1)]
        entries: i32,
        /// Hours the pass is valid (for visitor; at most 168).
        #[arg(long, default_value_t = 24)]
        hours: i64,
        #[arg(long, default_value = "")]
        label: String,
    },
    /// Lists credentials.
    List {
        #[arg(long, default_value = "")]
        person: String,
        #[arg(long, default_value = "")]
        estate: String,
        #[arg(long)]
        include_revoked: bool,
    },
    /// Suspends a credential (it stops working until reinstated).
    Suspend {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Reinstates a suspended credential.
    Reinstate {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Revokes a credential for good.
    Revoke {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum PolicyCmd {
    /// Sets the kinds an estate accepts; face alone is refused (R1).
    Set {
        #[arg(long)]
        estate: String,
        /// Accepted kinds: card,pin,qr,visitor,face.
        #[arg(long, value_delimiter = ',', required = true)]
        accept: Vec<String>,
        /// Kinds offered as alternatives to face: qr,pin,card.
        #[arg(long, value_delimiter = ',')]
        alternatives: Vec<String>,
    },
    /// Shows an estate's policy.
    Show {
        #[arg(long)]
        estate: String,
    },
}

#[derive(Debug, Subcommand)]
enum AlternativeCmd {
    /// Asks for a non-face way in (resident token); issued at once.
    Request {
        #[arg(long)]
        estate: String,
        /// qr (default), pin or card.
        #[arg(long, default_value = "qr")]
        kind: String,
        /// The PIN you choose (for pin; else one is generated).
        #[arg(long, env = "ESTATE_PIN", hide_env_values = true, default_value = "")]
        pin: String,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCmd {
    /// Prints the audit verifying keys ("key_id public_key_hex"), for `audit verify --keys`.
    Keys,
    /// Lists entries of the caller's tenant (operators).
    Entries {
        #[arg(long, default_value = "")]
        estate: String,
        #[arg(long, default_value = "")]
        person: String,
        #[arg(long, default_value = "")]
        action: String,
    },
    /// Writes a signed export bundle (regulator token).
    Export {
        #[arg(long)]
        tenant: String,
        #[arg(long, default_value = "")]
        estate: String,
        /// Tree size of your previous export, to prove the log only grew.
        #[arg(long, default_value_t = 0)]
        previous_size: i64,
        /// Bundle file to write (JSON Lines).
        #[arg(long)]
        out: PathBuf,
    },
    /// Verifies a bundle offline with the published key; needs no server.
    Verify {
        bundle: PathBuf,
        /// Key file as printed by `meshctl audit keys`.
        #[arg(long)]
        keys: PathBuf,
        /// The previous bundle, to check the log only grew since.
        #[arg(long)]
        previous: Option<PathBuf>,
    },
    /// Every processing of your own data (resident token), optionally as a file.
    Report {
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
struct TokenCommon {
    /// Who will hold the token: a staff login or device label.
    #[arg(long)]
    subject: String,
    /// Lifetime in seconds (default: the server's, 24 h).
    #[arg(long, default_value_t = 0)]
    ttl: i64,
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Issues a scoped token.
    #[command(subcommand)]
    Issue(IssueCmd),
}

#[derive(Debug, Subcommand)]
enum IssueCmd {
    /// For staff of a tenant, optionally limited to some estates.
    Operator {
        /// Tenant id (platform admin only; operators issue for their own).
        #[arg(long, default_value = "")]
        tenant: String,
        /// Limit to these estates (repeat or comma-separate).
        #[arg(long = "estate", value_delimiter = ',')]
        estates: Vec<String>,
        #[command(flatten)]
        common: TokenCommon,
    },
    /// For a gate controller.
    Gate {
        #[arg(long)]
        gate: String,
        #[command(flatten)]
        common: TokenCommon,
    },
    /// For a resident's app.
    Resident {
        #[arg(long)]
        person: String,
        #[command(flatten)]
        common: TokenCommon,
    },
    /// For a regulator (platform admin only).
    Regulator {
        #[arg(long = "jurisdiction", value_delimiter = ',', required = true)]
        jurisdictions: Vec<String>,
        #[command(flatten)]
        common: TokenCommon,
    },
    /// For a mesh service, e.g. an outbox relay shipping to audit (platform admin only).
    Service {
        #[arg(long)]
        name: String,
        #[command(flatten)]
        common: TokenCommon,
    },
    /// Another platform admin token (platform admin only).
    Admin {
        #[command(flatten)]
        common: TokenCommon,
    },
}

#[derive(Debug, Clone)]
struct Bearer(Option<AsciiMetadataValue>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Client = IdentityServiceClient<InterceptedService<Channel, Bearer>>;
type Consents = ConsentServiceClient<InterceptedService<Channel, Bearer>>;
type Credentials = CredentialServiceClient<InterceptedService<Channel, Bearer>>;

fn file_sha256(path: &std::path::Path) -> anyhow::Result<String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex::encode(sha2::Sha256::digest(&bytes)))
}

fn read_text(path: &std::path::Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {} as UTF-8 text", path.display()))
}

fn kind(name: &str) -> anyhow::Result<i32> {
    Ok(match name.trim() {
        "card" => CredentialKind::Card,
        "pin" => CredentialKind::Pin,
        "qr" => CredentialKind::Qr,
        "visitor" => CredentialKind::Visitor,
        "face" => CredentialKind::Face,
        other => bail!("unknown credential kind {other:?}; use card, pin, qr, visitor or face"),
    } as i32)
}

fn direction(name: &str) -> anyhow::Result<i32> {
    Ok(match name {
        "in" => GateDirection::In,
        "out" => GateDirection::Out,
        "both" => GateDirection::Both,
        other => bail!("unknown direction {other:?}; use in, out or both"),
    } as i32)
}

fn role(name: &str) -> anyhow::Result<i32> {
    Ok(match name {
        "owner" => ResidencyRole::Owner,
        "occupant" => ResidencyRole::Occupant,
        "renter" => ResidencyRole::Renter,
        "staff" => ResidencyRole::Staff,
        other => bail!("unknown role {other:?}; use owner, occupant, renter or staff"),
    } as i32)
}

/// `audit verify` returns before any connection is made.
fn unreachable_verify() -> String {
    String::new()
}

type Audits = AuditServiceClient<InterceptedService<Channel, Bearer>>;
type Gates = GateServiceClient<InterceptedService<Channel, Bearer>>;

/// The caller's token from `--token` or `--token-file`.
fn bearer_of(cli: &Cli) -> anyhow::Result<Bearer> {
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => Some(t.trim().to_owned()),
        (None, Some(path)) => Some(
            std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?.trim().to_owned(),
        ),
        (None, None) => None,
    };
    Ok(Bearer(match token {
        Some(t) => Some(AsciiMetadataValue::try_from(format!("Bearer {t}")).context("the token is not valid text")?),
        None => None,
    }))
}

async fn connect(cli: &Cli) -> anyhow::Result<(Client, Consents, Credentials, Audits, Gates)> {
    let bearer = bearer_of(cli)?;
    let channel = Channel::from_shared(cli.endpoint.clone())
        .with_context(|| format!("{} is not a valid endpoint", cli.endpoint))?
        .connect()
        .await
        .with_context(|| format!("cannot reach the mesh at {}", cli.endpoint))?;
    Ok((
        IdentityServiceClient::with_interceptor(channel.clone(), bearer.clone()),
        ConsentServiceClient::with_interceptor(channel.clone(), bearer.clone()),
        CredentialServiceClient::with_interceptor(channel.clone(), bearer.clone()),
        AuditServiceClient::with_interceptor(channel.clone(), bearer.clone()),
        GateServiceClient::with_interceptor(channel, bearer),
    ))
}

/// Calls a list RPC page by page until the end.
macro_rules! all_pages {
    ($client:expr, $method:ident, $req:expr, $field:ident) => {{
        let mut req = $req;
        req.page_size = 500;
        let mut out = Vec::new();
        loop {
            let page = $client.$method(req.clone()).await?.into_inner();
            out.extend(page.$field);
            if page.next_page_token.is_empty() {
                break;
            }
            req.page_token = page.next_page_token;
        }
        out
    }};
}

fn verify_bundle(
    bundle: &std::path::Path,
    keys: &std::path::Path,
    previous: Option<&std::path::Path>,
) -> anyhow::Result<String> {
    let open = |p: &std::path::Path| -> anyhow::Result<estate_audit_bundle::Bundle> {
        let f = std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
        Ok(estate_audit_bundle::Bundle::read(std::io::BufReader::new(f))?)
    };
    let keys = estate_audit_bundle::parse_keys(&read_text(keys)?).map_err(anyhow::Error::msg)?;
    let prev = previous.map(open).transpose()?;
    let v = open(bundle)?.verify(&keys, prev.as_ref())?;
    Ok(format!(
        "OK: {} entries of tenant {} are in the signed log of {} entries (root {}){}",
        v.entries,
        v.tenant_id,
        v.tree_size,
        v.root_hash,
        if v.consistency_checked { "; the log only grew since the previous export" } else { "" }
    ))
}

/// "visitor=08:00-20:00" as a time window.
fn time_window(text: &str) -> anyhow::Result<estate_proto::gate::TimeWindow> {
    let parse = |hm: &str| -> anyhow::Result<i32> {
        let (h, m) = hm.split_once(':').context("times are HH:MM")?;
        let (h, m): (i32, i32) = (h.parse()?, m.parse()?);
        anyhow::ensure!((0..24).contains(&h) && (0..60).contains(&m), "times are HH:MM, 00:00 to 23:59");
        Ok(h * 60 + m)
    };
    let (k, range) = text.split_once('=').context("a window is KIND=HH:MM-HH:MM")?;
    let (start, end) = range.split_once('-').context("a window is KIND=HH:MM-HH:MM")?;
    Ok(estate_proto::gate::TimeWindow { kind: kind(k)?, start_minute: parse(start)?, end_minute: parse(end)? })
}

/// `gate bundle`: fetch, verify against the published keys, acknowledge,
/// summarise.
async fn gate_bundle(g: &mut Gates, out: Option<&std::path::Path>, ack: bool, o: Output) -> anyhow::Result<String> {
    use estate_proto::gate::*;
    use prost::Message;
    let keys = g.get_bundle_keys(GetBundleKeysRequest {}).await?.into_inner();
    let bundle = g.get_offline_bundle(GetOfflineBundleRequest {}).await?.into_inner();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis();
    let contents = estate_gate_sdk::bundle::verify(
        &bundle,
        &estate_gate_sdk::TrustedKeys::from_proto(&keys),
        None,
        i64::try_from(now)?,
    )?;
    if let Some(path) = out {
        std::fs::write(path, bundle.encode_to_vec()).with_context(|| format!("cannot write {}", path.display()))?;
    }
    if ack {
        g.ack_bundle(AckBundleRequest { version: contents.version }).await?;
    }
    Ok(one(&render::BundleSummary { contents, key_id: bundle.key_id, acknowledged: ack }, o))
}

/// A facematch client on the mesh endpoint (the embedded facematch shares
/// the mesh's port).
async fn facematch(
    endpoint: &str,
    bearer: &Bearer,
) -> anyhow::Result<
    estate_proto::facematch::facematch_service_client::FacematchServiceClient<InterceptedService<Channel, Bearer>>,
> {
    let channel = Channel::from_shared(endpoint.to_owned())?
        .connect()
        .await
        .with_context(|| format!("cannot reach facematch at {endpoint}"))?;
    Ok(estate_proto::facematch::facematch_service_client::FacematchServiceClient::with_interceptor(
        channel,
        bearer.clone(),
    ))
}

fn read_bytes(p: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
}

/// A template file: numbers separated by whitespace or commas.
fn read_template(p: &std::path::Path) -> anyhow::Result<Vec<f32>> {
    read_text(p)?
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
        .map(|t| t.parse::<f32>().with_context(|| format!("{} holds {t:?}, not a number", p.display())))
        .collect()
}

/// `deletion verify`: offline, against a key file.
fn verify_certificate(certificate: &std::path::Path, keys: &std::path::Path, o: Output) -> anyhow::Result<String> {
    let bytes = read_bytes(certificate)?;
    let cert = <estate_proto::facematch::DeletionCertificate as prost::Message>::decode(bytes.as_slice())
        .with_context(|| format!("{} is not a deletion certificate", certificate.display()))?;
    let keys = estate_facematch::parse_key_list(&read_text(keys)?).map_err(anyhow::Error::msg)?;
    let body = estate_facematch::certificate::verify(&cert, &estate_attestation::KeySet::new(keys))?;
    Ok(format!("OK: signature verified by key {}\n{}", cert.key_id, one(&render::Certificate(body), o)))
}

async fn run(cli: Cli) -> anyhow::Result<String> {
    if let Command::Audit(AuditCmd::Verify { bundle, keys, previous }) = &cli.command {
        return verify_bundle(bundle, keys, previous.as_deref());
    }
    if let Command::Deletion(DeletionCmd::Verify { certificate, keys }) = &cli.command {
        return verify_certificate(certificate, keys, cli.output);
    }
    let (mut c, mut k, mut cr, mut a, mut g) = connect(&cli).await?;
    let cli_endpoint = cli.endpoint.clone();
    let cli_bearer = bearer_of(&cli)?;
    let o = cli.output;
    Ok(match cli.command {
        Command::Tenant(cmd) => match cmd {
            TenantCmd::Create { name, jurisdiction } => one(
                &c.create_tenant(CreateTenantRequest { name, jurisdiction_code: jurisdiction }).await?.into_inner(),
                o,
            ),
            TenantCmd::Get { id } => {
                one(&c.get_tenant(GetTenantRequest { id: id.unwrap_or_default() }).await?.into_inner(), o)
            }
            TenantCmd::List { include_deactivated } => many(
                &all_pages!(c, list_tenants, ListTenantsRequest { include_deactivated, ..Default::default() }, tenants),
                o,
            ),
            TenantCmd::Deactivate { id } => {
                one(&c.deactivate_tenant(DeactivateTenantRequest { id }).await?.into_inner(), o)
            }
        },
        Command::Estate(cmd) => match cmd {
            EstateCmd::Create { name, address, jurisdiction } => one(
                &c.create_estate(CreateEstateRequest { name, address, jurisdiction_code: jurisdiction })
                    .await?
                    .into_inner(),
                o,
            ),
            EstateCmd::Get { id } => one(&c.get_estate(GetEstateRequest { id }).await?.into_inner(), o),
            EstateCmd::List { include_deactivated } => many(
                &all_pages!(c, list_estates, ListEstatesRequest { include_deactivated, ..Default::default() }, estates),
                o,
            ),
            EstateCmd::Deactivate { id } => {
                one(&c.deactivate_estate(DeactivateEstateRequest { id }).await?.into_inner(), o)
            }
        },
        Command::Gate(cmd) => match cmd {
            GateCmd::Add { estate, name, direction: d, kinds } => {
                let supported_kinds = kinds.iter().map(|k| kind(k)).collect::<anyhow::Result<Vec<_>>>()?;
                let req = CreateGateRequest { estate_id: estate, name, direction: direction(&d)?, supported_kinds };
                one(&c.create_gate(req).await?.into_inner(), o)
            }
            GateCmd::Get { id } => one(&c.get_gate(GetGateRequest { id }).await?.into_inner(), o),
            GateCmd::List { estate, include_deactivated } => {
                let req = ListGatesRequest {
                    estate_id: estate.unwrap_or_default(),
                    include_deactivated,
                    ..Default::default()
                };
                many(&all_pages!(c, list_gates, req, gates), o)
            }
            GateCmd::Deactivate { id } => one(&c.deactivate_gate(DeactivateGateRequest { id }).await?.into_inner(), o),
            GateCmd::Decide { gate, card, facility, pin, unit, qr, visitor } => {
                use estate_proto::gate::decide_request::Presented;
                let presented = match (card, pin, qr, visitor) {
                    (Some(uid), ..) => Presented::Card(PresentedCard { uid, facility_code: facility }),
                    (_, Some(pin), ..) => Presented::Pin(PresentedPin { unit_id: unit, pin }),
                    (_, _, Some(payload), _) => Presented::Qr(PresentedQr { payload }),
                    (_, _, _, Some(code)) => Presented::Visitor(PresentedVisitor { code }),
                    _ => bail!("present one of --card, --pin (with --unit), --qr or --visitor"),
                };
                let req = estate_proto::gate::DecideRequest { presented: Some(presented), gate_id: gate };
                one(&g.decide(req).await?.into_inner(), o)
            }
            GateCmd::Bundle { out, no_ack } => gate_bundle(&mut g, out.as_deref(), !no_ack, o).await?,
            GateCmd::Status { estate, stale } => {
                let req = estate_proto::gate::ListGateStatusRequest { estate_id: estate, only_stale: stale };
                many(&g.list_gate_status(req).await?.into_inner().gates, o)
            }
            GateCmd::Rules { id } => {
                one(&g.get_gate_rules(estate_proto::gate::GetGateRulesRequest { gate_id: id }).await?.into_inner(), o)
            }
            GateCmd::SetRules { id, anti_passback, windows, bundle_ttl, utc_offset } => {
                let req = estate_proto::gate::SetGateRulesRequest {
                    gate_id: id,
                    anti_passback,
                    windows: windows.iter().map(|w| time_window(w)).collect::<anyhow::Result<Vec<_>>>()?,
                    bundle_ttl_secs: bundle_ttl,
                    utc_offset_minutes: utc_offset,
                };
                one(&g.set_gate_rules(req).await?.into_inner(), o)
            }
        },
        Command::Unit(cmd) => match cmd {
            UnitCmd::Add { estate, building, unit, room } => one(
                &c.create_unit(CreateUnitRequest { estate_id: estate, building, unit, room }).await?.into_inner(),
                o,
            ),
            UnitCmd::List { estate, include_deactivated } => {
                let req = ListUnitsRequest {
                    estate_id: estate.unwrap_or_default(),
                    include_deactivated,
                    ..Default::default()
                };
                many(&all_pages!(c, list_units, req, units), o)
            }
            UnitCmd::Deactivate { id } => one(&c.deactivate_unit(DeactivateUnitRequest { id }).await?.into_inner(), o),
        },
        Command::Person(cmd) => match cmd {
            PersonCmd::Add { name, phone, birth_date, guardian } => {
                let req = CreatePersonRequest { display_name: name, phone, birth_date, guardian_person_id: guardian };
                one(&c.create_person(req).await?.into_inner(), o)
            }
            PersonCmd::Get { id } => one(&c.get_person(GetPersonRequest { id }).await?.into_inner(), o),
            PersonCmd::List { phone, include_deactivated } => many(
                &all_pages!(
                    c,
                    list_persons,
                    ListPersonsRequest { phone, include_deactivated, ..Default::default() },
                    persons
                ),
                o,
            ),
            PersonCmd::Deactivate { id } => {
                one(&c.deactivate_person(DeactivatePersonRequest { id }).await?.into_inner(), o)
            }
        },
        Command::Residency(cmd) => match cmd {
            ResidencyCmd::Add { person, unit, role: r } => {
                let req = CreateResidencyRequest {
                    person_id: person,
                    unit_id: unit,
                    role: role(&r)?,
                    valid_from: None,
                    valid_until: None,
                };
                one(&c.create_residency(req).await?.into_inner(), o)
            }
            ResidencyCmd::End { id, reason } => {
                one(&c.end_residency(EndResidencyRequest { id, reason }).await?.into_inner(), o)
            }
            ResidencyCmd::List { person, unit, estate, include_ended } => {
                let req = ListResidenciesRequest {
                    person_id: person,
                    unit_id: unit,
                    estate_id: estate,
                    include_ended,
                    ..Default::default()
                };
                many(&all_pages!(c, list_residencies, req, residencies), o)
            }
        },
        Command::Token(TokenCmd::Issue(cmd)) => {
            use issue_token_request::Principal as P;
            let (principal, common) = match cmd {
                IssueCmd::Operator { tenant, estates, common } => {
                    (P::Operator(OperatorGrant { tenant_id: tenant, estate_ids: estates }), common)
                }
                IssueCmd::Gate { gate, common } => (P::Gate(GateGrant { gate_id: gate }), common),
                IssueCmd::Resident { person, common } => (P::Resident(ResidentGrant { person_id: person }), common),
                IssueCmd::Regulator { jurisdictions, common } => {
                    (P::Regulator(RegulatorGrant { jurisdiction_codes: jurisdictions }), common)
                }
                IssueCmd::Admin { common } => (P::PlatformAdmin(PlatformAdminGrant {}), common),
                IssueCmd::Service { name, common } => (P::Service(ServiceGrant { name }), common),
            };
            let req =
                IssueTokenRequest { principal: Some(principal), subject: common.subject, ttl_seconds: common.ttl };
            one(&c.issue_token(req).await?.into_inner(), o)
        }
        Command::Whoami => one(&c.who_am_i(WhoAmIRequest {}).await?.into_inner(), o),
        Command::Notice(cmd) => match cmd {
            NoticeCmd::Publish { estate, zh_file, en_file } => {
                let text_en = match en_file {
                    Some(p) => read_text(&p)?,
                    None => String::new(),
                };
                let req = PublishNoticeRequest {
                    estate_id: estate,
                    text_zh_cn: read_text(&zh_file)?,
                    text_en,
                    effective_from: None,
                };
                one(&k.publish_notice(req).await?.into_inner(), o)
            }
            NoticeCmd::Show { estate, language } => one(
                &k.get_current_notice(GetCurrentNoticeRequest { estate_id: estate, language }).await?.into_inner(),
                o,
            ),
            NoticeCmd::List { estate } => {
                many(&k.list_notices(ListNoticesRequest { estate_id: estate }).await?.into_inner().notices, o)
            }
        },
        Command::Consent(cmd) => match cmd {
            ConsentCmd::Grant { estate, notice_version, notice_sha256, person, paper_form_sha256, affirm } => {
                if !affirm {
                    bail!("consent is your own explicit act: add --affirm to grant it");
                }
                let (method, scan) = match paper_form_sha256 {
                    Some(h) => (ConsentMethod::SignedPaperForm, h),
                    None => (ConsentMethod::AppTap, String::new()),
                };
                let req = GrantConsentRequest {
                    estate_id: estate,
                    person_id: person,
                    purposes: vec![Purpose::FaceVerificationAtGates as i32],
                    notice_version,
                    notice_text_sha256: notice_sha256,
                    affirmative_act: true,
                    bundled_agreement_ids: vec![],
                    method: method as i32,
                    paper_form_scan_sha256: scan,
                };
                one(&k.grant_consent(req).await?.into_inner(), o)
            }
            ConsentCmd::Withdraw { id } => {
                one(&k.withdraw_consent(WithdrawConsentRequest { consent_id: id }).await?.into_inner(), o)
            }
            ConsentCmd::List { estate, person, all } => {
                let req = ListConsentsRequest {
                    estate_id: estate,
                    person_id: person,
                    include_inactive: all,
                    ..Default::default()
                };
                many(&all_pages!(k, list_consents, req, consents), o)
            }
            ConsentCmd::Attest { id, ttl } => one(
                &k.issue_attestation(IssueAttestationRequest { consent_id: id, ttl_seconds: ttl }).await?.into_inner(),
                o,
            ),
            ConsentCmd::Filing => one(&k.get_filing_status(GetFilingStatusRequest {}).await?.into_inner(), o),
            ConsentCmd::Deletions { estate, pending } => {
                let req = ListDeletionRequestsRequest { estate_id: estate, pending_only: pending };
                many(&k.list_deletion_requests(req).await?.into_inner().requests, o)
            }
        },
        Command::Credential(cmd) => match cmd {
            CredentialCmd::Issue { kind: which, person, estates, uid, pin, unit, entries, hours, label } => {
                use estate_proto::credentials::issue_credential_request::Secret;
                let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() as i64;
                let mut valid_until = None;
                let secret = match which.as_str() {
                    "card" => Secret::Card(CardSecret { uid, facility_code: String::new() }),
                    "pin" => Secret::Pin(PinSecret { pin, unit_id: unit }),
                    "qr" => Secret::Qr(QrSecret {}),
                    "visitor" => {
                        valid_until = Some(prost_types::Timestamp { seconds: now + hours * 3600, nanos: 0 });
                        Secret::Visitor(VisitorPass { max_entries: entries })
                    }
                    other => bail!("unknown credential kind {other:?}; use card, pin, qr or visitor"),
                };
                let req = IssueCredentialRequest {
                    person_id: person,
                    estate_ids: estates,
                    valid_from: None,
                    valid_until,
                    label,
                    secret: Some(secret),
                };
                let issued = cr.issue_credential(req).await?.into_inner();
                match (o, issued.credential.as_ref()) {
                    (Output::Id, Some(c)) => c.id.clone(),
                    _ => one(&issued, o),
                }
            }
            CredentialCmd::List { person, estate, include_revoked } => {
                let req = ListCredentialsRequest {
                    person_id: person,
                    estate_id: estate,
                    include_revoked,
                    ..Default::default()
                };
                many(&all_pages!(cr, list_credentials, req, credentials), o)
            }
            CredentialCmd::Suspend { id, reason } => {
                one(&cr.suspend_credential(ChangeCredentialRequest { id, reason }).await?.into_inner(), o)
            }
            CredentialCmd::Reinstate { id, reason } => {
                one(&cr.reinstate_credential(ChangeCredentialRequest { id, reason }).await?.into_inner(), o)
            }
            CredentialCmd::Revoke { id, reason } => {
                one(&cr.revoke_credential(ChangeCredentialRequest { id, reason }).await?.into_inner(), o)
            }
        },
        Command::Policy(cmd) => match cmd {
            PolicyCmd::Set { estate, accept, alternatives } => {
                let req = SetEstatePolicyRequest {
                    estate_id: estate,
                    accepted_kinds: accept.iter().map(|k| kind(k)).collect::<anyhow::Result<_>>()?,
                    alternative_kinds: alternatives.iter().map(|k| kind(k)).collect::<anyhow::Result<_>>()?,
                };
                one(&cr.set_estate_policy(req).await?.into_inner(), o)
            }
            PolicyCmd::Show { estate } => {
                one(&cr.get_estate_policy(GetEstatePolicyRequest { estate_id: estate }).await?.into_inner(), o)
            }
        },
        Command::Alternative(AlternativeCmd::Request { estate, kind: which, pin }) => {
            let req = RequestAlternativeRequest {
                estate_id: estate,
                preferred_kind: kind(&which)?,
                pin,
                unit_id: String::new(),
            };
            one(&cr.request_alternative(req).await?.into_inner(), o)
        }
        Command::Audit(cmd) => match cmd {
            AuditCmd::Keys => {
                let keys = a.get_verifying_keys(GetAuditKeysRequest {}).await?.into_inner();
                keys.keys
                    .iter()
                    .map(|k| estate_crypto::key_list::line(&k.key_id, &k.public_key))
                    .collect::<Vec<_>>()
                    .join("\n")
            }
            AuditCmd::Entries { estate, person, action } => {
                let req =
                    QueryEntriesRequest { estate_id: estate, person_pseudonym: person, action, ..Default::default() };
                many(&all_pages!(a, query_entries, req, entries), o)
            }
            AuditCmd::Export { tenant, estate, previous_size, out } => {
                let req = ExportRequest {
                    tenant_id: tenant,
                    estate_id: estate,
                    previous_tree_size: previous_size,
                    ..Default::default()
                };
                let mut stream = a.export(req).await?.into_inner();
                let mut file = std::io::BufWriter::new(
                    std::fs::File::create(&out).with_context(|| format!("cannot create {}", out.display()))?,
                );
                let mut entries = 0;
                let mut size = 0;
                while let Some(rec) = stream.message().await? {
                    match &rec.record {
                        Some(export_record::Record::Entry(_)) => entries += 1,
                        Some(export_record::Record::Manifest(m)) => size = m.tree_size,
                        _ => {}
                    }
                    estate_audit_bundle::write_record(&mut file, &rec)?;
                }
                std::io::Write::flush(&mut file)?;
                format!("wrote {entries} entries (log size {size}) to {}", out.display())
            }
            AuditCmd::Report { out } => {
                let report = a.access_report(AccessReportRequest {}).await?.into_inner();
                let text = many(&report.lines, o);
                match out {
                    Some(path) => {
                        std::fs::write(&path, format!("{text}\n"))
                            .with_context(|| format!("cannot write {}", path.display()))?;
                        format!(
                            "wrote {} lines about {} to {}",
                            report.lines.len(),
                            report.person_pseudonym,
                            path.display()
                        )
                    }
                    None => text,
                }
            }
            AuditCmd::Verify { .. } => unreachable_verify(),
        },
        Command::Verify { estate, card, pin, unit, qr, visitor } => {
            use estate_proto::credentials::verify_credential_request::Presented;
            let presented = match (card, pin, qr, visitor) {
                (Some(uid), ..) => Presented::Card(PresentedCard { uid, facility_code: String::new() }),
                (_, Some(pin), ..) => Presented::Pin(PresentedPin { unit_id: unit, pin }),
                (_, _, Some(payload), _) => Presented::Qr(PresentedQr { payload }),
                (_, _, _, Some(code)) => Presented::Visitor(PresentedVisitor { code }),
                _ => bail!("present one of --card, --pin (with --unit), --qr or --visitor"),
            };
            one(
                &cr.verify_credential(VerifyCredentialRequest { estate_id: estate, presented: Some(presented) })
                    .await?
                    .into_inner(),
                o,
            )
        }
        Command::Assessment(AssessmentCmd::Record { estate, author, date, document }) => {
            let req = RecordImpactAssessmentRequest {
                estate_id: estate,
                author,
                assessed_on: date,
                document_sha256: file_sha256(&document)?,
            };
            one(&k.record_impact_assessment(req).await?.into_inner(), o)
        }
        Command::Face(cmd) => match cmd {
            FaceCmd::Enable { estate } => one(
                &k.set_face_verification(SetFaceVerificationRequest { estate_id: estate, enabled: true })
                    .await?
                    .into_inner(),
                o,
            ),
            FaceCmd::Disable { estate } => one(
                &k.set_face_verification(SetFaceVerificationRequest { estate_id: estate, enabled: false })
                    .await?
                    .into_inner(),
                o,
            ),
            FaceCmd::Status { estate } => {
                one(&k.get_face_verification(GetFaceVerificationRequest { estate_id: estate }).await?.into_inner(), o)
            }
            FaceCmd::Enrol { consent, image, template } => {
                use estate_proto::facematch::{EnrolRequest, FaceSample};
                let face = match (image, template) {
                    (Some(p), None) => FaceSample { template: Vec::new(), image: read_bytes(&p)? },
                    (None, Some(p)) => FaceSample { template: read_template(&p)?, image: Vec::new() },
                    _ => anyhow::bail!("give --image or --template"),
                };
                let att = k
                    .issue_attestation(IssueAttestationRequest { consent_id: consent, ttl_seconds: 0 })
                    .await?
                    .into_inner();
                let claims = att.decoded.clone().context("the attestation carries no decoded claims")?;
                let done = facematch(&cli_endpoint, &cli_bearer)
                    .await?
                    .enrol(EnrolRequest {
                        estate_id: claims.estate_id,
                        person_pseudonym: claims.person_pseudonym,
                        attestation: Some(att),
                        face: Some(face),
                        request_id: String::new(),
                    })
                    .await?
                    .into_inner();
                format!(
                    "enrolled template {} (data key {}); {} template(s) for this person here",
                    done.template_id, done.key_id, done.templates
                )
            }
            FaceCmd::Identify { estate, image } => {
                use estate_proto::facematch::{FaceSample, IdentifyRequest};
                let m = facematch(&cli_endpoint, &cli_bearer)
                    .await?
                    .identify(IdentifyRequest {
                        estate_id: estate,
                        probe: Some(FaceSample { template: Vec::new(), image: read_bytes(&image)? }),
                    })
                    .await?
                    .into_inner();
                if m.matched {
                    format!("match: {} (score {:.3}, threshold {:.2})", m.person_pseudonym, m.score, m.threshold)
                } else {
                    format!("no match (best score {:.3}, threshold {:.2})", m.score, m.threshold)
                }
            }
            FaceCmd::Count => {
                let c = facematch(&cli_endpoint, &cli_bearer)
                    .await?
                    .count_persons(estate_proto::facematch::CountPersonsRequest {})
                    .await?
                    .into_inner();
                format!("tenant {}: {} person(s) with {} template(s)", c.tenant_id, c.persons, c.templates)
            }
        },
        Command::Deletion(cmd) => match cmd {
            DeletionCmd::Show { request, consent, out } => {
                let request = match (request, consent) {
                    (Some(r), _) => r,
                    (None, Some(c)) => {
                        let consent = k.get_consent(GetConsentRequest { id: c }).await?.into_inner();
                        anyhow::ensure!(
                            !consent.deletion_request_id.is_empty(),
                            "that consent has no deletion request (it is still active)"
                        );
                        consent.deletion_request_id
                    }
                    (None, None) => anyhow::bail!("give --request or --consent"),
                };
                // A deletion is handed to facematch within seconds; wait for it.
                let mut attempt = 0;
                let stored = loop {
                    let req = GetDeletionCertificateRequest { deletion_request_id: request.clone() };
                    match k.get_deletion_certificate(req).await {
                        Ok(s) => break s.into_inner(),
                        Err(s) if s.code() == tonic::Code::FailedPrecondition && attempt < 40 => {
                            attempt += 1;
                            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                        }
                        Err(s) => return Err(s.into()),
                    }
                };
                let path = out.unwrap_or_else(|| PathBuf::from(format!("deletion-{request}.cert")));
                std::fs::write(&path, &stored.certificate)
                    .with_context(|| format!("cannot write {}", path.display()))?;
                let cert = <estate_proto::facematch::DeletionCertificate as prost::Message>::decode(
                    stored.certificate.as_slice(),
                )?;
                let body = <estate_proto::facematch::CertificateBody as prost::Message>::decode(cert.body.as_slice())?;
                format!(
                    "{}\nsaved to {} (verify with `meshctl deletion verify`)",
                    one(&render::Certificate(body), o),
                    path.display()
                )
            }
            DeletionCmd::Request { estate, person } => {
                let r = k
                    .request_face_deletion(RequestFaceDeletionRequest { estate_id: estate, person_id: person })
                    .await?
                    .into_inner();
                format!(
                    "deletion requested: {} (fetch the certificate with `meshctl deletion show --request {}`)",
                    r.id, r.id
                )
            }
            DeletionCmd::Keys => {
                let keys = facematch(&cli_endpoint, &cli_bearer)
                    .await?
                    .get_certificate_keys(estate_proto::facematch::GetCertificateKeysRequest {})
                    .await?
                    .into_inner();
                estate_facematch::format_key_list(&keys).trim_end().to_owned()
            }
            DeletionCmd::Verify { .. } => unreachable_verify(),
        },
    })
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(text) => {
            println!("{text}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(status) => eprintln!("error: {:?}: {}", status.code(), status.message()),
                None => eprintln!("error: {e:#}"),
            }
            std::process::ExitCode::FAILURE
        }
    }
}
