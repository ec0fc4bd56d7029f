//! The `estate.identity.v1.IdentityService` implementation.
//!
//! Tenant scope (R14): every query is bounded by the tenant of the caller's
//! token. Objects of another tenant are simply not found, so a caller cannot
//! tell them from objects that do not exist. Scope checks that depend only on
//! the token (an estate-limited operator asking for another estate) answer
//! PERMISSION_DENIED before any lookup.
//!
//! Every state change writes exactly one audit event to the outbox in the same
//! transaction (R11); residents appear in events by pseudonym only (R17).

use crate::audit::PLATFORM_TENANT;
use crate::model::*;
use estate_auth::{Caller, Principal, TokenAuthority, caller};
use estate_bus::EventBus;
use estate_core::{
    BirthDate, Error, JurisdictionCode, Result, bounded_text, new_id, normalise_phone, now_ms, parse_id, required_text,
};
use estate_crypto::KeyedHasher;
use estate_proto::common::{ActorKind, CredentialKind};
use estate_proto::identity::identity_service_server::IdentityService;
use estate_proto::identity::*;
use estate_store::filter::{Filter, fetch_page};
use estate_store::outbox::Change;
use estate_store::page::Page;
use estate_store::{Db, db_error, is_unique_violation, outbox};
use prost::Message;
use sqlx::{Any, AnyConnection};
use tonic::{Request, Response, Status};

/// Name of this service in audit events.
const SOURCE: &str = "identity";

/// Bus topic of [`ResidencyEnded`] events.
pub const RESIDENCY_ENDED_TOPIC: &str = "identity.residency.ended";

const TENANT_COLS: &str = "id, name, jurisdiction_code, status, created_at, updated_at";
const ESTATE_COLS: &str = "tenant_id, id, name, address, jurisdiction_code, status, created_at, updated_at";
const GATE_COLS: &str = "tenant_id, id, estate_id, name, direction, supported_kinds, status, created_at, updated_at";
const UNIT_COLS: &str = "tenant_id, id, estate_id, building, entrance, room, status, created_at, updated_at";
const PERSON_COLS: &str = "tenant_id, id, display_name, phone_hash, phone_last4, birth_date, guardian_person_id, \
                           pseudonym, status, created_at, updated_at";
const RESIDENCY_COLS: &str = "tenant_id, id, person_id, unit_id, estate_id, role, valid_from, valid_until, status, \
                              end_reason, created_at, updated_at";

const NAME_MAX: usize = 200;
const ADDRESS_MAX: usize = 500;
const SUBJECT_MAX: usize = 128;
const ADULT_AGE_YEARS: i32 = 18;

/// Settings the identity service needs beyond its dependencies.
#[derive(Debug, Clone)]
pub struct IdentityOptions {
    /// Largest page a list call returns.
    pub max_page_size: u32,
    /// Lifetime of an issued token when the request names none.
    pub default_token_ttl_secs: u64,
}

/// The identity service.
#[derive(Debug, Clone)]
pub struct Identity {
    db: Db,
    hasher: KeyedHasher,
    tokens: TokenAuthority,
    bus: EventBus,
    options: IdentityOptions,
}

type Tx = estate_store::WriteTx;

fn unique_or(message: &'static str) -> impl Fn(sqlx::Error) -> Error {
    move |e| if is_unique_violation(&e) { Error::AlreadyExists(message.to_owned()) } else { db_error(e) }
}

fn jurisdiction(field: &'static str, value: &str) -> Result<String> {
    Ok(JurisdictionCode::parse(field, value)?.as_str().to_owned())
}

fn nothing_to_update(fields: &str) -> Error {
    Error::invalid("request", format!("nothing to update: set at least one of {fields}"))
}

fn phone_last4(normalised: &str) -> String {
    let digits: Vec<char> = normalised.chars().filter(char::is_ascii_digit).collect();
    digits[digits.len().saturating_sub(4)..].iter().collect()
}

fn gate_kinds(kinds: &[i32]) -> Result<String> {
    if kinds.is_empty() {
        return Err(Error::invalid("supported_kinds", "must list at least one credential kind the gate reads"));
    }
    let mut names: Vec<&'static str> = Vec::new();
    for k in kinds {
        let kind = CredentialKind::try_from(*k)
            .map_err(|_| Error::invalid("supported_kinds", format!("{k} is not a credential kind")))?;
        let name = kind_name(kind)
            .ok_or_else(|| Error::invalid("supported_kinds", "must not contain CREDENTIAL_KIND_UNSPECIFIED"))?;
        if !names.contains(&name) {
            names.push(name);
        }
    }
    if names.iter().all(|n| *n == "face") {
        return Err(Error::precondition(
            "a gate must read at least one non-face credential (card, PIN, QR or visitor pass): \
             face recognition may never be the only way in (R1)",
        ));
    }
    Ok(names.join(","))
}

fn gate_direction(value: i32) -> Result<&'static str> {
    GateDirection::try_from(value).ok().and_then(direction_name).ok_or_else(|| {
        Error::invalid("direction", "must be GATE_DIRECTION_IN, GATE_DIRECTION_OUT or GATE_DIRECTION_BOTH")
    })
}

fn residency_role(value: i32) -> Result<&'static str> {
    ResidencyRole::try_from(value)
        .ok()
        .and_then(role_name)
        .ok_or_else(|| Error::invalid("role", "must be OWNER, OCCUPANT, RENTER or STAFF"))
}

impl Identity {
    /// A service over `db`, keyed with `hasher`, issuing tokens with `tokens`
    /// and announcing residency ends on `bus`.
    pub fn new(db: Db, hasher: KeyedHasher, tokens: TokenAuthority, bus: EventBus, options: IdentityOptions) -> Self {
        Self { db, hasher, tokens, bus, options }
    }

    async fn begin(&self) -> Result<Tx> {
        self.db.begin().await
    }

    async fn record(&self, conn: &mut AnyConnection, caller: &Caller, change: Change<'_>) -> Result<()> {
        outbox::record(conn, &change.into_event(caller.actor(&self.hasher), &caller.request_id, SOURCE)).await
    }

    fn page(&self, size: i32, token: &str) -> Result<Page> {
        Page::parse(size, token, self.options.max_page_size)
    }

    // ---- loaders, always bounded by tenant ----

    async fn tenant_row(&self, conn: &mut AnyConnection, id: &str) -> Result<TenantRow> {
        sqlx::query_as::<Any, TenantRow>(const_format("tenants", TENANT_COLS, "id = $1"))
            .bind(id)
            .fetch_optional(conn)
            .await
            .map_err(db_error)?
            .ok_or(Error::NotFound("tenant"))
    }

    async fn require_active_tenant(&self, conn: &mut AnyConnection, tenant_id: &str) -> Result<()> {
        let t = self.tenant_row(conn, tenant_id).await?;
        if t.status != ACTIVE {
            return Err(Error::precondition("the tenant is deactivated; ask the platform admin to reactivate it"));
        }
        Ok(())
    }

    async fn estate_row(&self, conn: &mut AnyConnection, tenant_id: &str, id: &str) -> Result<EstateRow> {
        sqlx::query_as::<Any, EstateRow>(const_format("estates", ESTATE_COLS, "tenant_id = $1 AND id = $2"))
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(conn)
            .await
            .map_err(db_error)?
            .ok_or(Error::NotFound("estate"))
    }

    async fn active_estate(&self, conn: &mut AnyConnection, tenant_id: &str, id: &str) -> Result<EstateRow> {
        let e = self.estate_row(conn, tenant_id, id).await?;
        if e.status != ACTIVE {
            return Err(Error::precondition("the estate is deactivated"));
        }
        Ok(e)
    }

    async fn gate_row(&self, conn: &mut AnyConnection, tenant_id: &str, id: &str) -> Result<GateRow> {
        sqlx::query_as::<Any, GateRow>(const_format("gates", GATE_COLS, "tenant_id = $1 AND id = $2"))
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(conn)
            .await
            .map_err(db_error)?
            .ok_or(Error::NotFound("gate"))
    }

