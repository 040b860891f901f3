//! A paced trigger for the controller of a kind with many objects (Tokens: 100,000 at 10×).
//!
//! kube-runtime's controller puts every triggering event into its scheduler at once, and an object
//! whose reconcile asks to be looked at again stays there until then. At start every object is an
//! event, and every Token used to ask again within the hour, so the scheduler held an entry per
//! Token (about 0.7 KiB each with its map and delay queue) for the Token's whole life: the
//! largest part of the operator's memory after the objects themselves (`docs/benchmarks.md`).
//!
//! Here the watch fills the store as usual, but the controller is fed by [`Paced::feed`], which
//! keeps at most [`WINDOW`] objects let in whose reconcile has not started yet. What is waiting
//! is held cheaply: a changed object as its name in a queue, a complete list (at start, and after
//! a re-list) as one pointer per object into the store (an object that changes while it waits
//! keeps its older copy alive until then). Changed objects go first, so a new Token is not queued
//! behind a start-up sweep of every other one. Instead of a requeue per object, [`Paced::drive`]
//! queues one slice of the store every [`RESYNC_TICK`], so every object is looked at again every
//! [`SLICES`] ticks (an hour), spread evenly over the hour. While a sweep still waits (at start,
//! or when reconciles cannot keep up) the due slices are held back and queued together once it
//! has drained: a slice pushed on top of a sweep could reach an object whose own write is still
//! on its way to the store.

use std::{
    collections::{HashSet, VecDeque},
    future::Future,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use futures::{Stream, StreamExt};
use kube::{
    Api, Resource,
    runtime::{
        WatchStreamExt,
        reflector::{ObjectRef, ObjectRefExtra, Store, store::Writer},
        watcher,
    },
};
use tokio::sync::Notify;

/// Objects let into the controller whose reconcile has not started yet: two per concurrent
/// reconcile keeps every slot busy.
pub const WINDOW: usize = 2 * crate::CONCURRENCY as usize;

/// How often one slice of the store is queued again: each second, so the resync is a steady
/// trickle (28 Tokens a second at 100,000) rather than a burst that delays other work.
pub const RESYNC_TICK: Duration = Duration::from_secs(1);

/// Slices in a full round: every object is reconciled again once every `SLICES × RESYNC_TICK`
/// (an hour).
pub const SLICES: u64 = 3600;

/// How long a full window waits for a reconcile to start before it checks whether the objects it
/// let in still exist: one deleted before the controller looked it up is never started.
pub const STALL: Duration = Duration::from_secs(1);

/// What waits to be let in, and what was let in.
struct Waiting<K: Resource> {
    /// Objects that changed, oldest first, each once.
    changed: VecDeque<ObjectRef<K>>,
    queued: HashSet<ObjectRef<K>>,
    /// A sweep over (part of) the store, in no particular order.
    sweep: Vec<Arc<K>>,
    /// Let in, reconcile not started.
    let_in: HashSet<ObjectRef<K>>,
}

/// The shared state of one paced controller.
pub struct Paced<K: Resource> {
    waiting: Mutex<Waiting<K>>,
    /// Something was queued.
    queued: Notify,
    /// A reconcile started.
    progress: Notify,
}

impl<K: Resource> std::fmt::Debug for Paced<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Paced").finish_non_exhaustive()
    }
}

/// `obj`'s name and namespace, without uid and `resourceVersion` (the scheduler keys by the first
/// two; the rest would only take memory).
fn key<K: Resource<DynamicType = ()>>(obj: &K) -> ObjectRef<K> {
    let mut key = ObjectRef::from_obj(obj);
    key.extra = ObjectRefExtra::default();
    key
}

