//! Writing children: server-side apply under one field manager, skipped when the live object
//! already has every field we want — so a reconcile of an unchanged world writes nothing, and a
//! manual edit of one of our fields is reverted on the next reconcile.

use kube::{
    Api, Resource,
    api::{DeleteParams, ListParams, Patch, PatchParams},
};
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;

use crate::{context::Ctx, error::Result};

/// The field manager of every write the operator makes.
pub const FIELD_MANAGER: &str = "aigw-operator";

/// Whether `live` has every field of `want` with the same value. Objects may carry extra keys
/// (server defaults, other managers' fields); lists must match element by element.
pub fn contains(live: &Value, want: &Value) -> bool {
    match (live, want) {
        (Value::Object(l), Value::Object(w)) => w
            .iter()
            .all(|(k, wv)| l.get(k).is_some_and(|lv| contains(lv, wv))),
        (Value::Array(l), Value::Array(w)) => {
            l.len() == w.len() && l.iter().zip(w).all(|(lv, wv)| contains(lv, wv))
        }
        _ => live == want,
    }
}

/// Applies `desired` unless the live object already matches it; returns whether it wrote.
pub async fn apply<K>(ctx: &Ctx, api: &Api<K>, name: &str, desired: &K) -> Result<bool>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let live = api.get_opt(name).await?;
    apply_over(ctx, api, name, desired, live.as_ref()).await
}

/// [`apply`] when the caller has already read the live object (`None`: it does not exist).
pub async fn apply_over<K>(
    ctx: &Ctx,
    api: &Api<K>,
    name: &str,
    desired: &K,
    live: Option<&K>,
) -> Result<bool>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let want = serde_json::to_value(desired)?;
    if let Some(live) = live
        && contains(&serde_json::to_value(live)?, &want)
    {
        return Ok(false);
    }
    api.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&want),
    )
    .await?;
    ctx.count_write();
    Ok(true)
}

/// Applies each of `desired` over the live objects matching `selector`, read with one list; with
/// `prune`, deletes the listed objects not in `desired`. Returns how many objects it wrote.
pub async fn apply_set<K>(
    ctx: &Ctx,
    api: &Api<K>,
    selector: &str,
    desired: &[K],
    prune: bool,
) -> Result<usize>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let live = list(api, selector).await?;
    let mut wrote = apply_listed(ctx, api, &live, desired).await?;
    if prune {
        wrote += prune_listed(ctx, api, &live, desired).await?;
    }
    Ok(wrote)
}

/// The objects of `api` matching `selector`.
pub async fn list<K>(api: &Api<K>, selector: &str) -> Result<Vec<K>>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    Ok(api
        .list(&ListParams::default().labels(selector))
        .await?
        .items)
}

fn name_of<K: Resource>(o: &K) -> String {
    o.meta().name.clone().unwrap_or_default()
}

/// Applies each of `desired` over its copy in `live` (an earlier list). Returns the writes.
pub async fn apply_listed<K>(ctx: &Ctx, api: &Api<K>, live: &[K], desired: &[K]) -> Result<usize>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let mut wrote = 0;
    for want in desired {
        let name = name_of(want);
        let current = live.iter().find(|l| name_of(*l) == name);
        if apply_over(ctx, api, &name, want, current).await? {
            wrote += 1;
        }
    }
    Ok(wrote)
}

/// Deletes the objects of `live` (an earlier list) that are not in `desired`. Returns the writes.
pub async fn prune_listed<K>(ctx: &Ctx, api: &Api<K>, live: &[K], desired: &[K]) -> Result<usize>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let mut wrote = 0;
    for obj in live {
        let name = name_of(obj);
        if !desired.iter().any(|d| name_of(d) == name) && obj.meta().deletion_timestamp.is_none() {
            api.delete(&name, &DeleteParams::background()).await?;
            ctx.count_write();
            wrote += 1;
        }
    }
    Ok(wrote)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::contains;

    #[test]
    fn contains_ignores_extra_fields_but_not_changed_ones() {
        let live = json!({"metadata": {"name": "a", "uid": "x", "labels": {"k": "v", "other": "1"}},
                          "spec": {"list": [{"a": 1, "b": 2}], "n": 3}});
        assert!(contains(
            &live,
            &json!({"metadata": {"labels": {"k": "v"}}, "spec": {"list": [{"a": 1}]}})
        ));
        assert!(!contains(&live, &json!({"spec": {"n": 4}})));
        assert!(
            !contains(&live, &json!({"spec": {"list": [{"a": 1}, {"a": 2}]}})),
            "list length"
        );
        assert!(!contains(&live, &json!({"spec": {"missing": true}})));
    }
}
