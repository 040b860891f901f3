//! A paced trigger for the controller of a kind with many objects (Tokens: 100,000 at 10×).
//!
//! kube-runtime's controller puts every triggering event into its scheduler at once, and an object
//! whose reconcile asks to be looked at again stays there until then. At start every object is an
//! event, and every Token used to ask again within the hour, so the scheduler held an entry per
//! Token (about 0.7 KiB each with its map and delay queue) for the Token's whole life: the
//! largest part of the operator's memory after the objects themselves (`docs/benchmarks.md`).
//!
//! Here the watch fills the store as usual, but the controller is fed by [`Paced::feed`], which
//! lets at most [`WINDOW`] objects in ahead of the reconciles the controller has started. What is
//! waiting is held cheaply: a changed object as its name in a queue, a complete list (at start,
//! and after a re-list) as one pointer per object into the store. Changed objects go first, so a
//! new Token is not queued behind a start-up sweep of every other one. Instead of a requeue per
//! object, [`Paced::drive`] queues one slice of the store every [`RESYNC_TICK`], so every object is
//! looked at again every [`SLICES`] ticks (an hour), spread evenly over the hour. A slice is not
//! queued while a sweep still waits (at start, or when reconciles cannot keep up): the sweep
//! visits those objects anyway, and a slice pushed on top of it could reach an object whose own
//! write is still on its way to the store.