impl<K> Paced<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            waiting: Mutex::new(Waiting {
                changed: VecDeque::new(),
                queued: HashSet::new(),
                sweep: Vec::new(),
                let_in: HashSet::new(),
            }),
            queued: Notify::new(),
            progress: Notify::new(),
        })
    }

    /// Frees `obj`'s place if it was let in: called as each reconcile starts (for any reason: a
    /// requeue of an object not let in makes no room), and when the object is deleted before its
    /// reconcile started.
    pub fn release(&self, obj: &K) {
        if self.lock().let_in.remove(&key(obj)) {
            self.progress.notify_one();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting<K>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues an object that changed (once, however often it changes while it waits).
    pub fn changed(&self, obj: &K) {
        let key = key(obj);
        let mut w = self.lock();
        if w.queued.insert(key.clone()) {
            w.changed.push_back(key);
        }
        drop(w);
        self.queued.notify_one();
    }

    /// Queues a sweep over all of `objects`, replacing the sweep still waiting (a complete list
    /// covers it).
    pub fn sweep(&self, objects: Vec<Arc<K>>) {
        self.lock().sweep = objects;
        self.queued.notify_one();
    }

    /// Whether a sweep still waits.
    fn sweeping(&self) -> bool {
        !self.lock().sweep.is_empty()
    }

    /// One resync tick: slice `round` is due, with the `due` slices before it not yet queued.
    /// Queues them all unless a sweep still waits; returns how many are still due.
    fn tick(&self, store: &Store<K>, round: u64, due: u64) -> u64 {
        let due = (due + 1).min(SLICES);
        if self.sweeping() {
            return due;
        }
        // Filtered outside the lock: the feed takes it too.
        let objects: Vec<Arc<K>> = store
            .state()
            .into_iter()
            .filter(|o| (round + SLICES - slice(&**o)) % SLICES < due)
            .collect();
        self.lock().sweep.extend(objects);
        self.queued.notify_one();
        0
    }

    /// The next waiting object the store still has, changed objects first; it counts as let in.
    /// `None` when nothing waits or the window is full.
    fn next(&self, store: &Store<K>) -> Option<Arc<K>> {
        let mut w = self.lock();
        if w.let_in.len() >= WINDOW {
            return None;
        }
        let mut found = None;
        while let Some(key) = w.changed.pop_front() {
            w.queued.remove(&key);
            if let Some(obj) = store.get(&key) {
                found = Some(obj);
                break;
            }
        }
        if found.is_none() {
            while let Some(old) = w.sweep.pop() {
                if let Some(obj) = store.get(&key(&*old)) {
                    found = Some(obj);
                    break;
                }
            }
        }
        if let Some(obj) = &found {
            w.let_in.insert(key(&**obj));
        }
        found
    }

    /// Forgets objects let in that the store no longer has (their reconcile never starts).
    fn forget_gone(&self, store: &Store<K>) {
        self.lock().let_in.retain(|k| store.get(k).is_some());
    }

    fn full(&self) -> bool {
        self.lock().let_in.len() >= WINDOW
    }

    /// The controller's trigger: waiting objects, at most [`WINDOW`] let in and not started.
    /// Never ends.
    pub fn feed(
        self: Arc<Self>,
        store: Store<K>,
    ) -> impl Stream<Item = Result<K, watcher::Error>> + Send {
        futures::stream::unfold((self, store), |(me, store)| async move {
            loop {
                if me.full() {
                    // Every slot busy (or hung): wait, whatever the time, unless objects let in
                    // are gone.
                    if tokio::time::timeout(STALL, me.progress.notified())
                        .await
                        .is_err()
                    {
                        me.forget_gone(&store);
                    }
                    continue;
                }
                if let Some(obj) = me.next(&store) {
                    // The controller keeps only the reference: without uid and resourceVersion.
                    let mut obj = (*obj).clone();
                    obj.meta_mut().uid = None;
                    obj.meta_mut().resource_version = None;
                    return Some((Ok(obj), (me, store)));
                }
                me.queued.notified().await;
            }
        })
    }

    /// Runs the watch of `api` into `writer`'s store (objects trimmed by `trim`) and queues what
    /// it sees: each changed object, the whole store after each complete list, and one slice of
    /// the store every [`RESYNC_TICK`] (held back while a sweep waits). Returns when `stop`
    /// resolves.
    pub async fn drive(
        self: Arc<Self>,
        api: Api<K>,
        cfg: watcher::Config,
        writer: Writer<K>,
        trim: fn(&mut K),
        stop: impl Future<Output = ()>,
    ) {
        let store = writer.as_reader();
        let events = watcher(api, cfg)
            .default_backoff()
            .modify(trim)
            .reflect(writer);
        let mut events = std::pin::pin!(events);
        let mut stop = std::pin::pin!(stop);
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + RESYNC_TICK, RESYNC_TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let (mut round, mut due) = (0_u64, 0_u64);
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(Ok(watcher::Event::Apply(obj))) => self.changed(&obj),
                    Some(Ok(watcher::Event::InitDone)) => {
                        // Everything is swept: no slice is due any more.
                        due = 0;
                        self.sweep(store.state());
                    }
                    // Gone from the store: if it was let in, its reconcile never starts.
                    Some(Ok(watcher::Event::Delete(obj))) => self.release(&obj),
                    // The rest of a list is in the store, and swept at its end.
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::warn!(error = %e, "watch failed; retrying"),
                    None => return,
                },
                _ = tick.tick() => {
                    round = (round + 1) % SLICES;
                    due = self.tick(&store, round, due);
                }
                () = &mut stop => return,
            }
        }
    }
}

