//! Anti-passback presence: the last direction each person passed at each
//! estate. In Redis when distributed (shared by every gate replica); in
//! memory otherwise, and then also in the `gate_presence` table, written in
//! the same transaction as the decision's audit event, and read back when
//! the service starts, so that a restart does not let someone who is inside
//! enter again.

use crate::cache::Breaker;
use estate_core::{Error, Result};
use estate_store::{Db, db_error};
use sqlx::Any;
use std::collections::HashMap;
use std::sync::Arc;

/// How long a presence is remembered: a person who entered and never left
/// may enter again after a day.
pub const PRESENCE_TTL_MS: i64 = 24 * 3600 * 1000;

/// A passage that changed a memory-kept presence, to record in the database
/// with its decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Passage {
    pub tenant: String,
    pub estate: String,
    /// The person's pseudonymous id (R17).
    pub person: String,
    pub direction: &'static str,
    /// When it was decided (ms).
    pub at: i64,
}

/// The presence store; cheap to clone.
#[derive(Clone)]
pub struct Presence {
    backend: Arc<Backend>,
    breaker: Arc<Breaker>,
}

/// (tenant, estate, person) -> (direction, ms).
type Passages = HashMap<(String, String, String), (&'static str, i64)>;

enum Backend {
    Memory(std::sync::Mutex<Passages>),
    Redis(redis::aio::ConnectionManager),
}

impl std::fmt::Debug for Presence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Presence(..)")
    }
}

fn direction_of(text: &str) -> Option<&'static str> {
    match text {
        "in" => Some("in"),
        "out" => Some("out"),
        _ => None,
    }
}

impl Presence {
    /// In Redis when given (shared by replicas), else in this process.
    pub fn new(redis: Option<redis::aio::ConnectionManager>) -> Self {
        let backend = match redis {
            Some(c) => Backend::Redis(c),
            None => Backend::Memory(std::sync::Mutex::new(HashMap::new())),
        };
        Self { backend: Arc::new(backend), breaker: Arc::default() }
    }

    /// Whether passages must be recorded in the database ([`record`]): the
    /// presence is kept in this process.
    pub fn kept_in_memory(&self) -> bool {
        matches!(&*self.backend, Backend::Memory(_))
    }

    /// Kept in memory: deletes the recorded passages older than a day and
    /// loads the others. Returns how many were loaded (0 with Redis).
    pub async fn restore(&self, db: &Db) -> Result<usize> {
        let Backend::Memory(map) = &*self.backend else { return Ok(0) };
        let since = estate_core::now_ms() - PRESENCE_TTL_MS;
        sqlx::query::<Any>("DELETE FROM gate_presence WHERE passed_at < $1")
            .bind(since)
            .execute(db.pool())
            .await
            .map_err(db_error)?;
        let rows: Vec<(String, String, String, String, i64)> = sqlx::query_as(
            "SELECT tenant_id, estate_id, person, direction, passed_at FROM gate_presence WHERE passed_at >= $1",
        )
        .bind(since)
        .fetch_all(db.pool())
        .await
        .map_err(db_error)?;
        let mut guard = map.lock().map_err(|_| Error::Internal("presence lock poisoned".into()))?;
        let mut loaded = 0;
        for (tenant, estate, person, direction, at) in rows {
            let Some(direction) = direction_of(&direction) else { continue };
            let entry = guard.entry((tenant, estate, person)).or_insert((direction, at));
            if entry.1 <= at {
                *entry = (direction, at);
            }
            loaded += 1;
        }
        Ok(loaded)
    }