    async fn unit_row(&self, conn: &mut AnyConnection, tenant_id: &str, id: &str) -> Result<UnitRow> {
        sqlx::query_as::<Any, UnitRow>(const_format("units", UNIT_COLS, "tenant_id = $1 AND id = $2"))
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(conn)
            .await
            .map_err(db_error)?
            .ok_or(Error::NotFound("unit"))
    }

    async fn person_row(&self, conn: &mut AnyConnection, tenant_id: &str, id: &str) -> Result<PersonRow> {
        sqlx::query_as::<Any, PersonRow>(const_format("persons", PERSON_COLS, "tenant_id = $1 AND id = $2"))
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(conn)
            .await
            .map_err(db_error)?
            .ok_or(Error::NotFound("person"))
    }

    async fn residency_row(&self, conn: &mut AnyConnection, tenant_id: &str, id: &str) -> Result<ResidencyRow> {
        sqlx::query_as::<Any, ResidencyRow>(const_format("residencies", RESIDENCY_COLS, "tenant_id = $1 AND id = $2"))
            .bind(tenant_id)
            .bind(id)
            .fetch_optional(conn)
            .await
            .map_err(db_error)?
            .ok_or(Error::NotFound("residency"))
    }

    async fn conn(&self) -> Result<sqlx::pool::PoolConnection<Any>> {
        self.db.pool().acquire().await.map_err(db_error)
    }

    /// A guardian must be an active adult of the same tenant, not the person.
    async fn check_guardian(
        &self,
        conn: &mut AnyConnection,
        tenant_id: &str,
        person_id: &str,
        guardian_id: &str,
    ) -> Result<()> {
        let guardian_id = parse_id("guardian_person_id", guardian_id)?;
        if guardian_id == person_id {
            return Err(Error::invalid("guardian_person_id", "must name another person"));
        }
        let g = self
            .person_row(conn, tenant_id, &guardian_id)
            .await
            .map_err(|_| Error::invalid("guardian_person_id", "names no person of this tenant"))?;
        if g.status != ACTIVE {
            return Err(Error::precondition("the guardian's record is deactivated"));
        }
        if !g.birth_date.is_empty() {
            let b = BirthDate::parse("birth_date", &g.birth_date)?;
            if b.age_on(time_today()) < ADULT_AGE_YEARS {
                return Err(Error::precondition("a guardian must be an adult (18 or older)"));
            }
        }
        if g.guardian_person_id.as_deref() == Some(person_id) {
            return Err(Error::precondition("two persons cannot be each other's guardian"));
        }
        Ok(())
    }

    // ---- tenants ----

    async fn create_tenant(&self, caller: &Caller, r: CreateTenantRequest) -> Result<Tenant> {
        caller.require_platform_admin()?;
        let name = required_text("name", &r.name, NAME_MAX)?;
        let code = jurisdiction("jurisdiction_code", &r.jurisdiction_code)?;
        let now = now_ms();
        let row = TenantRow {
            id: new_id(),
            name,
            jurisdiction_code: code,
            status: ACTIVE.into(),
            created_at: now,
            updated_at: now,
        };
        let mut tx = self.begin().await?;
        sqlx::query::<Any>("INSERT INTO tenants (id, name, jurisdiction_code, status, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6)")
            .bind(&row.id)
            .bind(&row.name)
            .bind(&row.jurisdiction_code)
            .bind(&row.status)
            .bind(now)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(unique_or("an active tenant with this name already exists"))?;
        let change = Change::new(&row.id, "tenant.create", "tenant", &row.id)
            .attr("jurisdiction_code", row.jurisdiction_code.clone());
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(row.into())
    }

    /// Which tenant a tenant-level read or write may touch.
    fn tenant_target(&self, caller: &Caller, requested: &str) -> Result<String> {
        if caller.is_platform_admin() {
            return parse_id("id", requested);
        }
        let own = caller.tenant_id()?;
        if requested.is_empty() || requested == own {
            Ok(own.to_owned())
        } else {
            Err(Error::denied("a tenant's principals can only see their own tenant"))
        }
    }

    async fn get_tenant(&self, caller: &Caller, r: GetTenantRequest) -> Result<Tenant> {
        if let Some(codes) = caller.regulator_jurisdictions() {
            let id = parse_id("id", &r.id)?;
            let t = self.tenant_row(&mut *self.conn().await?, &id).await?;
            return if codes.iter().any(|c| c.covers(&t.jurisdiction_code)) {
                Ok(t.into())
            } else {
                Err(Error::NotFound("tenant"))
            };
        }
        let id = self.tenant_target(caller, &r.id)?;
        Ok(self.tenant_row(&mut *self.conn().await?, &id).await?.into())
    }

    async fn update_tenant(&self, caller: &Caller, r: UpdateTenantRequest) -> Result<Tenant> {
        let id = if caller.is_platform_admin() {
            parse_id("id", &r.id)?
        } else {
            let own = caller.unrestricted_operator_tenant()?;
            if !r.id.is_empty() && r.id != own {
                return Err(Error::denied("an operator can only update its own tenant"));
            }
            if r.jurisdiction_code.is_some() {
                return Err(Error::denied("only the platform admin changes a tenant's jurisdiction"));
            }
            own.to_owned()
        };
        if r.name.is_none() && r.jurisdiction_code.is_none() {
            return Err(nothing_to_update("name, jurisdiction_code"));
        }
        let name = r.name.as_deref().map(|n| required_text("name", n, NAME_MAX)).transpose()?;
        let code = r.jurisdiction_code.as_deref().map(|c| jurisdiction("jurisdiction_code", c)).transpose()?;
        let mut tx = self.begin().await?;
        let mut row = self.tenant_row(&mut tx, &id).await?;
        let mut changed = Vec::new();
        if let Some(n) = name {
            row.name = n;
            changed.push("name");
        }
        if let Some(c) = code {
            row.jurisdiction_code = c;
            changed.push("jurisdiction_code");
        }
        row.updated_at = now_ms();
        sqlx::query::<Any>("UPDATE tenants SET name = $1, jurisdiction_code = $2, updated_at = $3 WHERE id = $4")
            .bind(&row.name)
            .bind(&row.jurisdiction_code)
            .bind(row.updated_at)
            .bind(&row.id)
            .execute(&mut *tx)
            .await
            .map_err(unique_or("an active tenant with this name already exists"))?;
        let change = Change::new(&id, "tenant.update", "tenant", &id).attr("fields", changed.join(","));
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(row.into())
    }

    async fn list_tenants(&self, caller: &Caller, r: ListTenantsRequest) -> Result<ListTenantsResponse> {
        let page = self.page(r.page_size, &r.page_token)?;
        let mut f = Filter::default();
        if !r.include_deactivated {
            f.raw("status = 'active'");
        }
        if let Some(codes) = caller.regulator_jurisdictions() {
            let prefixes: Vec<String> = codes
                .iter()
                .map(|c| {
                    let s = c.as_str();
                    if s.ends_with("0000") {
                        s[..2].to_owned()
                    } else if s.ends_with("00") {
                        s[..4].to_owned()
                    } else {
                        s.to_owned()
                    }
                })
                .collect();
            f.prefix_of_any("jurisdiction_code", &prefixes);
        } else if !caller.is_platform_admin() {
            f.eq("id", caller.tenant_id()?);
        }
        let (sql, binds) = f.page_sql(TENANT_COLS, "tenants", &page);
        let rows: Vec<TenantRow> = fetch_page(self.db.pool(), sql, binds).await.map_err(db_error)?;
        let (rows, next) = page.finish(rows, |r| &r.id);
        Ok(ListTenantsResponse { tenants: rows.into_iter().map(Into::into).collect(), next_page_token: next })
    }

    async fn deactivate_tenant(&self, caller: &Caller, r: DeactivateTenantRequest) -> Result<Tenant> {
        caller.require_platform_admin()?;
        let id = parse_id("id", &r.id)?;
        let mut tx = self.begin().await?;
        let mut row = self.tenant_row(&mut tx, &id).await?;
        if row.status != ACTIVE {
            return Ok(row.into());
        }
        row.status = DEACTIVATED.into();
        row.updated_at = now_ms();
        sqlx::query::<Any>("UPDATE tenants SET status = $1, updated_at = $2 WHERE id = $3")
            .bind(&row.status)
            .bind(row.updated_at)
            .bind(&id)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        self.record(&mut tx, caller, Change::new(&id, "tenant.deactivate", "tenant", &id)).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(row.into())
    }