/// The resync slice an object belongs to: FNV-1a of its namespace and name, so it is stable
/// while the operator runs and spreads objects evenly.
pub fn slice<K: Resource>(obj: &K) -> u64 {
    let meta = obj.meta();
    slice_of(
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
    )
}

fn slice_of(namespace: &str, name: &str) -> u64 {
    let bytes = namespace.bytes().chain([b'/']).chain(name.bytes());
    let hash = bytes.fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    hash % SLICES
}

#[cfg(test)]
mod tests {
    use super::*;
    use aigw_crds::Token;
    use futures::FutureExt;
    use kube::runtime::reflector;

    fn token(name: &str) -> Token {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "aigateway.io/v1alpha1", "kind": "Token",
            "metadata": {"name": name, "namespace": "aigw-acme"},
            "spec": {"owner": "a"}}))
        .unwrap()
    }

    fn names(items: &[Result<Token, watcher::Error>]) -> Vec<String> {
        items
            .iter()
            .map(|t| t.as_ref().unwrap().metadata.name.clone().unwrap())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn lets_in_a_window_of_objects_not_started_and_changed_objects_first() {
        let (store, mut writer) = reflector::store::<Token>();
        for i in 0..200 {
            writer.apply_watcher_event(&watcher::Event::Apply(token(&format!("t{i}"))));
        }
        let paced = Paced::<Token>::new();
        paced.sweep(store.state());
        let mut feed = std::pin::pin!(paced.clone().feed(store.clone()));

        let mut first = Vec::new();
        while let Some(Some(item)) = feed.next().now_or_never() {
            first.push(item.unwrap());
        }
        assert_eq!(first.len(), WINDOW, "a full window, then nothing");
        assert!(
            first[0].metadata.uid.is_none() && first[0].metadata.resource_version.is_none(),
            "the controller's reference is lean"
        );

        // A changed object waits for room, then goes before the rest of the sweep.
        writer.apply_watcher_event(&watcher::Event::Apply(token("fresh")));
        paced.changed(&token("fresh"));
        paced.changed(&token("fresh"));
        assert!(feed.next().now_or_never().is_none());
        // A reconcile of an object not let in (a requeue) makes no room.
        paced.release(&token("t-requeued"));
        assert!(feed.next().now_or_never().is_none());
        paced.release(&first[0]);
        paced.release(&first[1]);
        let next: Vec<_> = (0..2)
            .map(|_| feed.next().now_or_never().flatten().unwrap())
            .collect();
        assert_eq!(names(&next)[0], "fresh", "changed objects go first");
        assert_ne!(
            names(&next)[1],
            "fresh",
            "queued once however often it changed"
        );
        assert!(feed.next().now_or_never().is_none());

        // Reconciles that never start (hung): the window stays shut, however long.
        let hung = tokio::time::timeout(STALL * 30, feed.next()).await;
        assert!(hung.is_err(), "nothing let in while every slot hangs");

        // An object let in but deleted before the controller looked it up never starts: the
        // watch's delete event frees its place at once, and if that was missed, STALL does.
        let deleted = first[3].metadata.name.clone().unwrap();
        writer.apply_watcher_event(&watcher::Event::Delete(token(&deleted)));
        paced.release(&token(&deleted));
        let reclaimed = feed.next().now_or_never().flatten().unwrap();
        assert!(reclaimed.is_ok());
        let deleted = first[2].metadata.name.clone().unwrap();
        writer.apply_watcher_event(&watcher::Event::Delete(token(&deleted)));
        let waited = tokio::time::Instant::now();
        let more = feed.next().await.unwrap();
        assert!(more.is_ok());
        assert!(waited.elapsed() >= STALL);

        // An object gone from the store while it waits is skipped, not let in.
        let all: HashSet<String> = (0..200).map(|i| format!("t{i}")).collect();
        let mut seen: HashSet<String> = first
            .iter()
            .map(|t| t.metadata.name.clone().unwrap())
            .collect();
        seen.extend(names(&next[1..]));
        seen.extend(names(&[reclaimed, more]));
        assert_eq!(seen.len(), WINDOW + 3, "each object of the sweep once");
        let gone = all.difference(&seen).next().unwrap().clone();
        writer.apply_watcher_event(&watcher::Event::Delete(token(&gone)));
        for t in &first {
            paced.release(t);
        }
        paced.release(&token("fresh"));
        let mut rest = Vec::new();
        while let Some(Some(item)) = feed.next().now_or_never() {
            paced.release(item.as_ref().unwrap());
            rest.push(item);
        }
        let rest = names(&rest);
        assert_eq!(rest.len(), 200 - seen.len() - 1);
        assert!(!rest.contains(&gone));
    }

    #[test]
    fn slices_spread_objects_over_the_round() {
        let mut counts = vec![0_u32; usize::try_from(SLICES).unwrap()];
        for i in 0..SLICES * 1000 {
            let ns = format!("aigw-tenant-{}", i % 1000);
            counts[usize::try_from(slice_of(&ns, &format!("token-{i}"))).unwrap()] += 1;
        }
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert!(*min > 850 && *max < 1150, "{min}..{max}");
    }

    #[test]
    fn slices_due_while_a_sweep_waits_are_queued_once_it_has_drained() {
        let (store, mut writer) = reflector::store::<Token>();
        for i in 0..20_000 {
            writer.apply_watcher_event(&watcher::Event::Apply(token(&format!("t{i}"))));
        }
        let in_slice = |r: u64| store.state().iter().filter(|o| slice(&***o) == r).count();
        let paced = Paced::<Token>::new();
        let round = slice(&token("t0"));
        let r = |d: u64| (round + d) % SLICES;
        assert_eq!(paced.tick(&store, round, 0), 0);
        assert_eq!(paced.lock().sweep.len(), in_slice(round));
        // The sweep still waits: the next two slices are held back, not lost.
        assert_eq!(paced.tick(&store, r(1), 0), 1);
        assert_eq!(paced.tick(&store, r(2), 1), 2);
        assert_eq!(paced.lock().sweep.len(), in_slice(round));
        paced.lock().sweep.clear();
        assert_eq!(paced.tick(&store, r(3), 2), 0);
        let held: usize = (1..=3).map(|d| in_slice(r(d))).sum();
        assert!(held > 0);
        assert_eq!(paced.lock().sweep.len(), held);
        // Held back for a whole round: everything.
        paced.lock().sweep.clear();
        assert_eq!(paced.tick(&store, 7, SLICES + 5), 0);
        assert_eq!(paced.lock().sweep.len(), 20_000);
    }
}