    /// Records that the person passes in `direction` ("in" / "out") at `at`
    /// (ms) and returns false, without recording, when their last passage,
    /// within a day, was in the same direction (a passback).
    pub async fn pass(
        &self,
        tenant: &str,
        estate: &str,
        person: &str,
        direction: &'static str,
        at: i64,
    ) -> Result<bool> {
        match &*self.backend {
            Backend::Memory(m) => {
                let mut guard = m.lock().map_err(|_| Error::Internal("presence lock poisoned".into()))?;
                let key = (tenant.to_owned(), estate.to_owned(), person.to_owned());
                if guard.get(&key).is_some_and(|(last, when)| *last == direction && at - when < PRESENCE_TTL_MS) {
                    return Ok(false);
                }
                guard.insert(key, (direction, at));
                Ok(true)
            }
            Backend::Redis(conn) => {
                let k = format!("estate:gate:presence:{tenant}:{estate}:{person}");
                let mut conn = conn.clone();
                // SET .. GET swaps atomically; re-setting the same direction
                // changes nothing, so a refusal needs no undo.
                let swap = redis::cmd("SET")
                    .arg(&k)
                    .arg(direction)
                    .arg("GET")
                    .arg("EX")
                    .arg(PRESENCE_TTL_MS / 1000)
                    .to_owned();
                let previous: Option<String> = self.breaker.query(&mut conn, &swap, "SET").await?;
                Ok(previous.as_deref() != Some(direction))
            }
        }
    }
}

/// Records `passages` on `conn` (in the transaction of their decisions'
/// audit events); a passage older than the one recorded changes nothing.
pub async fn record(conn: &mut sqlx::AnyConnection, passages: &[&Passage]) -> Result<()> {
    for p in passages {
        sqlx::query::<Any>(
            "INSERT INTO gate_presence (tenant_id, estate_id, person, direction, passed_at) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (tenant_id, estate_id, person) DO UPDATE \
             SET direction = excluded.direction, passed_at = excluded.passed_at \
             WHERE excluded.passed_at >= gate_presence.passed_at",
        )
        .bind(&p.tenant)
        .bind(&p.estate)
        .bind(&p.person)
        .bind(p.direction)
        .bind(p.at)
        .execute(&mut *conn)
        .await
        .map_err(db_error)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn presence_refuses_the_same_direction_twice_within_a_day() -> Result<()> {
        let p = Presence::new(None);
        let t = 1_000_000_000_000;
        assert!(p.pass("t", "e", "psn", "in", t).await?);
        assert!(!p.pass("t", "e", "psn", "in", t + 1).await?);
        assert!(p.pass("t", "e", "psn", "out", t + 2).await?);
        assert!(p.pass("t", "e", "psn", "in", t + 3).await?);
        // Another estate, another person: their own presence.
        assert!(p.pass("t", "e2", "psn", "in", t + 4).await?);
        assert!(p.pass("t", "e", "psn2", "in", t + 5).await?);
        // A day after entering without leaving, one may enter again.
        assert!(p.pass("t", "e", "psn", "in", t + 3 + PRESENCE_TTL_MS).await?);
        Ok(())
    }

    /// On SQLite, or on PostgreSQL when the tests are pointed at it.
    #[tokio::test]
    async fn recorded_passages_are_restored_and_old_ones_pruned() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let (test_db, db) = crate::test_db(dir.path()).await?;
        let now = estate_core::now_ms();
        let passage = |person: &str, direction: &'static str, at: i64| Passage {
            tenant: "t".into(),
            estate: "e".into(),
            person: person.into(),
            direction,
            at,
        };
        let (inside, left, stale) = (
            passage("in1", "in", now - 10),
            passage("out1", "out", now - 5),
            passage("old", "in", now - PRESENCE_TTL_MS - 1),
        );
        let mut tx = db.begin().await?;
        record(&mut tx, &[&inside, &left, &stale]).await?;
        // An older passage of a person already recorded changes nothing.
        record(&mut tx, &[&passage("in1", "out", now - 20)]).await?;
        tx.commit().await?;

        let p = Presence::new(None);
        assert_eq!(p.restore(&db).await?, 2);
        assert!(!p.pass("t", "e", "in1", "in", now).await?, "a person inside before the restart entered again");
        assert!(!p.pass("t", "e", "out1", "out", now).await?);
        assert!(p.pass("t", "e", "old", "in", now).await?, "a day-old passage still counted");
        let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM gate_presence").fetch_one(db.pool()).await?;
        assert_eq!(left, 2, "the day-old passage was not pruned");
        db.close().await;
        test_db.drop().await
    }
}
