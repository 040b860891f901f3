//! Platform-only functions (the seed's `*` rows): upstream channels (Channel CRs and the Secrets
//! holding their keys, which are write-only here) and monitoring. Every handler needs a
//! [`PlatformScope`], which only a platform caller with `All` access has.

use std::collections::BTreeMap;

use aigw_crds::{Channel, ChannelSpec, SecretKeyRef, labels};
use axum::{
    Extension,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use k8s_openapi::{
    ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use kube::{
    Resource, ResourceExt,
    api::{DeleteParams, ListParams, Patch, PatchParams, PostParams},
};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::{
    ApiError, List, Page,
    backend::Backend,
    body, check_if_match, cursor,
    error::kube_error,
    gitops_managed, json, refuse_gitops,
    scope::{Authorized, PlatformScope},
};

/// The key in a channel Secret the API writes.
const SECRET_KEY: &str = "apiKey";

fn platform(auth: &Authorized) -> Result<&PlatformScope, ApiError> {
    auth.platform()
        .ok_or_else(|| ApiError::Forbidden("platform staff only".into()))
}

/// A channel as the API shows it (never its keys).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChannelView {
    pub name: String,
    /// The ai-proxy provider type (`openai`, `claude`, …).
    pub provider: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    pub models: Vec<String>,
    pub model_mapping: BTreeMap<String, String>,
    pub priority: i32,
    pub weight: i32,
    pub max_retry: i32,
    pub disabled: bool,
    /// Number of keys the operator found in the Secret.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_count: Option<i32>,
    /// The `Ready` condition's status and reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub gitops: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

fn view(c: &Channel) -> ChannelView {
    let ready = c
        .status
        .as_ref()
        .and_then(|s| s.common.conditions.iter().find(|c| c.type_ == "Ready"));
    ChannelView {
        name: c.name_any(),
        provider: c.spec.provider.as_str().to_owned(),
        base_url: c.spec.base_url.clone(),
        models: c.spec.models.clone(),
        model_mapping: c.spec.model_mapping.clone(),
        priority: c.spec.priority,
        weight: c.spec.weight,
        max_retry: c.spec.max_retry,
        disabled: c.spec.disabled,
        key_count: c.status.as_ref().and_then(|s| s.key_count),
        ready: ready.map(|r| r.status.clone()),
        reason: ready.map(|r| r.reason.clone()),
        gitops: gitops_managed(&c.metadata),
        etag: c.metadata.resource_version.clone(),
    }
}

/// A new channel, or changes to one (absent fields stay; `apiKey` replaces the keys).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChannelInput {
    /// Create only: a DNS label of at most 48 characters.
    #[schema(max_length = 48, pattern = "^[a-z0-9]([-a-z0-9]{0,46}[a-z0-9])?$")]
    pub name: Option<String>,
    #[schema(value_type = Option<String>, example = "openai")]
    pub provider: Option<aigw_crds::Provider>,
    #[schema(max_length = 512)]
    pub base_url: Option<String>,
    pub models: Option<Vec<String>>,
    pub model_mapping: Option<BTreeMap<String, String>>,
    #[schema(minimum = 0, maximum = 1000)]
    pub priority: Option<i32>,
    #[schema(minimum = 1, maximum = 100)]
    pub weight: Option<i32>,
    #[schema(minimum = 0, maximum = 10)]
    pub max_retry: Option<i32>,
    pub disabled: Option<bool>,
    /// Write-only: the upstream key(s), several separated by commas or newlines. Required on
    /// create. Stored in a Secret of the credentials namespace; never shown again.
    #[schema(write_only, max_length = 65536)]
    pub api_key: Option<String>,
}

fn secret_name(channel: &str) -> String {
    format!("aigw-channel-{channel}")
}

/// Writes the channel's key Secret (owned by the channel, so it goes when the channel goes).
async fn write_key(
    backend: &Backend,
    p: &PlatformScope,
    channel: &Channel,
    key: &str,
) -> Result<(), ApiError> {
    if key.trim().is_empty() {
        return Err(ApiError::Unprocessable("apiKey is empty".into()));
    }
    let (secrets, _) = backend.credentials(p);
    let name = secret_name(&channel.name_any());
    let owner = OwnerReference {
        api_version: Channel::api_version(&()).into_owned(),
        kind: Channel::kind(&()).into_owned(),
        name: channel.name_any(),
        uid: channel.metadata.uid.clone().unwrap_or_default(),
        ..OwnerReference::default()
    };
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.clone()),
            labels: Some(BTreeMap::from([(
                labels::MANAGED_BY.to_owned(),
                aigw_crds::MANAGED_BY.to_owned(),
            )])),
            owner_references: Some(vec![owner]),
            ..kube::api::ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            SECRET_KEY.to_owned(),
            ByteString(key.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    };
    secrets
        .patch(
            &name,
            &PatchParams::apply("aigw-apiserver").force(),
            &Patch::Apply(&serde_json::json!({
                "apiVersion": "v1", "kind": "Secret",
                "metadata": secret.metadata, "data": secret.data,
            })),
        )
        .await
        .map_err(|e| kube_error("channel key", e))?;
    Ok(())
}

