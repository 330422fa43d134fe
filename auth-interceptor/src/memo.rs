//! A bounded concurrent map for the caches read on every call (verified
//! tokens, the directory's answers, module switches), and [`Flights`], which
//! lets the callers that miss one key at the same time share one read.
//!
//! Every authenticated call reads two or three of these. A general-purpose
//! cache (moka, used before) records each read for its admission and
//! eviction policy, hashes with SipHash and runs its housekeeping on the
//! calling task: about 1,500 instructions per read in callgrind, and its
//! lock-free table was one of the largest user-space costs of a cached call
//! in `perf`. These caches need less: every entry carries its own deadline
//! (a token's `exp`, the moment a directory answer goes stale), their
//! callers check that deadline on every read, and the bound exists only to
//! keep memory finite. So a read is one hash, one read lock on one of
//! [`SHARDS`] shards and a clone of the value.
//!
//! **Bounded.** Each shard holds at most its share of the capacity. An
//! insert into a full shard first drops the entries whose deadline has
//! passed and, if none had, the one with the earliest deadline (a scan of
//! that shard, only when it is full of live entries), so the map never
//! holds more than its capacity and keeps what stays useful longest.
//! Entries that are past their deadline but not yet dropped cost memory
//! only, never an answer: the callers check the deadline.

use std::{
    collections::HashMap,
    future::Future,
    hash::{BuildHasher, Hash},
    sync::{Arc, Mutex, RwLock},
};

use foldhash::fast::RandomState;
use tokio::sync::OnceCell;

/// Shards per map (fewer for a smaller capacity): enough that two cores
/// rarely meet on one lock.
pub const SHARDS: usize = 16;

/// A bounded map whose entries carry their own deadline (see the module
/// docs).
pub struct Memo<K, V> {
    shards: Box<[RwLock<HashMap<K, V, RandomState>>]>,
    /// Picks the shard (its own seed, so a shard's keys are spread over its
    /// table as well as any other keys).
    hasher: RandomState,
    per_shard: usize,
}

impl<K: Hash + Eq + Clone, V: Clone> Memo<K, V> {
    /// A map holding at most `capacity` entries (at least one).
    pub fn new(capacity: usize) -> Self {
        let shards = SHARDS.min(capacity).max(1);
        Self {
            per_shard: (capacity / shards).max(1),
            shards: (0..shards)
                .map(|_| RwLock::new(HashMap::with_hasher(RandomState::default())))
                .collect(),
            hasher: RandomState::default(),
        }
    }

    fn shard(&self, key: &K) -> &RwLock<HashMap<K, V, RandomState>> {
        // The hash's high bits: the table inside uses the low ones.
        let hash = self.hasher.hash_one(key);
        &self.shards[(hash >> 32) as usize % self.shards.len()]
    }

    /// A clone of the value stored for `key`.
    pub fn get(&self, key: &K) -> Option<V> {
        read(self.shard(key)).get(key).cloned()
    }

    /// What `f` makes of the value stored for `key`, under the shard's read
    /// lock (for reading part of a value without cloning all of it).
    pub fn get_with<R>(&self, key: &K, f: impl FnOnce(&V) -> R) -> Option<R> {
        read(self.shard(key)).get(key).map(f)
    }

    /// Stores `value` for `key`, replacing any value it had. When the shard
    /// is full, first drops the entries whose `deadline` is not after `now`
    /// or, if there were none, the one with the earliest `deadline`.
    pub fn insert<D: Ord>(&self, key: K, value: V, now: D, deadline: impl Fn(&V) -> D) {
        let mut shard = write(self.shard(&key));
        if shard.len() >= self.per_shard && !shard.contains_key(&key) {
            shard.retain(|_, v| deadline(v) > now);
            if shard.len() >= self.per_shard {
                let earliest = shard
                    .iter()
                    .min_by(|(_, a), (_, b)| deadline(a).cmp(&deadline(b)))
                    .map(|(k, _)| k.clone());
                if let Some(earliest) = earliest {
                    shard.remove(&earliest);
                }
            }
        }
        shard.insert(key, value);
    }

    /// Forgets `key`.
    pub fn remove(&self, key: &K) {
        write(self.shard(key)).remove(key);
    }

    /// Entries stored, live or past their deadline.
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| read(s).len()).sum()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads in progress, by key: a caller that asks for a key whose read is
/// under way waits for that read's answer instead of starting its own.
///
/// If the caller running the read gives up (its call is cancelled), a
/// waiting caller takes the read over; the last caller out removes the
/// key, so a read every caller gave up on leaves nothing behind.
pub struct Flights<K, T> {
    running: Mutex<HashMap<K, Arc<OnceCell<T>>, RandomState>>,
}

impl<K, T> Default for Flights<K, T> {
    fn default() -> Self {
        Self {
            running: Mutex::new(HashMap::default()),
        }
    }
}

impl<K: Hash + Eq + Clone, T: Clone> Flights<K, T> {
    /// The answer of `read` for `key`, or of the read of `key` already
    /// running.
    pub async fn run<F, Fut>(&self, key: K, read: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let joined = {
            let mut running = lock(&self.running);
            let cell = running.entry(key.clone()).or_default().clone();
            Joined {
                flights: self,
                key,
                cell,
            }
        };
        joined.cell.get_or_init(read).await.clone()
    }