use std::{
    collections::{HashSet, VecDeque},
    future::Future,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::{Stream, StreamExt};
use kube::{
    Api, Resource,
    runtime::{
        WatchStreamExt,
        reflector::{ObjectRef, Store, store::Writer},
        watcher,
    },
};
use tokio::sync::Notify;

/// Objects let into the controller ahead of the reconciles it has started: two per concurrent
/// reconcile keeps every slot busy.
pub const WINDOW: u64 = 2 * crate::CONCURRENCY as u64;

/// How often one slice of the store is queued again: each second, so the resync is a steady
/// trickle (28 Tokens a second at 100,000) rather than a burst that delays other work.
pub const RESYNC_TICK: Duration = Duration::from_secs(1);

/// Slices in a full round: every object is reconciled again once every `SLICES × RESYNC_TICK`
/// (an hour).
pub const SLICES: u64 = 3600;

/// The longest a full window waits without any reconcile starting before it is opened again. An
/// object let in but deleted before the controller looked it up is never started, so its place
/// would otherwise stay taken.
pub const STALL: Duration = Duration::from_secs(1);

/// What waits to be let in.
struct Waiting<K: Resource> {
    /// Objects that changed, oldest first, each once.
    changed: VecDeque<ObjectRef<K>>,
    queued: HashSet<ObjectRef<K>>,
    /// A sweep over (part of) the store, in no particular order.
    sweep: Vec<Arc<K>>,
}

/// The shared state of one paced controller.
pub struct Paced<K: Resource> {
    waiting: Mutex<Waiting<K>>,
    /// Something was queued.
    queued: Notify,
    /// Reconciles started, of any object and for any reason.
    started: AtomicU64,
    /// A reconcile started.
    progress: Notify,
}

impl<K: Resource> std::fmt::Debug for Paced<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Paced")
            .field("started", &self.started.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
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
            }),
            queued: Notify::new(),
            started: AtomicU64::new(0),
            progress: Notify::new(),
        })
    }

    /// To be called as each reconcile starts.
    pub fn started(&self) {
        self.started.fetch_add(1, Ordering::AcqRel);
        self.progress.notify_one();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Waiting<K>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues an object that changed (once, however often it changes while it waits).
    pub fn changed(&self, obj: &K) {
        let mut key = ObjectRef::from_obj(obj);
        key.extra = kube::runtime::reflector::ObjectRefExtra::default();
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
        let mut w = self.lock();
        w.sweep = objects;
        drop(w);
        self.queued.notify_one();
    }

    /// Queues the objects of `objects` in resync slice `round`, unless a sweep still waits.
    pub fn resync(&self, objects: Vec<Arc<K>>, round: u64) {
        let mut w = self.lock();
        if !w.sweep.is_empty() {
            return;
        }
        w.sweep
            .extend(objects.into_iter().filter(|o| slice(&**o) == round));
        drop(w);
        self.queued.notify_one();
    }

    /// The next waiting object the store still has, changed objects first.
    fn next(&self, store: &Store<K>) -> Option<Arc<K>> {
        let mut w = self.lock();
        while let Some(key) = w.changed.pop_front() {
            w.queued.remove(&key);
            if let Some(obj) = store.get(&key) {
                return Some(obj);
            }
        }
        while let Some(old) = w.sweep.pop() {
            if let Some(obj) = store.get(&ObjectRef::from_obj(&*old)) {
                return Some(obj);
            }
        }
        None
    }

    /// The controller's trigger: waiting objects, at most [`WINDOW`] ahead of the reconciles
    /// started. Never ends.
    pub fn feed(
        self: Arc<Self>,
        store: Store<K>,
    ) -> impl Stream<Item = Result<K, watcher::Error>> + Send {
        futures::stream::unfold((self, store, 0_u64), |(me, store, mut let_in)| async move {
            loop {
                // Reconciles started for other reasons (a requeue) do not make room for more.
                let_in = let_in.max(me.started.load(Ordering::Acquire));
                if let_in >= me.started.load(Ordering::Acquire) + WINDOW {
                    if tokio::time::timeout(STALL, me.progress.notified())
                        .await
                        .is_err()
                    {
                        let_in = me.started.load(Ordering::Acquire);
                    }
                    continue;
                }
                if let Some(obj) = me.next(&store) {
                    let_in += 1;
                    return Some((Ok((*obj).clone()), (me, store, let_in)));
                }
                me.queued.notified().await;
            }
        })
    }

    /// Runs the watch of `api` into `writer`'s store (objects trimmed by `trim`) and queues what
    /// it sees: each changed object, the whole store after each complete list, and one slice of
    /// the store every [`RESYNC_TICK`]. Returns when `stop` resolves.
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
        let mut round = 0_u64;
        loop {
            tokio::select! {
                event = events.next() => match event {
                    Some(Ok(watcher::Event::Apply(obj))) => self.changed(&obj),
                    Some(Ok(watcher::Event::InitDone)) => self.sweep(store.state()),
                    // Deleted objects are gone from the store; the rest of a list is in it.
                    Some(Ok(_)) => {}
                    Some(Err(e)) => tracing::warn!(error = %e, "watch failed; retrying"),
                    None => return,
                },
                _ = tick.tick() => {
                    round = (round + 1) % SLICES;
                    self.resync(store.state(), round);
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
    async fn lets_in_a_window_ahead_of_the_reconciles_and_changed_objects_first() {
        let (store, mut writer) = reflector::store::<Token>();
        for i in 0..200 {
            writer.apply_watcher_event(&watcher::Event::Apply(token(&format!("t{i}"))));
        }
        let paced = Paced::<Token>::new();
        paced.sweep(store.state());
        let mut feed = std::pin::pin!(paced.clone().feed(store.clone()));

        let mut first = Vec::new();
        while let Some(Some(item)) = feed.next().now_or_never() {
            first.push(item);
        }
        assert_eq!(first.len() as u64, WINDOW, "a full window, then nothing");

        // A changed object waits for room, then goes before the rest of the sweep.
        writer.apply_watcher_event(&watcher::Event::Apply(token("fresh")));
        paced.changed(&token("fresh"));
        paced.changed(&token("fresh"));
        assert!(feed.next().now_or_never().is_none());
        paced.started();
        paced.started();
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

        // Nothing starts for longer than STALL (objects let in were deleted): the window opens.
        let waited = tokio::time::Instant::now();
        let more = feed.next().await.unwrap();
        assert!(more.is_ok());
        assert!(waited.elapsed() >= STALL);

        // An object gone from the store is skipped, not let in.
        let all: HashSet<String> = (0..200).map(|i| format!("t{i}")).collect();
        let mut seen: HashSet<String> = names(&first).into_iter().collect();
        seen.extend(names(&next[1..]));
        seen.extend(names(&[more]));
        assert_eq!(
            seen.len() as u64,
            WINDOW + 2,
            "each object of the sweep once"
        );
        let gone = all.difference(&seen).next().unwrap().clone();
        writer.apply_watcher_event(&watcher::Event::Delete(token(&gone)));
        let mut rest = Vec::new();
        while let Some(Some(item)) = feed.next().now_or_never() {
            rest.push(item);
            paced.started();
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
    fn a_slice_waits_while_a_sweep_is_still_queued() {
        let (store, mut writer) = reflector::store::<Token>();
        for i in 0..20_000 {
            writer.apply_watcher_event(&watcher::Event::Apply(token(&format!("t{i}"))));
        }
        let round = slice(&token("t0"));
        let in_round = store
            .state()
            .iter()
            .filter(|o| slice(&***o) == round)
            .count();
        assert!(in_round > 0);
        let paced = Paced::<Token>::new();
        paced.resync(store.state(), round);
        assert_eq!(paced.lock().sweep.len(), in_round);
        paced.resync(store.state(), round);
        assert_eq!(
            paced.lock().sweep.len(),
            in_round,
            "not queued again while one waits"
        );
        while paced.next(&store).is_some() {}
        paced.resync(store.state(), round);
        assert_eq!(paced.lock().sweep.len(), in_round);
    }
}