#[utoipa::path(get, path = "/api/v1/channels", tag = "channels", params(Page),
    responses((status = 200, description = "Channels, by name", body = List<ChannelView>),
        (status = 403, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn list_channels(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    Query(page): Query<Page>,
) -> Result<Response, ApiError> {
    let p = platform(&auth)?;
    let limit = page.limit()? as usize;
    let after = page.after()?;
    let mut all: Vec<Channel> = backend
        .channels(p)
        .list(&instance_params(&backend))
        .await
        .map_err(|e| kube_error("channels", e))?
        .items
        .into_iter()
        .filter(|c| c.name_any().as_str() > after.as_str())
        .collect();
    all.sort_by_key(ResourceExt::name_any);
    let more = all.len() > limit;
    all.truncate(limit);
    let items: Vec<ChannelView> = all.iter().map(view).collect();
    let next_cursor = more
        .then(|| items.last().map(|c| cursor(&c.name)))
        .flatten();
    Ok(json(StatusCode::OK, None, &List { items, next_cursor }))
}

fn instance_params(backend: &Backend) -> ListParams {
    ListParams::default().labels(&aigw_crds::instance_selector(backend.instance()))
}

/// The channel `name` if it is one this apiserver serves (its instance).
async fn channel(backend: &Backend, p: &PlatformScope, name: &str) -> Result<Channel, ApiError> {
    super::object_name("channel", name)?;
    let what = format!("channel {name:?}");
    let c = backend
        .channels(p)
        .get_opt(name)
        .await
        .map_err(|e| kube_error(&what, e))?
        .ok_or_else(|| ApiError::NotFound(what.clone()))?;
    let label = c.labels().get(labels::INSTANCE).map(String::as_str);
    if label == backend.instance() {
        Ok(c)
    } else {
        Err(ApiError::NotFound(what))
    }
}

#[utoipa::path(get, path = "/api/v1/channels/{name}", tag = "channels",
    params(("name" = String, Path, description = "The channel's name")),
    responses((status = 200, description = "The channel", body = ChannelView, headers(("ETag" = String))),
        (status = 404, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn get_channel(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let c = channel(&backend, platform(&auth)?, &name).await?;
    Ok(json(
        StatusCode::OK,
        c.metadata.resource_version.as_deref(),
        &view(&c),
    ))
}

#[utoipa::path(post, path = "/api/v1/channels", tag = "channels", request_body = ChannelInput,
    responses((status = 201, description = "Created", body = ChannelView),
        (status = 409, body = super::doc::Problem), (status = 422, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn create_channel(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let p = platform(&auth)?;
    let input: ChannelInput = body(&bytes)?;
    let (Some(name), Some(provider), Some(models), Some(key)) = (
        input.name.clone(),
        input.provider,
        input.models.clone(),
        input.api_key.clone(),
    ) else {
        return Err(ApiError::Unprocessable(
            "name, provider, models and apiKey are required".into(),
        ));
    };
    let (_, namespace) = backend.credentials(p);
    let spec = ChannelSpec {
        provider,
        base_url: input.base_url,
        credentials: SecretKeyRef {
            name: secret_name(&name),
            namespace: namespace.to_owned(),
            key: SECRET_KEY.to_owned(),
        },
        models,
        model_mapping: input.model_mapping.unwrap_or_default(),
        priority: input.priority.unwrap_or(0),
        weight: input.weight.unwrap_or(100),
        max_retry: input.max_retry.unwrap_or(2),
        disabled: input.disabled.unwrap_or(false),
        upstream_cost: Vec::new(),
    };
    let mut c = Channel::new(&name, spec);
    if let Some(i) = backend.instance() {
        c.metadata.labels = Some(BTreeMap::from([(
            labels::INSTANCE.to_owned(),
            i.to_owned(),
        )]));
    }
    let created = backend
        .channels(p)
        .create(&PostParams::default(), &c)
        .await
        .map_err(|e| kube_error(&format!("channel {name:?}"), e))?;
    if let Err(e) = write_key(&backend, p, &created, &key).await {
        // No channel without its key: take it back.
        let _ = backend
            .channels(p)
            .delete(&name, &DeleteParams::default())
            .await;
        return Err(e);
    }
    backend
        .audit(
            p.own(),
            auth.caller.user_id,
            "channel.created",
            &format!("channel/{name}"),
        )
        .await;
    Ok(json(
        StatusCode::CREATED,
        created.metadata.resource_version.as_deref(),
        &view(&created),
    ))
}

#[utoipa::path(patch, path = "/api/v1/channels/{name}", tag = "channels", request_body = ChannelInput,
    params(("name" = String, Path, description = "The channel's name"),
        ("If-Match" = Option<String>, Header, description = "The ETag read; a changed channel answers 412")),
    responses((status = 200, description = "The changed channel", body = ChannelView),
        (status = 404, body = super::doc::Problem), (status = 409, description = "Managed by GitOps", body = super::doc::Problem),
        (status = 412, body = super::doc::Problem), (status = 422, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn patch_channel(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    Path(name): Path<String>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let p = platform(&auth)?;
    let input: ChannelInput = body(&bytes)?;
    let mut c = channel(&backend, p, &name).await?;
    check_if_match(&headers, c.metadata.resource_version.as_deref())?;
    refuse_gitops(&c.metadata, &format!("channel {name:?}"))?;
    if input.name.as_ref().is_some_and(|n| *n != name) {
        return Err(ApiError::Unprocessable(
            "a channel cannot be renamed".into(),
        ));
    }
    if let Some(v) = input.provider {
        c.spec.provider = v;
    }
    if let Some(v) = input.base_url {
        c.spec.base_url = Some(v);
    }
    if let Some(v) = input.models {
        c.spec.models = v;
    }
    if let Some(v) = input.model_mapping {
        c.spec.model_mapping = v;
    }
    if let Some(v) = input.priority {
        c.spec.priority = v;
    }
    if let Some(v) = input.weight {
        c.spec.weight = v;
    }
    if let Some(v) = input.max_retry {
        c.spec.max_retry = v;
    }
    if let Some(v) = input.disabled {
        c.spec.disabled = v;
    }
    c.status = None;
    let saved = backend
        .channels(p)
        .replace(&name, &PostParams::default(), &c)
        .await
        .map_err(|e| kube_error(&format!("channel {name:?}"), e))?;
    if let Some(key) = &input.api_key {
        write_key(&backend, p, &saved, key).await?;
    }
    backend
        .audit(
            p.own(),
            auth.caller.user_id,
            "channel.updated",
            &format!("channel/{name}"),
        )
        .await;
    Ok(json(
        StatusCode::OK,
        saved.metadata.resource_version.as_deref(),
        &view(&saved),
    ))
}

#[utoipa::path(delete, path = "/api/v1/channels/{name}", tag = "channels",
    params(("name" = String, Path, description = "The channel's name")),
    responses((status = 204, description = "Deleted, with its key Secret"),
        (status = 404, body = super::doc::Problem), (status = 409, description = "Managed by GitOps", body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn delete_channel(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let p = platform(&auth)?;
    let c = channel(&backend, p, &name).await?;
    check_if_match(&headers, c.metadata.resource_version.as_deref())?;
    refuse_gitops(&c.metadata, &format!("channel {name:?}"))?;
    backend
        .channels(p)
        .delete(&name, &DeleteParams::default())
        .await
        .map_err(|e| kube_error(&format!("channel {name:?}"), e))?;
    backend
        .audit(
            p.own(),
            auth.caller.user_id,
            "channel.deleted",
            &format!("channel/{name}"),
        )
        .await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Monitoring window.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
pub struct Window {
    /// Minutes to look back, 1 to 1440 (default 60).
    #[param(minimum = 1, maximum = 1440)]
    pub minutes: Option<u32>,
}

/// One channel's health.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChannelHealth {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel_id: Option<i64>,
    /// The `Ready` condition's status and reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub disabled: bool,
    /// Requests billed in the window and those that failed (status other than success).
    pub requests: u64,
    pub errors: u64,
    /// `requests - errors` over `requests`, as a decimal string; absent without requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub success_rate: Option<String>,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub last_error: String,
}

#[utoipa::path(get, path = "/api/v1/monitoring/channels", tag = "monitoring", params(Window),
    responses((status = 200, description = "Per channel: readiness and the window's requests and failures", body = List<ChannelHealth>),
        (status = 403, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn monitoring(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    Query(w): Query<Window>,
) -> Result<Response, ApiError> {
    let p = platform(&auth)?;
    let minutes = match w.minutes {
        None => 60,
        Some(m @ 1..=1440) => m,
        Some(m) => {
            return Err(ApiError::BadRequest(format!(
                "minutes must be 1 to 1440, got {m}"
            )));
        }
    };
    let since = u32::try_from(chrono::Utc::now().timestamp())
        .unwrap_or(0)
        .saturating_sub(minutes * 60);
    let mut channels: Vec<Channel> = backend
        .channels(p)
        .list(&instance_params(&backend))
        .await
        .map_err(|e| kube_error("channels", e))?
        .items;
    channels.sort_by_key(ResourceExt::name_any);
    let health = backend.channel_health(p, since).await?;
    let items: Vec<ChannelHealth> = channels
        .iter()
        .map(|c| {
            let v = view(c);
            let id = c.status.as_ref().and_then(|s| s.channel_id);
            let h = id.and_then(|id| {
                health
                    .iter()
                    .find(|h| i64::try_from(h.channel_id).ok() == Some(id))
            });
            let (requests, errors) = h.map_or((0, 0), |h| (h.requests, h.errors));
            ChannelHealth {
                name: v.name,
                channel_id: id,
                ready: v.ready,
                reason: v.reason,
                disabled: v.disabled,
                requests,
                errors,
                success_rate: (requests > 0).then(|| {
                    (rust_decimal::Decimal::from(requests - errors)
                        / rust_decimal::Decimal::from(requests))
                    .round_dp(4)
                    .to_string()
                }),
                last_error: h.map(|h| h.last_error.clone()).unwrap_or_default(),
            }
        })
        .collect();
    Ok(json(
        StatusCode::OK,
        None,
        &List {
            items,
            next_cursor: None,
        },
    ))
}
