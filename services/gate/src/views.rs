//! Per-replica views a decision reads (a gate, its rules, what its estate
//! accepts), loaded from the database once however many decisions ask at
//! the same time, and refreshed ahead of their expiry.
//!
//! Until session 20 every decision that found its gate's view expired
//! loaded it itself: at 5,000 decisions/s, each expiry (every
//! `facts_ttl_secs`) sent about a hundred decisions to the database at once,
//! three queries each, and those arriving while the pool was busy with them
//! joined the crowd (BENCHMARKS.md, gate, session 20). Now:
//! - a view younger than its refresh age (drawn for each load between half
//!   and nine tenths of the time to live) is used as is;
//! - an older one that is still within it is used too, and the decision
//!   that finds it so (with nobody refreshing it) starts a reload in a task
//!   of its own, without waiting for it; if that fails, the old view is
//!   still used until it expires (until session 25 that decision waited for
//!   the reload's three queries: with 1,000 deciding gates, a wave of slow
//!   decisions at three quarters of every time to live, when all were
//!   refreshed at that age);
//! - a missing or expired view is loaded by one decision while the others
//!   asking for it wait for that load, and then use it;
//! - [`ViewCache::forget`] (a change to the gate or its rules) drops the
//!   view, and a load that began before it is not stored (it may have read
//!   the old state).

use estate_core::Result;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// Views by key, each valid for `ttl` after it was read.
#[derive(Debug)]
pub(crate) struct ViewCache<K, V> {
    ttl: Duration,
    slots: RwLock<HashMap<K, Slot<V>>>,
}

#[derive(Debug)]
struct Slot<V> {
    /// The view, when its load began, and the age from which it is
    /// refreshed.
    view: Option<(Arc<V>, Instant, Duration)>,
    /// Held by the decision loading or refreshing the view.
    loading: Arc<Mutex<()>>,
    /// Bumped by [`ViewCache::forget`]: a load that began under an older
    /// generation is not stored.
    generation: u64,
}

impl<V> Slot<V> {
    /// The view and whether it is due a refresh, unless there is none or it
    /// is `ttl` old.
    fn unexpired(&self, ttl: Duration) -> Option<(&Arc<V>, bool)> {
        let (view, at, refresh_from) = self.view.as_ref()?;
        let age = at.elapsed();
        (age < ttl).then_some((view, age >= *refresh_from))
    }
}

/// What a caller does with what it found.
enum Plan<V> {
    Use(Arc<V>),
    /// Use `stale`, and reload in the background while holding the slot's
    /// turn.
    Refresh {
        turn: tokio::sync::OwnedMutexGuard<()>,
        stale: Arc<V>,
        generation: u64,
    },
    /// Wait for the slot's turn, then use what the holder loaded or load.
    Wait(Arc<Mutex<()>>),
}

