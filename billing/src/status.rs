//! Writes billing's view of a token back to its Token CR: `status.usedQuota`, at most every
//! `interval` per token, and at once when the token has just used up its quota (the operator then
//! sets phase `Exhausted`, and authz refuses it). Runs beside the worker, fed over a channel, so a
//! slow apiserver never holds up billing; the numbers it writes come from Redis `used`, which the
//! worker's settle keeps exact, so a skipped or repeated write loses nothing. The status value only
//! ever grows ([`raise`]); billing is its only writer (the operator never applies it).

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use aigw_crds::Token;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tokio::sync::mpsc;

/// Field manager of billing's status writes.
pub const FIELD_MANAGER: &str = "aigw-billing";

/// A token's current usage, as the worker saw it after a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Used {
    pub token_id: u64,
    pub namespace: String,
    pub name: String,
    pub quota: i64,
    pub used: i64,
}

/// What to do with an update, given when this token was last written and with what value.
pub fn due(last: Option<(Instant, i64)>, u: &Used, now: Instant, interval: Duration) -> bool {
    let exhausted = u.quota >= 0 && u.used >= u.quota;
    match last {
        None => true,
        Some((_, value)) if value == u.used => false,
        Some((_, value)) if exhausted && !(u.quota >= 0 && value >= u.quota) => true,
        Some((at, _)) => now.duration_since(at) >= interval,
    }
}

/// Starts the writer; send updates into the returned channel. Updates a full channel cannot take
/// are dropped (the next batch carries the newer total anyway).
pub fn spawn(client: kube::Client, interval: Duration) -> mpsc::Sender<Used> {
    let (tx, mut rx) = mpsc::channel::<Used>(4096);
    tokio::spawn(async move {
        let mut last: HashMap<u64, (Instant, i64)> = HashMap::new();
        let mut waiting: HashMap<u64, Used> = HashMap::new();
        let mut tick = tokio::time::interval(interval.min(Duration::from_secs(1)));
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Some(u) => { waiting.insert(u.token_id, u); }
                    None => return,
                },
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let ready: Vec<Used> = waiting
                .values()
                .filter(|u| due(last.get(&u.token_id).copied(), u, now, interval))
                .cloned()
                .collect();
            for u in ready {
                waiting.remove(&u.token_id);
                let api: Api<Token> = Api::namespaced(client.clone(), &u.namespace);
                match raise(&api, &u).await {
                    Ok(()) => {
                        last.insert(u.token_id, (now, u.used));
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => {
                        // The CR is gone (or the mirror row is not a CR): nothing to show it on.
                        last.insert(u.token_id, (now, u.used));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, token = %u.name, namespace = %u.namespace, "token status not updated; will retry");
                        waiting.insert(u.token_id, u);
                    }
                }
            }
        }
    });
    tx
}

/// Raises the Token's `status.usedQuota` to `u.used`; never lowers it. The value the status shows
/// only grows: a lower number (Redis lost its counters, a replayed older total) is not written, and
/// the write carries the `resourceVersion` it compared against, so a concurrent writer's higher
/// value is never overwritten (a conflict is retried with the next update).
async fn raise(api: &Api<Token>, u: &Used) -> Result<(), kube::Error> {
    let live = api.get_status(&u.name).await?;
    let shown = live.status.as_ref().and_then(|s| s.used_quota).unwrap_or(0);
    if shown >= u.used {
        return Ok(());
    }
    let patch = json!({
        "metadata": {"resourceVersion": live.metadata.resource_version},
        "status": {"usedQuota": u.used},
    });
    api.patch_status(
        &u.name,
        &PatchParams::apply(FIELD_MANAGER),
        &Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn used(quota: i64, used: i64) -> Used {
        Used {
            token_id: 1,
            namespace: "ns".into(),
            name: "t".into(),
            quota,
            used,
        }
    }

    #[test]
    fn writes_at_a_bounded_rate_but_at_once_on_exhaustion() {
        let t0 = Instant::now();
        let every = Duration::from_secs(10);
        assert!(due(None, &used(100, 5), t0, every), "first sight");
        let last = Some((t0, 5));
        assert!(
            !due(last, &used(100, 5), t0 + every * 2, every),
            "unchanged"
        );
        assert!(
            !due(last, &used(100, 50), t0 + Duration::from_secs(3), every),
            "too soon"
        );
        assert!(
            due(last, &used(100, 50), t0 + every, every),
            "interval passed"
        );
        assert!(
            due(last, &used(100, 100), t0 + Duration::from_secs(1), every),
            "exhausted now"
        );
        let exhausted = Some((t0, 120));
        assert!(
            !due(
                exhausted,
                &used(100, 130),
                t0 + Duration::from_secs(1),
                every
            ),
            "already shown exhausted"
        );
        assert!(
            !due(
                last,
                &used(-1, 1_000_000),
                t0 + Duration::from_secs(1),
                every
            ),
            "unlimited"
        );
    }
}
