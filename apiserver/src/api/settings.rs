//! Tenant settings (the caller's own Tenant CR: display name, domains, branding) and the price
//! list (the tenant's Pricing CR in effect). Both are CRs, so `kubectl` and GitOps see every
//! change, and the apiserver's validation (CEL, schema) answers bad values with its message.

use aigw_crds::{Branding, ModelPrice, Pricing, PricingSpec, labels};
use axum::{
    Extension,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::Response,
};
use kube::{ResourceExt, api::PostParams};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{
    ApiError, backend::Backend, body, check_if_match, error::kube_error, gitops_managed, json,
    nullable, refuse_gitops, scope::Authorized,
};

/// A tenant's settings.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantSettings {
    pub name: String,
    /// `platform` or `reseller`.
    #[serde(rename = "type")]
    pub kind: String,
    pub display_name: String,
    /// The domains asked for.
    pub domains: Vec<String>,
    /// The domains served (those no other tenant claimed first).
    pub served_domains: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logo_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub theme_color: Option<String>,
    pub suspended: bool,
    pub gitops: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

fn settings_of(t: &aigw_crds::Tenant) -> TenantSettings {
    let branding = t.spec.branding.as_ref();
    TenantSettings {
        name: t.name_any(),
        kind: match t.spec.tenant_type {
            aigw_crds::TenantType::Platform => "platform".into(),
            aigw_crds::TenantType::Reseller => "reseller".into(),
        },
        display_name: t.spec.display_name.clone(),
        domains: t.spec.domains.clone(),
        served_domains: t
            .status
            .as_ref()
            .map(|s| s.domains.clone())
            .unwrap_or_default(),
        logo_url: branding.and_then(|b| b.logo_url.clone()),
        theme_color: branding.and_then(|b| b.theme_color.clone()),
        suspended: t.spec.suspended,
        gitops: gitops_managed(&t.metadata),
        etag: t.metadata.resource_version.clone(),
    }
}

/// Changes to the settings; absent fields stay, `null` removes the logo or colour.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SettingsPatch {
    #[schema(min_length = 1, max_length = 128)]
    pub display_name: Option<String>,
    /// The whole list of domains (lowercase DNS names, `*.` allowed, at most 32).
    pub domains: Option<Vec<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, max_length = 512)]
    pub logo_url: Option<Option<String>>,
    #[serde(default, deserialize_with = "nullable")]
    #[schema(value_type = Option<String>, pattern = "^#[0-9a-fA-F]{6}$")]
    pub theme_color: Option<Option<String>>,
}

#[utoipa::path(get, path = "/api/v1/tenant", tag = "tenant",
    responses((status = 200, description = "The caller's tenant", body = TenantSettings, headers(("ETag" = String))),
        (status = 403, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn get_tenant(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
) -> Result<Response, ApiError> {
    let t = backend.tenant(auth.scope()).await?;
    Ok(json(
        StatusCode::OK,
        t.metadata.resource_version.as_deref(),
        &settings_of(&t),
    ))
}

#[utoipa::path(patch, path = "/api/v1/tenant", tag = "tenant", request_body = SettingsPatch,
    params(("If-Match" = Option<String>, Header, description = "The ETag read; a changed tenant answers 412")),
    responses((status = 200, description = "The changed settings", body = TenantSettings),
        (status = 409, description = "Managed by GitOps", body = super::doc::Problem),
        (status = 412, body = super::doc::Problem), (status = 422, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn patch_tenant(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let change: SettingsPatch = body(&bytes)?;
    let mut t = backend.tenant(auth.scope()).await?;
    check_if_match(&headers, t.metadata.resource_version.as_deref())?;
    refuse_gitops(&t.metadata, "the tenant")?;
    if let Some(v) = change.display_name {
        t.spec.display_name = v;
    }
    if let Some(v) = change.domains {
        t.spec.domains = v;
    }
    let mut branding = t.spec.branding.clone().unwrap_or(Branding {
        logo_url: None,
        theme_color: None,
    });
    if let Some(v) = change.logo_url {
        branding.logo_url = v;
    }
    if let Some(v) = change.theme_color {
        branding.theme_color = v;
    }
    t.spec.branding =
        (branding.logo_url.is_some() || branding.theme_color.is_some()).then_some(branding);
    t.status = None;
    let saved = backend.replace_tenant(auth.scope(), &t).await?;
    backend
        .audit(
            auth.scope(),
            auth.caller.user_id,
            "tenant.updated",
            &format!("tenant/{}", auth.scope().name()),
        )
        .await;
    Ok(json(
        StatusCode::OK,
        saved.metadata.resource_version.as_deref(),
        &settings_of(&saved),
    ))
}

/// A price list.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PriceList {
    /// ISO 4217 code of every price (default CNY).
    #[schema(pattern = "^[A-Z]{3}$")]
    #[serde(default = "cny")]
    pub currency: String,
    /// Prices per million tokens, as decimal strings (`"2.50"`).
    pub models: Vec<Price>,
    /// The Pricing CR (read only).
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_deserializing)]
    pub gitops: bool,
    #[serde(default, skip_deserializing, skip_serializing_if = "Option::is_none")]
    pub etag: Option<String>,
}

fn cny() -> String {
    "CNY".into()
}

/// One model's prices per million tokens.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Price {
    #[schema(min_length = 1, max_length = 128)]
    pub model: String,
    #[schema(pattern = r"^[0-9]{1,4}(\.[0-9]{1,6})?$")]
    pub input: String,
    #[schema(pattern = r"^[0-9]{1,4}(\.[0-9]{1,6})?$")]
    pub output: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = r"^[0-9]{1,4}(\.[0-9]{1,6})?$")]
    pub cached_input: Option<String>,
}