    /// True when no read is running.
    pub fn is_empty(&self) -> bool {
        lock(&self.running).is_empty()
    }
}

/// A caller's part in a read of [`Flights`].
struct Joined<'a, K: Hash + Eq, T> {
    flights: &'a Flights<K, T>,
    key: K,
    cell: Arc<OnceCell<T>>,
}

impl<K: Hash + Eq, T> Drop for Joined<'_, K, T> {
    fn drop(&mut self) {
        let mut running = lock(&self.flights.running);
        // Callers join under this lock, so the count is exact: 2 is the
        // map and this caller.
        let ours = running
            .get(&self.key)
            .is_some_and(|cell| Arc::ptr_eq(cell, &self.cell));
        if ours && (self.cell.initialized() || Arc::strong_count(&self.cell) == 2) {
            running.remove(&self.key);
        }
    }
}

// A panic while a shard was locked cannot leave a `HashMap` half-changed in
// a way that matters here (each operation is one map call), so a poisoned
// lock is used as it is rather than failing every later call.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stores_replaces_and_forgets() {
        let memo = Memo::new(100);
        assert_eq!(memo.get(&1), None);
        memo.insert(1, "a", 0, |_| 10);
        memo.insert(2, "b", 0, |_| 10);
        assert_eq!(memo.get(&1), Some("a"));
        memo.insert(1, "c", 0, |_| 10);
        assert_eq!(memo.get(&1), Some("c"));
        assert_eq!(memo.len(), 2);
        memo.remove(&1);
        assert_eq!(memo.get(&1), None);
        assert_eq!(memo.get(&2), Some("b"));
        assert_eq!(memo.len(), 1);
    }

    #[test]
    fn never_holds_more_than_its_capacity() {
        for capacity in [1, 5, 64, 100] {
            let memo = Memo::new(capacity);
            for key in 0..2_000u64 {
                // Deadlines all in the future: only the earliest-deadline
                // rule makes room.
                memo.insert(key, key, 0, |v| *v + 1);
                assert!(memo.len() <= capacity, "{} > {capacity}", memo.len());
            }
            assert!(memo.len() >= capacity / 2, "{} of {capacity}", memo.len());
        }
        let memo = Memo::new(64);
        for key in 0..10_000u64 {
            memo.insert(key, key, 0, |v| *v + 1);
        }
        // What is left is what stays useful longest: recent keys, whose
        // deadlines are the latest.
        assert_eq!(memo.get(&9_999), Some(9_999));
        assert_eq!(memo.get(&0), None);
    }

    #[test]
    fn a_full_shard_drops_what_is_past_its_deadline_first() {
        // One entry per shard: every insert of a new key into a used shard
        // finds it full.
        let memo = Memo::new(SHARDS);
        let mut expired = Vec::new();
        for key in 0..SHARDS as u64 * 8 {
            memo.insert(key, 5u64, 10u64, |v| *v);
            expired.push(key);
        }
        // Every entry is past its deadline (5 <= now 10): a live entry
        // replaces the expired one in its shard, whatever its deadline.
        // (Enough keys that every shard gets some.)
        for key in 1_000..1_000 + SHARDS as u64 * 64 {
            memo.insert(key, 11, 10, |v| *v);
        }
        assert!(memo.len() <= SHARDS);
        assert!(expired.iter().all(|k| memo.get(k).is_none()));
    }

    #[tokio::test]
    async fn callers_of_one_key_share_one_read_and_others_do_not() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let flights = Arc::new(Flights::<u64, u64>::default());
        let reads = Arc::new(AtomicUsize::new(0));
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let call = |key: u64| {
            let (flights, reads, gate) = (flights.clone(), reads.clone(), gate.clone());
            tokio::spawn(async move {
                flights
                    .run(key, || async {
                        reads.fetch_add(1, Ordering::SeqCst);
                        gate.acquire().await.unwrap().forget();
                        key * 10
                    })
                    .await
            })
        };
        let same: Vec<_> = (0..5).map(|_| call(1)).collect();
        let other = call(2);
        while reads.load(Ordering::SeqCst) < 2 {
            tokio::task::yield_now().await;
        }
        gate.add_permits(2);
        for answer in same {
            assert_eq!(answer.await.unwrap(), 10);
        }
        assert_eq!(other.await.unwrap(), 20);
        assert_eq!(reads.load(Ordering::SeqCst), 2, "one read per key");
        assert!(flights.is_empty());
    }

    #[test]
    fn replacing_a_key_in_a_full_shard_evicts_nothing() {
        let memo = Memo::new(SHARDS);
        for key in 0..SHARDS as u64 * 4 {
            memo.insert(key, key, 0, |v| *v + 1);
        }
        let kept: Vec<u64> = (0..SHARDS as u64 * 4)
            .filter(|k| memo.get(k).is_some())
            .collect();
        for &key in &kept {
            memo.insert(key, key, 0, |v| *v + 1);
        }
        assert!(kept.iter().all(|k| memo.get(k) == Some(*k)));
    }
}