impl<K, V> ViewCache<K, V>
where
    K: Eq + Hash + Clone + Send + Sync + 'static,
    V: Send + Sync + 'static,
{
    pub(crate) fn new(ttl: Duration) -> Self {
        Self { ttl, slots: RwLock::default() }
    }

    /// The view of `key`, from `load` when it must be (re)read. `load` is
    /// called only then, so what it captures is cloned only then.
    pub(crate) async fn get<F, Fut>(self: &Arc<Self>, key: &K, load: F) -> Result<Arc<V>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V>> + Send + 'static,
    {
        let plan = match self.plan(key) {
            Some(plan) => plan,
            None => Plan::Wait(self.slot_lock(key)),
        };
        match plan {
            Plan::Use(view) => Ok(view),
            Plan::Refresh { turn, stale, generation } => {
                let (cache, key, loading) = (self.clone(), key.clone(), load());
                tokio::spawn(async move {
                    let began = Instant::now();
                    match loading.await {
                        Ok(view) => {
                            cache.store(&key, view, began, generation);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "gate view not refreshed; using the one read earlier until it expires");
                        }
                    }
                    drop(turn);
                });
                Ok(stale)
            }
            Plan::Wait(lock) => {
                let _turn = lock.lock_owned().await;
                let generation = {
                    let slots = self.read();
                    match slots.get(key) {
                        Some(slot) => {
                            // Loaded while this caller waited.
                            if let Some((view, _)) = slot.unexpired(self.ttl) {
                                return Ok(view.clone());
                            }
                            slot.generation
                        }
                        None => 0,
                    }
                };
                let began = Instant::now();
                match load().await {
                    Ok(view) => Ok(self.store(key, view, began, generation)),
                    Err(e) => {
                        self.drop_empty(key);
                        Err(e)
                    }
                }
            }
        }
    }

    /// Drops the view of `key`; loads under way are not stored.
    pub(crate) fn forget(&self, key: &K) {
        let mut slots = self.write();
        if let Some(slot) = slots.get_mut(key) {
            slot.view = None;
            slot.generation += 1;
        }
    }

    /// What to do, from the slot as it is now; `None` when there is no slot.
    fn plan(&self, key: &K) -> Option<Plan<V>> {
        let slots = self.read();
        let slot = slots.get(key)?;
        Some(match slot.unexpired(self.ttl) {
            Some((view, due)) => {
                if !due {
                    Plan::Use(view.clone())
                } else {
                    match slot.loading.clone().try_lock_owned() {
                        Ok(turn) => Plan::Refresh { turn, stale: view.clone(), generation: slot.generation },
                        // Someone is refreshing or loading it already.
                        Err(_) => Plan::Use(view.clone()),
                    }
                }
            }
            None => Plan::Wait(slot.loading.clone()),
        })
    }

    /// The turn lock of `key`'s slot, made if there is none.
    fn slot_lock(&self, key: &K) -> Arc<Mutex<()>> {
        let mut slots = self.write();
        slots
            .entry(key.clone())
            .or_insert_with(|| Slot { view: None, loading: Arc::default(), generation: 0 })
            .loading
            .clone()
    }

    /// Stores `view`, read from `began`, unless the slot was forgotten
    /// since `generation`; returns it either way.
    fn store(&self, key: &K, view: V, began: Instant, generation: u64) -> Arc<V> {
        let view = Arc::new(view);
        let mut slots = self.write();
        let slot = slots.entry(key.clone()).or_insert_with(|| Slot { view: None, loading: Arc::default(), generation });
        if slot.generation == generation {
            slot.view = Some((view.clone(), began, refresh_age(self.ttl)));
        }
        view
    }

    /// Removes `key`'s slot when it holds no view (a failed first load: a
    /// caller naming gates that do not exist leaves nothing behind).
    fn drop_empty(&self, key: &K) {
        let mut slots = self.write();
        if slots.get(key).is_some_and(|s| s.view.is_none()) {
            slots.remove(key);
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<K, Slot<V>>> {
        self.slots.read().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<K, Slot<V>>> {
        self.slots.write().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The age from which a view of `ttl` is refreshed: drawn between half and
/// nine tenths of it, so that views loaded together (a replica's first
/// decisions from 1,000 gates) are not all refreshed together ever after.
fn refresh_age(ttl: Duration) -> Duration {
    use std::hash::{BuildHasher, RandomState};
    // Each RandomState is keyed afresh: a cheap draw, not a secret.
    let draw = RandomState::new().hash_one(Instant::now()) % 1_000;
    ttl.mul_f64(0.5 + 0.4 * draw as f64 / 1_000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use estate_core::Error;
    use std::sync::atomic::{AtomicUsize, Ordering};

    type Cache = ViewCache<&'static str, usize>;

    /// A spawned caller's answer.
    fn joined<T>(r: std::result::Result<Result<T>, tokio::task::JoinError>) -> Result<T> {
        r.map_err(|e| Error::Internal(e.to_string()))?
    }

    /// What `n` callers arriving together get, each loading (if it must)
    /// with [`counted`] taking `ms`.
    async fn crowd(cache: &Arc<Cache>, loads: &Arc<AtomicUsize>, n: usize, ms: u64) -> Result<Vec<usize>> {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let (cache, loads) = (cache.clone(), loads.clone());
                tokio::spawn(async move { cache.get(&"g", || counted(loads, ms)).await })
            })
            .collect();
        let mut seen = Vec::new();
        for t in tasks {
            seen.push(*joined(t.await)?);
        }
        Ok(seen)
    }

    /// A load that counts itself and takes `ms`, answering the count.
    async fn counted(loads: Arc<AtomicUsize>, ms: u64) -> Result<usize> {
        let n = loads.fetch_add(1, Ordering::SeqCst) + 1;
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Ok(n)
    }

    #[tokio::test]
    async fn callers_arriving_together_share_one_load() -> Result<()> {
        let cache = Arc::new(Cache::new(Duration::from_secs(60)));
        let loads = Arc::new(AtomicUsize::new(0));
        assert!(crowd(&cache, &loads, 50, 20).await?.iter().all(|&v| v == 1));
        assert_eq!(loads.load(Ordering::SeqCst), 1);
        Ok(())
    }

    #[tokio::test]
    async fn an_expired_view_is_loaded_once_by_the_callers_that_find_it_so() -> Result<()> {
        let cache = Arc::new(Cache::new(Duration::from_millis(300)));
        let loads = Arc::new(AtomicUsize::new(0));
        assert_eq!(*cache.get(&"g", || counted(loads.clone(), 0)).await?, 1);
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(crowd(&cache, &loads, 20, 10).await?.iter().all(|&v| v == 2));
        assert_eq!(loads.load(Ordering::SeqCst), 2);
        Ok(())
    }

    #[tokio::test]
    async fn a_view_near_expiry_is_refreshed_in_the_background_while_callers_use_it() -> Result<()> {
        let cache = Arc::new(Cache::new(Duration::from_secs(2)));
        let loads = Arc::new(AtomicUsize::new(0));
        assert_eq!(*cache.get(&"g", || counted(loads.clone(), 0)).await?, 1);
        // Past its refresh age (at most nine tenths of its life), not expired.
        tokio::time::sleep(Duration::from_millis(1850)).await;
        // The caller that finds it so starts a reload (taking 50 ms) and is
        // answered with the view it has, without waiting for the reload.
        assert_eq!(*cache.get(&"g", || counted(loads.clone(), 50)).await?, 1);
        // While it reloads, others get the old view too and load nothing.
        assert_eq!(*cache.get(&"g", || counted(loads.clone(), 0)).await?, 1);
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(*cache.get(&"g", || counted(loads.clone(), 0)).await?, 2, "the reloaded view");
        assert_eq!(loads.load(Ordering::SeqCst), 2);
        Ok(())
    }

    #[tokio::test]
    async fn a_failed_refresh_keeps_the_old_view_until_it_expires() -> Result<()> {
        let cache = Arc::new(Cache::new(Duration::from_secs(2)));
        let loads = Arc::new(AtomicUsize::new(0));
        assert_eq!(*cache.get(&"g", || counted(loads.clone(), 0)).await?, 1);
        tokio::time::sleep(Duration::from_millis(1850)).await;
        let kept = cache.get(&"g", || async { Err(Error::Unavailable("database down".into())) }).await;
        assert_eq!(*kept?, 1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let expired = cache.get(&"g", || async { Err(Error::Unavailable("database down".into())) }).await;
        assert!(expired.is_err(), "an expired view is not used");
        Ok(())
    }

    #[tokio::test]
    async fn a_load_begun_before_a_forget_is_not_kept() -> Result<()> {
        let cache = Arc::new(Cache::new(Duration::from_secs(60)));
        let loads = Arc::new(AtomicUsize::new(0));
        let early = {
            let (cache, loads) = (cache.clone(), loads.clone());
            tokio::spawn(async move { cache.get(&"g", || counted(loads.clone(), 50)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        cache.forget(&"g");
        assert_eq!(*joined(early.await)?, 1);
        assert_eq!(*cache.get(&"g", || counted(loads.clone(), 0)).await?, 2, "read again");
        Ok(())
    }

    #[tokio::test]
    async fn a_failed_first_load_leaves_nothing_behind() -> Result<()> {
        let cache = Arc::new(Cache::new(Duration::from_secs(60)));
        let r = cache.get(&"nope", || async { Err(Error::NotFound("gate")) }).await;
        assert!(r.is_err());
        assert!(cache.read().is_empty());
        Ok(())
    }

    #[test]
    fn refresh_ages_are_spread_between_half_and_nine_tenths_of_the_time_to_live() {
        let ttl = Duration::from_secs(10);
        let ages: Vec<Duration> = (0..1_000).map(|_| refresh_age(ttl)).collect();
        assert!(ages.iter().all(|a| *a >= ttl / 2 && *a < ttl.mul_f64(0.9)), "out of bounds");
        let early = ages.iter().filter(|a| **a < ttl.mul_f64(0.7)).count();
        assert!((300..700).contains(&early), "{early} of 1,000 in the first half of the range");
    }
}