fn list_of(p: &Pricing) -> PriceList {
    PriceList {
        currency: p.spec.currency.clone(),
        models: p
            .spec
            .models
            .iter()
            .map(|m| Price {
                model: m.model.clone(),
                input: m.input.clone(),
                output: m.output.clone(),
                cached_input: m.cached_input.clone(),
            })
            .collect(),
        name: Some(p.name_any()),
        gitops: gitops_managed(&p.metadata),
        etag: p.metadata.resource_version.clone(),
    }
}

async fn in_effect(backend: &Backend, auth: &Authorized) -> Result<Option<Pricing>, ApiError> {
    let api = backend.pricings(auth.scope());
    let all = api
        .list(&kube::api::ListParams::default())
        .await
        .map_err(|e| kube_error("price list", e))?
        .items;
    let name = aigw_crds::pricing::in_effect(&all, false);
    Ok(all
        .into_iter()
        .find(|p| p.metadata.name.is_some() && p.metadata.name == name))
}

#[utoipa::path(get, path = "/api/v1/pricing", tag = "pricing",
    responses((status = 200, description = "The tenant's price list", body = PriceList, headers(("ETag" = String))),
        (status = 404, description = "The tenant has no price list", body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn get_pricing(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
) -> Result<Response, ApiError> {
    let p = in_effect(&backend, &auth)
        .await?
        .ok_or_else(|| ApiError::NotFound("price list".into()))?;
    Ok(json(
        StatusCode::OK,
        p.metadata.resource_version.as_deref(),
        &list_of(&p),
    ))
}

#[utoipa::path(put, path = "/api/v1/pricing", tag = "pricing", request_body = PriceList,
    params(("If-Match" = Option<String>, Header, description = "The ETag read; a changed list answers 412")),
    responses((status = 200, description = "The new price list", body = PriceList),
        (status = 409, description = "Managed by GitOps", body = super::doc::Problem),
        (status = 412, body = super::doc::Problem), (status = 422, body = super::doc::Problem)),
    security(("bearer" = [])))]
pub async fn put_pricing(
    State(backend): State<Backend>,
    Extension(auth): Extension<Authorized>,
    headers: HeaderMap,
    bytes: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let req: PriceList = body(&bytes)?;
    let spec = PricingSpec {
        currency: req.currency,
        models: req
            .models
            .into_iter()
            .map(|m| ModelPrice {
                model: m.model,
                input: m.input,
                output: m.output,
                cached_input: m.cached_input,
            })
            .collect(),
    };
    let api = backend.pricings(auth.scope());
    let saved = if let Some(mut p) = in_effect(&backend, &auth).await? {
        check_if_match(&headers, p.metadata.resource_version.as_deref())?;
        refuse_gitops(&p.metadata, "the price list")?;
        p.spec = spec;
        p.status = None;
        api.replace(&p.name_any(), &PostParams::default(), &p)
            .await
            .map_err(|e| kube_error("price list", e))?
    } else {
        {
            let mut p = Pricing::new("pricing", spec);
            if let Some(i) = backend.instance() {
                p.metadata.labels = Some(std::collections::BTreeMap::from([(
                    labels::INSTANCE.to_owned(),
                    i.to_owned(),
                )]));
            }
            api.create(&PostParams::default(), &p)
                .await
                .map_err(|e| kube_error("price list", e))?
        }
    };
    backend
        .audit(
            auth.scope(),
            auth.caller.user_id,
            "pricing.replaced",
            &format!("pricing/{}", saved.name_any()),
        )
        .await;
    Ok(json(
        StatusCode::OK,
        saved.metadata.resource_version.as_deref(),
        &list_of(&saved),
    ))
}
