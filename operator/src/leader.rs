//! Leader election on a `coordination.k8s.io/v1` Lease, so two operator replicas never reconcile
//! at once. Writes use the Lease's `resourceVersion`, so two candidates cannot both win.
//!
//! Timing ([`Timing`], as client-go's leader election): the holder tries to renew every `retry`,
//! each try bounded by `retry`; a lease not renewed for `lease` may be taken over by another
//! candidate. The holder stops acting once it has not renewed for `renew_deadline`, which is well
//! under `lease`: it has stopped before anyone else may start (the margin covers clock drift and
//! a write in flight). The holder's [`Term`] says until when it may act; every reconcile and the
//! Higress sync check it first, so a leader that was paused (SIGSTOP, a long GC, a frozen VM)
//! does nothing when it wakes until it has renewed, rather than acting on a lease it lost.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use aigw_common::shutdown::Shutdown;

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{ObjectMeta, PostParams},
};

use crate::error::Result;

/// Leader-election timing.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a lease lasts without renewal (the Lease's `leaseDurationSeconds`).
    pub lease: Duration,
    /// How long the holder may go without renewing before it stops acting; < `lease`.
    pub renew_deadline: Duration,
    /// Time between tries, and the bound on each try.
    pub retry: Duration,
}

impl Timing {
    /// client-go's defaults scaled down: 15 s lease, 10 s renew deadline, 2 s retry.
    pub const DEFAULT: Self = Self {
        lease: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry: Duration::from_secs(2),
    };
}

/// Until when this replica may act. Cheap to clone; clones share the deadline.
#[derive(Debug, Clone, Default)]
pub struct Term {
    /// `None`: no election (a single replica), always acting.
    until: Arc<Mutex<Option<Instant>>>,
    elected: Arc<std::sync::atomic::AtomicBool>,
}

impl Term {
    /// Whether this replica may act now.
    pub fn valid(&self) -> bool {
        if !self.elected.load(std::sync::atomic::Ordering::Acquire) {
            return true;
        }
        let until = *self
            .until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        until.is_some_and(|u| Instant::now() < u)
    }

    /// Records a renewal that started at `started`: acting is allowed until `started + deadline`.
    fn renewed(&self, started: Instant, deadline: Duration) {
        *self
            .until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(started + deadline);
        self.elected
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Ends the term at once.
    fn end(&self) {
        *self
            .until
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = None;
        self.elected
            .store(true, std::sync::atomic::Ordering::Release);
    }
}

/// Waits until `elector` holds the lease (then `term` is valid); false if `shutdown` came first.
pub async fn acquire(elector: &Elector, timing: Timing, term: &Term, shutdown: &Shutdown) -> bool {
    loop {
        let started = Instant::now();
        match tokio::time::timeout(timing.retry, elector.try_acquire()).await {
            Ok(Ok(true)) => {
                term.renewed(started, timing.renew_deadline);
                return true;
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "leader election failed; retrying"),
            Err(_) => tracing::warn!("leader election timed out; retrying"),
        }
        tokio::select! {
            () = tokio::time::sleep(timing.retry) => {}
            () = shutdown.wait() => return false,
        }
    }
}

/// Keeps renewing the lease. When a renewal finds another holder, or none has succeeded for
/// `renew_deadline`, the term ends and `shutdown` is triggered (the process exits and its
/// supervisor restarts it as a candidate).
pub async fn hold(elector: Elector, timing: Timing, term: Term, shutdown: Shutdown) {
    let mut last_ok = Instant::now();
    loop {
        tokio::select! {
            () = tokio::time::sleep(timing.retry) => {}
            () = shutdown.wait() => return,
        }
        let started = Instant::now();
        match tokio::time::timeout(timing.retry, elector.try_acquire()).await {
            Ok(Ok(true)) => {
                last_ok = started;
                term.renewed(started, timing.renew_deadline);
            }
            Ok(Ok(false)) => {
                term.end();
                tracing::error!("lost the leader lease; stopping");
                shutdown.trigger();
                return;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "renewing the leader lease failed"),
            Err(_) => tracing::warn!("renewing the leader lease timed out"),
        }
        if last_ok.elapsed() >= timing.renew_deadline {
            term.end();
            tracing::error!(
                deadline_s = timing.renew_deadline.as_secs_f64(),
                "could not renew the leader lease within the renew deadline; stopping"
            );
            shutdown.trigger();
            return;
        }
    }
}

/// One candidate for the lease.
#[derive(Debug, Clone)]
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    /// The other holder's (identity, renew time) as last seen, and when this candidate first saw
    /// it. A lease counts as expired only once it has stayed unchanged for a whole lease duration
    /// on *this* candidate's monotonic clock (as client-go does), so clock skew between nodes
    /// cannot shorten the holder's term.
    observed: Arc<Mutex<Option<(String, String, Instant)>>>,
}

impl Elector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
            observed: Arc::default(),
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Tries once to take or renew the lease; returns whether this candidate holds it now.
    pub async fn try_acquire(&self) -> Result<bool> {
        let now = Timestamp::now();
        let secs = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e.into()),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let mine = spec.holder_identity.as_deref() == Some(self.identity.as_str());
        let held_by_other = !mine
            && spec
                .holder_identity
                .as_deref()
                .is_some_and(|h| !h.is_empty());
        let expired = held_by_other && {
            let holder = spec.holder_identity.clone().unwrap_or_default();
            let renewed = spec
                .renew_time
                .as_ref()
                .map(|t| t.0.to_string())
                .unwrap_or_default();
            let ttl = Duration::from_secs(
                u64::try_from(spec.lease_duration_seconds.unwrap_or(secs)).unwrap_or(0),
            );
            let mut seen = self
                .observed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match &*seen {
                Some((h, r, at)) if *h == holder && *r == renewed => at.elapsed() >= ttl,
                _ => {
                    *seen = Some((holder, renewed, Instant::now()));
                    false
                }
            }
        };
        if held_by_other && !expired {
            return Ok(false);
        }
        let mut next = lease;
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        next.spec = Some(LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(secs),
            acquire_time: if mine {
                spec.acquire_time
            } else {
                Some(MicroTime(now))
            },
            renew_time: Some(MicroTime(now)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        });
        // `replace` carries the resourceVersion we read: a concurrent candidate makes it fail.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Gives the lease up (on shutdown) so another replica takes over at once.
    pub async fn release(&self) -> Result<()> {
        if let Some(mut lease) = self.api.get_opt(&self.name).await? {
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() == Some(self.identity.as_str()) {
                spec.holder_identity = None;
                spec.renew_time = None;
                match self
                    .api
                    .replace(&self.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) | Err(kube::Error::Api(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }
}
