//! Requests admitted but never reported (`aigw_common::quota::PENDING`): authz records each admitted
//! request's usage event, with its admission estimate, for as long as its reservation lasts. The
//! worker forgets an event once it bills it; [`sweep`] hands every event still pending after its
//! reservation expired to the usage topic, so a served request whose report was lost (plugin
//! crash, ingest down past the plugin's retries, a gateway restart) is billed at its estimate
//! instead of not at all. The swept event carries the request's own id, so a report that does
//! arrive later is not billed again: only what it used beyond the estimate is, as a correction
//! (`<id>#late`, see `worker::late_correction`); the request is billed once either way.

use std::time::Duration;

use aigw_common::{
    quota::{EXPIRED_PENDING, FORGET_PENDING, PendingKeys},
    shutdown::Shutdown,
};
use aigw_plugin_core::UsageEvent;
use anyhow::Context as _;
use prometheus_client::{metrics::counter::Counter, registry::Registry};
use rdkafka::producer::{FutureProducer, FutureRecord};

/// Appends the commands that forget pending events (they have been billed, or handed on) to
/// `pipe`: `FORGET_PENDING` by its digest, 500 ids a call. `pipe` must load the script first
/// ([`load_forget`]); Redis runs a pipeline's commands in order.
pub fn forget_into(pipe: &mut redis::Pipeline, keys: &PendingKeys, ids: &[&str]) {
    let sha = redis::Script::new(FORGET_PENDING).get_hash().to_owned();
    for chunk in ids.chunks(500) {
        pipe.cmd("EVALSHA")
            .arg(&sha)
            .arg(3)
            .arg(&keys.set)
            .arg(&keys.events)
            .arg(&keys.grants)
            .arg(chunk);
    }
}

/// Loads `FORGET_PENDING` at this point of `pipe` (its answer ignored).
pub fn load_forget(pipe: &mut redis::Pipeline) {
    pipe.cmd("SCRIPT").arg("LOAD").arg(FORGET_PENDING).ignore();
}

/// Forgets pending events, in one round trip.
pub async fn forget<'a, C>(
    conn: &mut C,
    keys: &PendingKeys,
    ids: impl Iterator<Item = &'a str>,
) -> anyhow::Result<()>
where
    C: redis::aio::ConnectionLike + Send,
{
    let ids: Vec<&str> = ids.collect();
    if ids.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    load_forget(&mut pipe);
    forget_into(&mut pipe, keys, &ids);
    pipe.query_async::<()>(conn).await?;
    Ok(())
}

/// Sweep settings.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Where authz records admitted requests.
    pub keys: PendingKeys,
    /// Usage topic the swept events go to.
    pub topic: String,
    /// How long after its reservation expired an event is swept (a late report still wins).
    pub grace: Duration,
    /// How often to sweep.
    pub every: Duration,
    /// Most events per sweep.
    pub batch: usize,
}

/// Sweep metrics.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    pub swept: Counter,
    pub malformed: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "pending_swept",
            "Admitted requests never reported, billed at their admission estimate",
            m.swept.clone(),
        );
        registry.register(
            "pending_malformed",
            "Pending records that could not be read (dropped, logged)",
            m.malformed.clone(),
        );
        m
    }
}

/// One sweep: returns how many events it handed on.
pub async fn sweep_once(
    conn: &mut redis::aio::ConnectionManager,
    producer: &FutureProducer,
    settings: &Settings,
    metrics: &Metrics,
) -> anyhow::Result<usize> {
    let grace = i64::try_from(settings.grace.as_millis()).unwrap_or(i64::MAX);
    let flat: Vec<String> = redis::Script::new(EXPIRED_PENDING)
        .key(&settings.keys.set)
        .key(&settings.keys.events)
        .arg(grace)
        .arg(settings.batch)
        .invoke_async(conn)
        .await
        .context("read expired pending events")?;
    let now = chrono::Utc::now().timestamp_millis();
    let mut done = Vec::new();
    for pair in flat.chunks(2) {
        let [id, raw] = pair else { continue };
        let mut event = match UsageEvent::parse(raw.as_bytes()) {
            Ok(e) => e,
            Err(e) => {
                metrics.malformed.inc();
                tracing::error!(error = %e, id, "unreadable pending event dropped");
                done.push(id.as_str());
                continue;
            }
        };
        event.ended_at_ms = now.max(event.started_at_ms);
        let payload = serde_json::to_vec(&event)?;
        let key = event.dedupe_key();
        producer
            .send(
                FutureRecord::to(&settings.topic)
                    .key(&key)
                    .payload(&payload),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| anyhow::anyhow!("kafka did not take a swept event: {e}"))?;
        done.push(id.as_str());
    }
    // Only once Kafka has them: a crash before this sweeps them again (and the worker drops the
    // copies as duplicates).
    forget(conn, &settings.keys, done.iter().copied()).await?;
    let n = flat.len() / 2;
    metrics.swept.inc_by(u64::try_from(n).unwrap_or(0));
    Ok(n)
}

/// Sweeps every `settings.every` until `shutdown`.
pub async fn sweep(
    mut conn: redis::aio::ConnectionManager,
    producer: FutureProducer,
    settings: Settings,
    metrics: Metrics,
    shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            () = shutdown.wait() => return,
            () = tokio::time::sleep(settings.every) => {}
        }
        match sweep_once(&mut conn, &producer, &settings, &metrics).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                events = n,
                "billed requests that were never reported, at their estimate"
            ),
            Err(e) => tracing::warn!(error = format!("{e:#}"), "pending sweep failed; retrying"),
        }
    }
}