    // ---- estates ----

    async fn create_estate(&self, caller: &Caller, r: CreateEstateRequest) -> Result<Estate> {
        let tenant = caller.unrestricted_operator_tenant()?.to_owned();
        let name = required_text("name", &r.name, NAME_MAX)?;
        let address = required_text("address", &r.address, ADDRESS_MAX)?;
        let code = jurisdiction("jurisdiction_code", &r.jurisdiction_code)?;
        let now = now_ms();
        let row = EstateRow {
            tenant_id: tenant.clone(),
            id: new_id(),
            name,
            address,
            jurisdiction_code: code,
            status: ACTIVE.into(),
            created_at: now,
            updated_at: now,
        };
        let mut tx = self.begin().await?;
        self.require_active_tenant(&mut tx, &tenant).await?;
        sqlx::query::<Any>(
            "INSERT INTO estates (tenant_id, id, name, address, jurisdiction_code, status, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(&row.tenant_id)
        .bind(&row.id)
        .bind(&row.name)
        .bind(&row.address)
        .bind(&row.jurisdiction_code)
        .bind(&row.status)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(unique_or("an active estate with this name already exists in the tenant"))?;
        let change = Change::new(&tenant, "estate.create", "estate", &row.id).estate(&row.id);
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(row.into())
    }

    async fn get_estate(&self, caller: &Caller, r: GetEstateRequest) -> Result<Estate> {
        let id = parse_id("id", &r.id)?;
        let tenant = match &caller.principal {
            Principal::Gate { tenant_id, estate_id, .. } if *estate_id == id => tenant_id.clone(),
            Principal::Gate { .. } => return Err(Error::denied("a gate can only read its own estate")),
            _ => caller.operator_for_estate(&id)?.to_owned(),
        };
        Ok(self.estate_row(&mut *self.conn().await?, &tenant, &id).await?.into())
    }

    async fn update_estate(&self, caller: &Caller, r: UpdateEstateRequest) -> Result<Estate> {
        let id = parse_id("id", &r.id)?;
        let tenant = caller.operator_for_estate(&id)?.to_owned();
        if r.name.is_none() && r.address.is_none() && r.jurisdiction_code.is_none() {
            return Err(nothing_to_update("name, address, jurisdiction_code"));
        }
        let name = r.name.as_deref().map(|v| required_text("name", v, NAME_MAX)).transpose()?;
        let address = r.address.as_deref().map(|v| required_text("address", v, ADDRESS_MAX)).transpose()?;
        let code = r.jurisdiction_code.as_deref().map(|c| jurisdiction("jurisdiction_code", c)).transpose()?;
        let mut tx = self.begin().await?;
        self.require_active_tenant(&mut tx, &tenant).await?;
        let mut row = self.estate_row(&mut tx, &tenant, &id).await?;
        let mut changed = Vec::new();
        if let Some(v) = name {
            row.name = v;
            changed.push("name");
        }
        if let Some(v) = address {
            row.address = v;
            changed.push("address");
        }
        if let Some(v) = code {
            row.jurisdiction_code = v;
            changed.push("jurisdiction_code");
        }
        row.updated_at = now_ms();
        sqlx::query::<Any>(
            "UPDATE estates SET name = $1, address = $2, jurisdiction_code = $3, updated_at = $4 WHERE tenant_id = $5 AND id = $6",
        )
        .bind(&row.name)
        .bind(&row.address)
        .bind(&row.jurisdiction_code)
        .bind(row.updated_at)
        .bind(&tenant)
        .bind(&id)
        .execute(&mut *tx)
        .await
        .map_err(unique_or("an active estate with this name already exists in the tenant"))?;
        let change = Change::new(&tenant, "estate.update", "estate", &id).estate(&id).attr("fields", changed.join(","));
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(row.into())
    }

    async fn list_estates(&self, caller: &Caller, r: ListEstatesRequest) -> Result<ListEstatesResponse> {
        let tenant = caller.operator_tenant()?;
        let page = self.page(r.page_size, &r.page_token)?;
        let mut f = Filter::default();
        f.eq("tenant_id", tenant);
        if let Some(limit) = caller.operator_estate_limit() {
            f.one_of("id", limit);
        }
        if !r.include_deactivated {
            f.raw("status = 'active'");
        }
        let (sql, binds) = f.page_sql(ESTATE_COLS, "estates", &page);
        let rows: Vec<EstateRow> = fetch_page(self.db.pool(), sql, binds).await.map_err(db_error)?;
        let (rows, next) = page.finish(rows, |r| &r.id);
        Ok(ListEstatesResponse { estates: rows.into_iter().map(Into::into).collect(), next_page_token: next })
    }

    async fn deactivate_estate(&self, caller: &Caller, r: DeactivateEstateRequest) -> Result<Estate> {
        let id = parse_id("id", &r.id)?;
        let tenant = caller.unrestricted_operator_tenant()?.to_owned();
        let mut tx = self.begin().await?;
        let mut row = self.estate_row(&mut tx, &tenant, &id).await?;
        if row.status != ACTIVE {
            return Ok(row.into());
        }
        let (active,): (i64,) = sqlx::query_as::<Any, (i64,)>(
            "SELECT COUNT(*) FROM residencies WHERE tenant_id = $1 AND estate_id = $2 AND status = 'active'",
        )
        .bind(&tenant)
        .bind(&id)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        if active > 0 {
            return Err(Error::precondition(format!(
                "the estate still has {active} active residencies; end them before deactivating the estate"
            )));
        }
        row.status = DEACTIVATED.into();
        row.updated_at = now_ms();
        sqlx::query::<Any>("UPDATE estates SET status = $1, updated_at = $2 WHERE tenant_id = $3 AND id = $4")
            .bind(&row.status)
            .bind(row.updated_at)
            .bind(&tenant)
            .bind(&id)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        self.record(&mut tx, caller, Change::new(&tenant, "estate.deactivate", "estate", &id).estate(&id)).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(row.into())
    }

    // ---- gates ----

    async fn create_gate(&self, caller: &Caller, r: CreateGateRequest) -> Result<Gate> {
        let estate_id = parse_id("estate_id", &r.estate_id)?;
        let tenant = caller.operator_for_estate(&estate_id)?.to_owned();
        let name = required_text("name", &r.name, NAME_MAX)?;
        let direction = gate_direction(r.direction)?;
        let kinds = gate_kinds(&r.supported_kinds)?;
        let now = now_ms();
        let row = GateRow {
            tenant_id: tenant.clone(),
            id: new_id(),
            estate_id: estate_id.clone(),
            name,
            direction: direction.into(),
            supported_kinds: kinds,
            status: ACTIVE.into(),
            created_at: now,
            updated_at: now,
        };
        let mut tx = self.begin().await?;
        self.require_active_tenant(&mut tx, &tenant).await?;
        self.active_estate(&mut tx, &tenant, &estate_id).await?;
        sqlx::query::<Any>(
            "INSERT INTO gates (tenant_id, id, estate_id, name, direction, supported_kinds, status, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&row.tenant_id)
        .bind(&row.id)
        .bind(&row.estate_id)
        .bind(&row.name)
        .bind(&row.direction)
        .bind(&row.supported_kinds)
        .bind(&row.status)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(unique_or("an active gate with this name already exists at the estate"))?;
        let change = Change::new(&tenant, "gate.create", "gate", &row.id)
            .estate(&estate_id)
            .attr("supported_kinds", row.supported_kinds.clone());
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(row.into())
    }

    /// Loads a gate the caller may see: its own gate for a gate principal, a
    /// gate of an estate in scope for an operator.
    async fn visible_gate(&self, conn: &mut AnyConnection, caller: &Caller, id: &str) -> Result<GateRow> {
        match &caller.principal {
            Principal::Gate { tenant_id, gate_id, .. } => {
                if gate_id != id {
                    return Err(Error::denied("a gate can only read itself"));
                }
                self.gate_row(conn, tenant_id, id).await
            }
            _ => {
                let tenant = caller.operator_tenant()?;
                let g = self.gate_row(conn, tenant, id).await?;
                caller.operator_for_estate(&g.estate_id)?;
                Ok(g)
            }
        }
    }

    async fn get_gate(&self, caller: &Caller, r: GetGateRequest) -> Result<Gate> {
        let id = parse_id("id", &r.id)?;
        Ok(self.visible_gate(&mut *self.conn().await?, caller, &id).await?.into())
    }

    async fn update_gate(&self, caller: &Caller, r: UpdateGateRequest) -> Result<Gate> {
        let id = parse_id("id", &r.id)?;
        let tenant = caller.operator_tenant()?.to_owned();
        if r.name.is_none() && r.direction.is_none() && r.supported_kinds.is_none() {
            return Err(nothing_to_update("name, direction, supported_kinds"));
        }
        let name = r.name.as_deref().map(|v| required_text("name", v, NAME_MAX)).transpose()?;
        let direction = r.direction.map(gate_direction).transpose()?;
        let kinds = r.supported_kinds.as_ref().map(|k| gate_kinds(&k.kinds)).transpose()?;
        let mut tx = self.begin().await?;
        self.require_active_tenant(&mut tx, &tenant).await?;
        let mut row = self.gate_row(&mut tx, &tenant, &id).await?;
        caller.operator_for_estate(&row.estate_id)?;
        let mut changed = Vec::new();
        if let Some(v) = name {
            row.name = v;
            changed.push("name");
        }
        if let Some(v) = direction {
            row.direction = v.into();
            changed.push("direction");
        }
        if let Some(v) = kinds {
            row.supported_kinds = v;
            changed.push("supported_kinds");
        }
        row.updated_at = now_ms();
        sqlx::query::<Any>(
            "UPDATE gates SET name = $1, direction = $2, supported_kinds = $3, updated_at = $4 WHERE tenant_id = $5 AND id = $6",
        )
        .bind(&row.name)
        .bind(&row.direction)
        .bind(&row.supported_kinds)
        .bind(row.updated_at)
        .bind(&tenant)
        .bind(&id)
        .execute(&mut *tx)
        .await
        .map_err(unique_or("an active gate with this name already exists at the estate"))?;
        let change = Change::new(&tenant, "gate.update", "gate", &id)
            .estate(&row.estate_id)
            .attr("fields", changed.join(","))
            .attr("supported_kinds", row.supported_kinds.clone());
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(row.into())
    }

    async fn list_gates(&self, caller: &Caller, r: ListGatesRequest) -> Result<ListGatesResponse> {
        let page = self.page(r.page_size, &r.page_token)?;
        let mut f = Filter::default();
        if r.estate_id.is_empty() {
            f.eq("tenant_id", caller.operator_tenant()?);
            if let Some(limit) = caller.operator_estate_limit() {
                f.one_of("estate_id", limit);
            }
        } else {
            let estate_id = parse_id("estate_id", &r.estate_id)?;
            f.eq("tenant_id", caller.operator_for_estate(&estate_id)?);
            f.eq("estate_id", &estate_id);
        }
        if !r.include_deactivated {
            f.raw("status = 'active'");
        }
        let (sql, binds) = f.page_sql(GATE_COLS, "gates", &page);
        let rows: Vec<GateRow> = fetch_page(self.db.pool(), sql, binds).await.map_err(db_error)?;
        let (rows, next) = page.finish(rows, |r| &r.id);
        Ok(ListGatesResponse { gates: rows.into_iter().map(Into::into).collect(), next_page_token: next })
    }

    async fn deactivate_gate(&self, caller: &Caller, r: DeactivateGateRequest) -> Result<Gate> {
        let id = parse_id("id", &r.id)?;
        let tenant = caller.operator_tenant()?.to_owned();
        let mut tx = self.begin().await?;
        let mut row = self.gate_row(&mut tx, &tenant, &id).await?;
        caller.operator_for_estate(&row.estate_id)?;
        if row.status != ACTIVE {
            return Ok(row.into());
        }
        row.status = DEACTIVATED.into();
        row.updated_at = now_ms();
        sqlx::query::<Any>("UPDATE gates SET status = $1, updated_at = $2 WHERE tenant_id = $3 AND id = $4")
            .bind(&row.status)
            .bind(row.updated_at)
            .bind(&tenant)
            .bind(&id)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        self.record(&mut tx, caller, Change::new(&tenant, "gate.deactivate", "gate", &id).estate(&row.estate_id))
            .await?;
        tx.commit().await.map_err(db_error)?;
        Ok(row.into())
    }

    // ---- units ----

    async fn create_unit(&self, caller: &Caller, r: CreateUnitRequest) -> Result<Unit> {
        let estate_id = parse_id("estate_id", &r.estate_id)?;
        let tenant = caller.operator_for_estate(&estate_id)?.to_owned();
        let building = required_text("building", &r.building, 64)?;
        let entrance = bounded_text("unit", &r.unit, 64)?;
        let room = required_text("room", &r.room, 64)?;
        let now = now_ms();
        let row = UnitRow {
            tenant_id: tenant.clone(),
            id: new_id(),
            estate_id: estate_id.clone(),
            building,
            entrance,
            room,
            status: ACTIVE.into(),
            created_at: now,
            updated_at: now,
        };
        let mut tx = self.begin().await?;
        self.require_active_tenant(&mut tx, &tenant).await?;
        self.active_estate(&mut tx, &tenant, &estate_id).await?;
        sqlx::query::<Any>(
            "INSERT INTO units (tenant_id, id, estate_id, building, entrance, room, status, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&row.tenant_id)
        .bind(&row.id)
        .bind(&row.estate_id)
        .bind(&row.building)
        .bind(&row.entrance)
        .bind(&row.room)
        .bind(&row.status)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(unique_or("an active unit with this building, unit and room already exists at the estate"))?;
        self.record(&mut tx, caller, Change::new(&tenant, "unit.create", "unit", &row.id).estate(&estate_id)).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(row.into())
    }

    async fn visible_unit(&self, conn: &mut AnyConnection, caller: &Caller, id: &str) -> Result<UnitRow> {
        let tenant = caller.operator_tenant()?;
        let u = self.unit_row(conn, tenant, id).await?;
        caller.operator_for_estate(&u.estate_id)?;
        Ok(u)
    }

    async fn get_unit(&self, caller: &Caller, r: GetUnitRequest) -> Result<Unit> {
        let id = parse_id("id", &r.id)?;
        Ok(self.visible_unit(&mut *self.conn().await?, caller, &id).await?.into())
    }

    async fn update_unit(&self, caller: &Caller, r: UpdateUnitRequest) -> Result<Unit> {
        let id = parse_id("id", &r.id)?;
        let tenant = caller.operator_tenant()?.to_owned();
        if r.building.is_none() && r.unit.is_none() && r.room.is_none() {
            return Err(nothing_to_update("building, unit, room"));
        }
        let building = r.building.as_deref().map(|v| required_text("building", v, 64)).transpose()?;
        let entrance = r.unit.as_deref().map(|v| bounded_text("unit", v, 64)).transpose()?;
        let room = r.room.as_deref().map(|v| required_text("room", v, 64)).transpose()?;
        let mut tx = self.begin().await?;
        self.require_active_tenant(&mut tx, &tenant).await?;
        let mut row = self.visible_unit(&mut tx, caller, &id).await?;
        let mut changed = Vec::new();
        if let Some(v) = building {
            row.building = v;
            changed.push("building");
        }
        if let Some(v) = entrance {
            row.entrance = v;
            changed.push("unit");
        }
        if let Some(v) = room {
            row.room = v;
            changed.push("room");
        }
        row.updated_at = now_ms();
        sqlx::query::<Any>(
            "UPDATE units SET building = $1, entrance = $2, room = $3, updated_at = $4 WHERE tenant_id = $5 AND id = $6",
        )
        .bind(&row.building)
        .bind(&row.entrance)
        .bind(&row.room)
        .bind(row.updated_at)
        .bind(&tenant)
        .bind(&id)
        .execute(&mut *tx)
        .await
        .map_err(unique_or("an active unit with this building, unit and room already exists at the estate"))?;
        let change =
            Change::new(&tenant, "unit.update", "unit", &id).estate(&row.estate_id).attr("fields", changed.join(","));
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(row.into())
    }

    async fn list_units(&self, caller: &Caller, r: ListUnitsRequest) -> Result<ListUnitsResponse> {
        let page = self.page(r.page_size, &r.page_token)?;
        let mut f = Filter::default();
        if r.estate_id.is_empty() {
            f.eq("tenant_id", caller.operator_tenant()?);
            if let Some(limit) = caller.operator_estate_limit() {
                f.one_of("estate_id", limit);
            }
        } else {
            let estate_id = parse_id("estate_id", &r.estate_id)?;
            f.eq("tenant_id", caller.operator_for_estate(&estate_id)?);
            f.eq("estate_id", &estate_id);
        }
        if !r.include_deactivated {
            f.raw("status = 'active'");
        }
        let (sql, binds) = f.page_sql(UNIT_COLS, "units", &page);
        let rows: Vec<UnitRow> = fetch_page(self.db.pool(), sql, binds).await.map_err(db_error)?;
        let (rows, next) = page.finish(rows, |r| &r.id);
        Ok(ListUnitsResponse { units: rows.into_iter().map(Into::into).collect(), next_page_token: next })
    }

    async fn deactivate_unit(&self, caller: &Caller, r: DeactivateUnitRequest) -> Result<Unit> {
        let id = parse_id("id", &r.id)?;
        let tenant = caller.operator_tenant()?.to_owned();
        let mut tx = self.begin().await?;
        let mut row = self.visible_unit(&mut tx, caller, &id).await?;
        if row.status != ACTIVE {
            return Ok(row.into());
        }
        let (active,): (i64,) = sqlx::query_as::<Any, (i64,)>(
            "SELECT COUNT(*) FROM residencies WHERE tenant_id = $1 AND unit_id = $2 AND status = 'active'",
        )
        .bind(&tenant)
        .bind(&id)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        if active > 0 {
            return Err(Error::precondition(format!(
                "the unit still has {active} active residencies; end them before deactivating the unit"
            )));
        }
        row.status = DEACTIVATED.into();
        row.updated_at = now_ms();
        sqlx::query::<Any>("UPDATE units SET status = $1, updated_at = $2 WHERE tenant_id = $3 AND id = $4")
            .bind(&row.status)
            .bind(row.updated_at)
            .bind(&tenant)
            .bind(&id)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        self.record(&mut tx, caller, Change::new(&tenant, "unit.deactivate", "unit", &id).estate(&row.estate_id))
            .await?;
        tx.commit().await.map_err(db_error)?;
        Ok(row.into())
    }

    // ---- persons ----

    async fn create_person(&self, caller: &Caller, r: CreatePersonRequest) -> Result<Person> {
        let tenant = caller.operator_tenant()?.to_owned();
        let display_name = required_text("display_name", &r.display_name, 100)?;
        let (phone_hash, last4) = if r.phone.trim().is_empty() {
            (String::new(), String::new())
        } else {
            let p = normalise_phone("phone", &r.phone)?;
            (self.hasher.phone_hash(&tenant, &p), phone_last4(&p))
        };
        let birth_date = if r.birth_date.trim().is_empty() {
            String::new()
        } else {
            BirthDate::parse("birth_date", &r.birth_date)?.to_iso()
        };
        let id = new_id();
        let now = now_ms();
        let mut tx = self.begin().await?;
        self.require_active_tenant(&mut tx, &tenant).await?;
        let guardian = if r.guardian_person_id.is_empty() {
            None
        } else {
            self.check_guardian(&mut tx, &tenant, &id, &r.guardian_person_id).await?;
            Some(parse_id("guardian_person_id", &r.guardian_person_id)?)
        };
        let row = PersonRow {
            tenant_id: tenant.clone(),
            pseudonym: self.hasher.pseudonym(&tenant, &id),
            id,
            display_name,
            phone_hash,
            phone_last4: last4,
            birth_date,
            guardian_person_id: guardian,
            status: ACTIVE.into(),
            created_at: now,
            updated_at: now,
        };
        sqlx::query::<Any>(
            "INSERT INTO persons (tenant_id, id, display_name, phone_hash, phone_last4, birth_date, guardian_person_id, \
             pseudonym, status, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(&row.tenant_id)
        .bind(&row.id)
        .bind(&row.display_name)
        .bind(&row.phone_hash)
        .bind(&row.phone_last4)
        .bind(&row.birth_date)
        .bind(row.guardian_person_id.clone())
        .bind(&row.pseudonym)
        .bind(&row.status)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let change = Change::new(&tenant, "person.create", "person", &row.pseudonym)
            .person(&row.pseudonym, row.is_minor())
            .attr("guardian_linked", row.guardian_person_id.is_some().to_string());
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(row.into())
    }

    async fn get_person(&self, caller: &Caller, r: GetPersonRequest) -> Result<Person> {
        let id = parse_id("id", &r.id)?;
        let mut conn = self.conn().await?;
        match &caller.principal {
            Principal::Resident { tenant_id, person_id } => {
                if *person_id == id {
                    return Ok(self.person_row(&mut conn, tenant_id, &id).await?.into());
                }
                // A guardian may read the record of a linked minor (R7).
                let p = self.person_row(&mut conn, tenant_id, &id).await.map_err(|_| not_yours())?;
                if p.guardian_person_id.as_deref() == Some(person_id.as_str()) {
                    Ok(p.into())
                } else {
                    Err(not_yours())
                }
            }
            _ => {
                let tenant = caller.operator_tenant()?;
                Ok(self.person_row(&mut conn, tenant, &id).await?.into())
            }
        }
    }

    async fn update_person(&self, caller: &Caller, r: UpdatePersonRequest) -> Result<Person> {
        let id = parse_id("id", &r.id)?;
        let tenant = caller.operator_tenant()?.to_owned();
        if r.display_name.is_none() && r.phone.is_none() && r.birth_date.is_none() && r.guardian_person_id.is_none() {
            return Err(nothing_to_update("display_name, phone, birth_date, guardian_person_id"));
        }
        let display_name = r.display_name.as_deref().map(|v| required_text("display_name", v, 100)).transpose()?;
        let phone = match r.phone.as_deref() {
            None => None,
            Some(p) if p.trim().is_empty() => Some((String::new(), String::new())),
            Some(p) => {
                let n = normalise_phone("phone", p)?;
                Some((self.hasher.phone_hash(&tenant, &n), phone_last4(&n)))
            }
        };
        let birth_date = match r.birth_date.as_deref() {
            None => None,
            Some(b) if b.trim().is_empty() => Some(String::new()),
            Some(b) => Some(BirthDate::parse("birth_date", b)?.to_iso()),
        };
        let mut tx = self.begin().await?;
        self.require_active_tenant(&mut tx, &tenant).await?;
        let mut row = self.person_row(&mut tx, &tenant, &id).await?;
        let mut changed = Vec::new();
        if let Some(v) = display_name {
            row.display_name = v;
            changed.push("display_name");
        }
        if let Some((hash, last4)) = phone {
            row.phone_hash = hash;
            row.phone_last4 = last4;
            changed.push("phone");
        }
        if let Some(v) = birth_date {
            row.birth_date = v;
            changed.push("birth_date");
        }
        if let Some(g) = r.guardian_person_id.as_deref() {
            if g.is_empty() {
                row.guardian_person_id = None;
            } else {
                self.check_guardian(&mut tx, &tenant, &id, g).await?;
                row.guardian_person_id = Some(parse_id("guardian_person_id", g)?);
            }
            changed.push("guardian_person_id");
        }
        row.updated_at = now_ms();
        sqlx::query::<Any>(
            "UPDATE persons SET display_name = $1, phone_hash = $2, phone_last4 = $3, birth_date = $4, \
             guardian_person_id = $5, updated_at = $6 WHERE tenant_id = $7 AND id = $8",
        )
        .bind(&row.display_name)
        .bind(&row.phone_hash)
        .bind(&row.phone_last4)
        .bind(&row.birth_date)
        .bind(row.guardian_person_id.clone())
        .bind(row.updated_at)
        .bind(&tenant)
        .bind(&id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let change = Change::new(&tenant, "person.update", "person", &row.pseudonym)
            .person(&row.pseudonym, row.is_minor())
            .attr("fields", changed.join(","));
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(row.into())
    }

    async fn list_persons(&self, caller: &Caller, r: ListPersonsRequest) -> Result<ListPersonsResponse> {
        let tenant = caller.operator_tenant()?;
        let page = self.page(r.page_size, &r.page_token)?;
        let mut f = Filter::default();
        f.eq("tenant_id", tenant);
        if !r.phone.trim().is_empty() {
            let p = normalise_phone("phone", &r.phone)?;
            f.eq("phone_hash", &self.hasher.phone_hash(tenant, &p));
        }
        if !r.include_deactivated {
            f.raw("status = 'active'");
        }
        let (sql, binds) = f.page_sql(PERSON_COLS, "persons", &page);
        let rows: Vec<PersonRow> = fetch_page(self.db.pool(), sql, binds).await.map_err(db_error)?;
        let (rows, next) = page.finish(rows, |r| &r.id);
        Ok(ListPersonsResponse { persons: rows.into_iter().map(Into::into).collect(), next_page_token: next })
    }

    async fn deactivate_person(&self, caller: &Caller, r: DeactivatePersonRequest) -> Result<Person> {
        let id = parse_id("id", &r.id)?;
        let tenant = caller.operator_tenant()?.to_owned();
        let mut tx = self.begin().await?;
        let mut row = self.person_row(&mut tx, &tenant, &id).await?;
        if row.status != ACTIVE {
            return Ok(row.into());
        }
        // Every active residency ends with the person (each its own event, R5).
        let residencies = sqlx::query_as::<Any, ResidencyRow>(const_format(
            "residencies",
            RESIDENCY_COLS,
            "tenant_id = $1 AND person_id = $2 AND status = 'active'",
        ))
        .bind(&tenant)
        .bind(&id)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
        for res in &residencies {
            caller.operator_for_estate(&res.estate_id)?;
        }
        let mut ended = Vec::with_capacity(residencies.len());
        for res in residencies {
            ended.push(self.end_residency_in(&mut tx, caller, res, &row, "person deactivated").await?);
        }
        row.status = DEACTIVATED.into();
        row.updated_at = now_ms();
        sqlx::query::<Any>("UPDATE persons SET status = $1, updated_at = $2 WHERE tenant_id = $3 AND id = $4")
            .bind(&row.status)
            .bind(row.updated_at)
            .bind(&tenant)
            .bind(&id)
            .execute(&mut *tx)
            .await
            .map_err(db_error)?;
        let change =
            Change::new(&tenant, "person.deactivate", "person", &row.pseudonym).person(&row.pseudonym, row.is_minor());
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        for ev in ended {
            self.announce(ev).await;
        }
        Ok(row.into())
    }

    // ---- residencies ----

    async fn create_residency(&self, caller: &Caller, r: CreateResidencyRequest) -> Result<Residency> {
        let tenant = caller.operator_tenant()?.to_owned();
        let person_id = parse_id("person_id", &r.person_id)?;
        let unit_id = parse_id("unit_id", &r.unit_id)?;
        let role = residency_role(r.role)?;
        let now = now_ms();
        let valid_from = r.valid_from.as_ref().map(ms_of).unwrap_or(now);
        let valid_until = r.valid_until.as_ref().map(ms_of);
        if let Some(until) = valid_until
            && until <= valid_from
        {
            return Err(Error::invalid("valid_until", "must be after valid_from"));
        }
        let mut tx = self.begin().await?;
        self.require_active_tenant(&mut tx, &tenant).await?;
        let unit = self.unit_row(&mut tx, &tenant, &unit_id).await?;
        caller.operator_for_estate(&unit.estate_id)?;
        if unit.status != ACTIVE {
            return Err(Error::precondition("the unit is deactivated"));
        }
        let person = self.person_row(&mut tx, &tenant, &person_id).await?;
        if person.status != ACTIVE {
            return Err(Error::precondition("the person's record is deactivated"));
        }
        let (dupes,): (i64,) = sqlx::query_as::<Any, (i64,)>(
            "SELECT COUNT(*) FROM residencies WHERE tenant_id = $1 AND person_id = $2 AND unit_id = $3 AND status = 'active'",
        )
        .bind(&tenant)
        .bind(&person_id)
        .bind(&unit_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        if dupes > 0 {
            return Err(Error::AlreadyExists("the person already has an active residency in this unit".into()));
        }
        let row = ResidencyRow {
            tenant_id: tenant.clone(),
            id: new_id(),
            person_id,
            unit_id,
            estate_id: unit.estate_id.clone(),
            role: role.into(),
            valid_from,
            valid_until,
            status: ACTIVE.into(),
            end_reason: String::new(),
            created_at: now,
            updated_at: now,
        };
        sqlx::query::<Any>(
            "INSERT INTO residencies (tenant_id, id, person_id, unit_id, estate_id, role, valid_from, valid_until, status, \
             end_reason, created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
        )
        .bind(&row.tenant_id)
        .bind(&row.id)
        .bind(&row.person_id)
        .bind(&row.unit_id)
        .bind(&row.estate_id)
        .bind(&row.role)
        .bind(row.valid_from)
        .bind(row.valid_until)
        .bind(&row.status)
        .bind(&row.end_reason)
        .bind(now)
        .bind(now)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let change = Change::new(&tenant, "residency.create", "residency", &row.id)
            .estate(&row.estate_id)
            .person(&person.pseudonym, person.is_minor())
            .attr("role", role);
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(row.into())
    }

    async fn visible_residency(&self, conn: &mut AnyConnection, caller: &Caller, id: &str) -> Result<ResidencyRow> {
        match &caller.principal {
            Principal::Resident { tenant_id, person_id } => {
                let r = self.residency_row(conn, tenant_id, id).await?;
                if r.person_id == *person_id { Ok(r) } else { Err(Error::NotFound("residency")) }
            }
            _ => {
                let tenant = caller.operator_tenant()?;
                let r = self.residency_row(conn, tenant, id).await?;
                caller.operator_for_estate(&r.estate_id)?;
                Ok(r)
            }
        }
    }

    async fn get_residency(&self, caller: &Caller, r: GetResidencyRequest) -> Result<Residency> {
        let id = parse_id("id", &r.id)?;
        Ok(self.visible_residency(&mut *self.conn().await?, caller, &id).await?.into())
    }

    async fn update_residency(&self, caller: &Caller, r: UpdateResidencyRequest) -> Result<Residency> {
        let id = parse_id("id", &r.id)?;
        let tenant = caller.operator_tenant()?.to_owned();
        if r.role.is_none() && r.valid_until.is_none() {
            return Err(nothing_to_update("role, valid_until"));
        }
        let role = r.role.map(residency_role).transpose()?;
        let mut tx = self.begin().await?;
        self.require_active_tenant(&mut tx, &tenant).await?;
        let mut row = self.visible_residency(&mut tx, caller, &id).await?;
        if row.status != ACTIVE {
            return Err(Error::precondition("the residency has ended; create a new one instead"));
        }
        let mut changed = Vec::new();
        if let Some(v) = role {
            row.role = v.into();
            changed.push("role");
        }
        if let Some(until) = r.valid_until.as_ref().map(ms_of) {
            if until <= row.valid_from {
                return Err(Error::invalid("valid_until", "must be after valid_from"));
            }
            row.valid_until = Some(until);
            changed.push("valid_until");
        }
        row.updated_at = now_ms();
        sqlx::query::<Any>(
            "UPDATE residencies SET role = $1, valid_until = $2, updated_at = $3 WHERE tenant_id = $4 AND id = $5",
        )
        .bind(&row.role)
        .bind(row.valid_until)
        .bind(row.updated_at)
        .bind(&tenant)
        .bind(&id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let person = self.person_row(&mut tx, &tenant, &row.person_id).await?;
        let change = Change::new(&tenant, "residency.update", "residency", &id)
            .estate(&row.estate_id)
            .person(&person.pseudonym, person.is_minor())
            .attr("fields", changed.join(","));
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(row.into())
    }

    async fn list_residencies(&self, caller: &Caller, r: ListResidenciesRequest) -> Result<ListResidenciesResponse> {
        let page = self.page(r.page_size, &r.page_token)?;
        let mut f = Filter::default();
        match &caller.principal {
            Principal::Resident { tenant_id, person_id } => {
                if !r.person_id.is_empty() && r.person_id != *person_id {
                    return Err(not_yours());
                }
                f.eq("tenant_id", tenant_id).eq("person_id", person_id);
            }
            _ => {
                let tenant = caller.operator_tenant()?;
                f.eq("tenant_id", tenant);
                if !r.person_id.is_empty() {
                    f.eq("person_id", &parse_id("person_id", &r.person_id)?);
                }
                if !r.estate_id.is_empty() {
                    let estate_id = parse_id("estate_id", &r.estate_id)?;
                    caller.operator_for_estate(&estate_id)?;
                    f.eq("estate_id", &estate_id);
                } else if let Some(limit) = caller.operator_estate_limit() {
                    f.one_of("estate_id", limit);
                }
            }
        }
        if !r.unit_id.is_empty() {
            f.eq_if("unit_id", &parse_id("unit_id", &r.unit_id)?);
        }
        if !r.include_ended {
            f.raw("status = 'active'");
        }
        let (sql, binds) = f.page_sql(RESIDENCY_COLS, "residencies", &page);
        let rows: Vec<ResidencyRow> = fetch_page(self.db.pool(), sql, binds).await.map_err(db_error)?;
        let (rows, next) = page.finish(rows, |r| &r.id);
        Ok(ListResidenciesResponse { residencies: rows.into_iter().map(Into::into).collect(), next_page_token: next })
    }

    /// Ends `res` inside `tx` and writes its audit event; returns the bus
    /// event to publish after commit.
    async fn end_residency_in(
        &self,
        tx: &mut AnyConnection,
        caller: &Caller,
        mut res: ResidencyRow,
        person: &PersonRow,
        reason: &str,
    ) -> Result<(ResidencyRow, ResidencyEnded)> {
        let now = now_ms();
        res.status = ENDED.into();
        res.valid_until = Some(res.valid_until.map_or(now, |u| u.min(now)).max(res.valid_from));
        res.end_reason = reason.to_owned();
        res.updated_at = now;
        sqlx::query::<Any>(
            "UPDATE residencies SET status = $1, valid_until = $2, end_reason = $3, updated_at = $4 WHERE tenant_id = $5 AND id = $6",
        )
        .bind(&res.status)
        .bind(res.valid_until)
        .bind(&res.end_reason)
        .bind(now)
        .bind(&res.tenant_id)
        .bind(&res.id)
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        let (others,): (i64,) = sqlx::query_as::<Any, (i64,)>(
            "SELECT COUNT(*) FROM residencies WHERE tenant_id = $1 AND person_id = $2 AND estate_id = $3 AND status = 'active'",
        )
        .bind(&res.tenant_id)
        .bind(&res.person_id)
        .bind(&res.estate_id)
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?;
        let last_at_estate = others == 0;
        let change = Change::new(&res.tenant_id, "residency.end", "residency", &res.id)
            .estate(&res.estate_id)
            .person(&person.pseudonym, person.is_minor())
            .attr("reason", reason.to_owned())
            .attr("last_at_estate", last_at_estate.to_string());
        let event = change.into_event(caller.actor(&self.hasher), &caller.request_id, SOURCE);
        outbox::record(tx, &event).await?;
        let ended = ResidencyEnded {
            event_id: event.event_id,
            tenant_id: res.tenant_id.clone(),
            estate_id: res.estate_id.clone(),
            unit_id: res.unit_id.clone(),
            residency_id: res.id.clone(),
            person_id: res.person_id.clone(),
            person_pseudonym: person.pseudonym.clone(),
            ended_at: ts(now),
            last_at_estate,
        };
        Ok((res, ended))
    }

    /// Publishes a residency end on the bus. Losing it is tolerable: the
    /// outbox row is the durable record that consumers sweep.
    async fn announce(&self, ended: (ResidencyRow, ResidencyEnded)) {
        if let Err(e) = self.bus.publish(RESIDENCY_ENDED_TOPIC, ended.1.encode_to_vec()).await {
            tracing::warn!(error = %e, residency_id = %ended.0.id, "residency end not announced on the bus; consumers will sweep the outbox");
        }
    }

    async fn end_residency(&self, caller: &Caller, r: EndResidencyRequest) -> Result<Residency> {
        let id = parse_id("id", &r.id)?;
        let tenant = caller.operator_tenant()?.to_owned();
        let reason = bounded_text("reason", &r.reason, 200)?;
        let reason = if reason.is_empty() { "moved out".to_owned() } else { reason };
        let mut tx = self.begin().await?;
        let row = self.visible_residency(&mut tx, caller, &id).await?;
        if row.status != ACTIVE {
            return Ok(row.into());
        }
        let person = self.person_row(&mut tx, &tenant, &row.person_id).await?;
        let ended = self.end_residency_in(&mut tx, caller, row, &person, &reason).await?;
        tx.commit().await.map_err(db_error)?;
        let out = ended.0.clone();
        self.announce(ended).await;
        Ok(out.into())
    }

    // ---- tokens ----

    async fn issue_token(&self, caller: &Caller, r: IssueTokenRequest) -> Result<IssueTokenResponse> {
        let subject = required_text("subject", &r.subject, SUBJECT_MAX)?;
        let ttl = match r.ttl_seconds {
            0 => self.options.default_token_ttl_secs,
            n if n < 0 => return Err(Error::invalid("ttl_seconds", "must not be negative")),
            n => u64::try_from(n).unwrap_or(u64::MAX),
        };
        let grant = r.principal.ok_or_else(|| {
            Error::invalid("principal", "choose one of operator, gate, resident, regulator, platform_admin")
        })?;
        let mut conn = self.conn().await?;
        let (principal, tenant_for_log, estate_for_log, pseudonym) = match grant {
            issue_token_request::Principal::Service(g) => {
                caller.require_platform_admin()?;
                let name = required_text("service.name", &g.name, 64)?;
                (Principal::Service { name }, PLATFORM_TENANT.to_owned(), String::new(), String::new())
            }
            issue_token_request::Principal::PlatformAdmin(_) => {
                caller.require_platform_admin()?;
                (Principal::PlatformAdmin, PLATFORM_TENANT.to_owned(), String::new(), String::new())
            }
            issue_token_request::Principal::Regulator(g) => {
                caller.require_platform_admin()?;
                if g.jurisdiction_codes.is_empty() {
                    return Err(Error::invalid("regulator.jurisdiction_codes", "must name at least one code"));
                }
                let codes = g
                    .jurisdiction_codes
                    .iter()
                    .map(|c| jurisdiction("regulator.jurisdiction_codes", c))
                    .collect::<Result<Vec<_>>>()?;
                (
                    Principal::Regulator { jurisdiction_codes: codes },
                    PLATFORM_TENANT.to_owned(),
                    String::new(),
                    String::new(),
                )
            }
            issue_token_request::Principal::Operator(g) => {
                let tenant_id = if caller.is_platform_admin() {
                    parse_id("operator.tenant_id", &g.tenant_id)?
                } else {
                    let own = caller.operator_tenant()?;
                    if !g.tenant_id.is_empty() && g.tenant_id != own {
                        return Err(Error::denied("an operator can only issue tokens for its own tenant"));
                    }
                    own.to_owned()
                };
                let t = self.tenant_row(&mut conn, &tenant_id).await.map_err(|e| match e {
                    Error::NotFound(_) => Error::invalid("operator.tenant_id", "names no tenant"),
                    other => other,
                })?;
                if t.status != ACTIVE {
                    return Err(Error::precondition("the tenant is deactivated"));
                }
                let mut estates = Vec::with_capacity(g.estate_ids.len());
                for e in &g.estate_ids {
                    let e = parse_id("operator.estate_ids", e)?;
                    if let Some(limit) = caller.operator_estate_limit()
                        && !limit.contains(&e)
                    {
                        return Err(Error::denied("an operator cannot grant estates beyond its own"));
                    }
                    self.estate_row(&mut conn, &tenant_id, &e).await.map_err(|_| {
                        Error::invalid("operator.estate_ids", "names an estate that is not in the tenant")
                    })?;
                    if !estates.contains(&e) {
                        estates.push(e);
                    }
                }
                if estates.is_empty() && caller.operator_estate_limit().is_some() {
                    return Err(Error::denied(
                        "an estate-limited operator can only issue estate-limited operator tokens",
                    ));
                }
                (
                    Principal::Operator { tenant_id: tenant_id.clone(), estate_ids: estates },
                    tenant_id,
                    String::new(),
                    String::new(),
                )
            }
            issue_token_request::Principal::Gate(g) => {
                let gate_id = parse_id("gate.gate_id", &g.gate_id)?;
                let gate = if caller.is_platform_admin() {
                    sqlx::query_as::<Any, GateRow>(const_format("gates", GATE_COLS, "id = $1"))
                        .bind(&gate_id)
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(db_error)?
                        .ok_or(Error::NotFound("gate"))?
                } else {
                    let tenant = caller.operator_tenant()?;
                    let g = self.gate_row(&mut conn, tenant, &gate_id).await?;
                    caller.operator_for_estate(&g.estate_id)?;
                    g
                };
                if gate.status != ACTIVE {
                    return Err(Error::precondition("the gate is deactivated"));
                }
                let p =
                    Principal::Gate { tenant_id: gate.tenant_id.clone(), estate_id: gate.estate_id.clone(), gate_id };
                (p, gate.tenant_id, gate.estate_id, String::new())
            }
            issue_token_request::Principal::Resident(g) => {
                let person_id = parse_id("resident.person_id", &g.person_id)?;
                let person = if caller.is_platform_admin() {
                    sqlx::query_as::<Any, PersonRow>(const_format("persons", PERSON_COLS, "id = $1"))
                        .bind(&person_id)
                        .fetch_optional(&mut *conn)
                        .await
                        .map_err(db_error)?
                        .ok_or(Error::NotFound("person"))?
                } else {
                    let tenant = caller.unrestricted_operator_tenant()?;
                    self.person_row(&mut conn, tenant, &person_id).await?
                };
                if person.status != ACTIVE {
                    return Err(Error::precondition("the person's record is deactivated"));
                }
                let p = Principal::Resident { tenant_id: person.tenant_id.clone(), person_id };
                (p, person.tenant_id, String::new(), person.pseudonym)
            }
        };
        let kind = match &principal {
            Principal::PlatformAdmin => "platform_admin",
            Principal::Operator { .. } => "operator",
            Principal::Gate { .. } => "gate",
            Principal::Resident { .. } => "resident",
            Principal::Regulator { .. } => "regulator",
            Principal::Service { .. } => "service",
        };
        let issued = self.tokens.issue(principal, &subject, ttl)?;
        let mut tx = self.begin().await?;
        let mut change = Change::new(&tenant_for_log, "token.issue", "token", &issued.token_id)
            .estate(&estate_for_log)
            .attr("principal_kind", kind)
            .attr("expires_at", issued.expires_at.to_string());
        if !pseudonym.is_empty() {
            change = change.person(&pseudonym, false);
        }
        self.record(&mut tx, caller, change).await?;
        tx.commit().await.map_err(db_error)?;
        Ok(IssueTokenResponse {
            token: issued.token,
            token_id: issued.token_id,
            expires_at: ts(issued.expires_at * 1000),
        })
    }

    fn who_am_i(caller: &Caller) -> WhoAmIResponse {
        let mut out = WhoAmIResponse {
            subject: caller.subject.clone(),
            expires_at: ts(caller.expires_at * 1000),
            ..Default::default()
        };
        match &caller.principal {
            Principal::PlatformAdmin => out.kind = ActorKind::PlatformAdmin as i32,
            Principal::Operator { tenant_id, estate_ids } => {
                out.kind = ActorKind::Operator as i32;
                out.tenant_id = tenant_id.clone();
                out.estate_ids = estate_ids.clone();
            }
            Principal::Gate { tenant_id, estate_id, gate_id } => {
                out.kind = ActorKind::Gate as i32;
                out.tenant_id = tenant_id.clone();
                out.estate_ids = vec![estate_id.clone()];
                out.gate_id = gate_id.clone();
            }
            Principal::Resident { tenant_id, person_id } => {
                out.kind = ActorKind::Resident as i32;
                out.tenant_id = tenant_id.clone();
                out.person_id = person_id.clone();
            }
            Principal::Regulator { jurisdiction_codes } => {
                out.kind = ActorKind::Regulator as i32;
                out.jurisdiction_codes = jurisdiction_codes.clone();
            }
            Principal::Service { .. } => out.kind = ActorKind::Service as i32,
        }
        out
    }
}

fn not_yours() -> Error {
    Error::denied("a resident can only read their own records and those of minors they are guardian of")
}

fn time_today() -> time::Date {
    time::OffsetDateTime::now_utc().date()
}

/// `SELECT cols FROM table WHERE cond` for fixed queries.
fn const_format(table: &'static str, cols: &'static str, cond: &'static str) -> sqlx::AssertSqlSafe<String> {
    sqlx::AssertSqlSafe(format!("SELECT {cols} FROM {table} WHERE {cond}"))
}

#[tonic::async_trait]
impl IdentityService for Identity {
    estate_auth::unary_rpcs! {
        "identity", Identity;
        create_tenant(CreateTenantRequest) -> Tenant;
        get_tenant(GetTenantRequest) -> Tenant;
        update_tenant(UpdateTenantRequest) -> Tenant;
        list_tenants(ListTenantsRequest) -> ListTenantsResponse;
        deactivate_tenant(DeactivateTenantRequest) -> Tenant;
        create_estate(CreateEstateRequest) -> Estate;
        get_estate(GetEstateRequest) -> Estate;
        update_estate(UpdateEstateRequest) -> Estate;
        list_estates(ListEstatesRequest) -> ListEstatesResponse;
        deactivate_estate(DeactivateEstateRequest) -> Estate;
        create_gate(CreateGateRequest) -> Gate;
        get_gate(GetGateRequest) -> Gate;
        update_gate(UpdateGateRequest) -> Gate;
        list_gates(ListGatesRequest) -> ListGatesResponse;
        deactivate_gate(DeactivateGateRequest) -> Gate;
        create_unit(CreateUnitRequest) -> Unit;
        get_unit(GetUnitRequest) -> Unit;
        update_unit(UpdateUnitRequest) -> Unit;
        list_units(ListUnitsRequest) -> ListUnitsResponse;
        deactivate_unit(DeactivateUnitRequest) -> Unit;
        create_person(CreatePersonRequest) -> Person;
        get_person(GetPersonRequest) -> Person;
        update_person(UpdatePersonRequest) -> Person;
        list_persons(ListPersonsRequest) -> ListPersonsResponse;
        deactivate_person(DeactivatePersonRequest) -> Person;
        create_residency(CreateResidencyRequest) -> Residency;
        get_residency(GetResidencyRequest) -> Residency;
        update_residency(UpdateResidencyRequest) -> Residency;
        list_residencies(ListResidenciesRequest) -> ListResidenciesResponse;
        end_residency(EndResidencyRequest) -> Residency;
        issue_token(IssueTokenRequest) -> IssueTokenResponse;
    }

    #[tracing::instrument(skip_all, fields(rpc = "who_am_i"))]
    async fn who_am_i(&self, request: Request<WhoAmIRequest>) -> std::result::Result<Response<WhoAmIResponse>, Status> {
        let caller = caller(&request)?;
        Ok(Response::new(Identity::who_am_i(&caller)))
    }
}
