//! `/api/v2/policies`: QoS rate-limit policies. The cluster admin creates, updates and deletes
//! them; project members see the policies their projects may use, without the visibility
//! details (`policyVisibility` reads `Unavailable`, i.e. is omitted, SCHEMAS.md 5).
//! Input key `qoSRateLimitPolicy`, output key `QoSRateLimitPolicy` (SCHEMAS.md 2.4).

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Map, Value};

use super::auth::Principal;
use super::error::{ApiError, ApiResult};
use super::json::{parse_uuid, Body, Obj};
use super::{App, Query};
use crate::domain::policy::{
    Command as PolicyCommand, Policy, PolicyRef, PolicyVisibility, QosLimit, QosSpec,
};
use crate::domain::{Command, Event};

pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/v2/policies", get(list).post(create))
        .route(
            "/api/v2/policies/",
            get(get_by_name).put(update_by_name).delete(delete_by_name),
        )
        .route(
            "/api/v2/policies/{UUID}",
            get(get_one).put(update).delete(delete),
        )
}

/// The limit oneof member: set messages are emitted even when every field is zero.
fn limit_json(l: &QosLimit) -> (&'static str, Value) {
    let (key, (rk, r), (wk, w)) = match *l {
        QosLimit::Iops { read, write } => (
            "limitIOPS",
            ("readIOPSLimit", read),
            ("writeIOPSLimit", write),
        ),
        QosLimit::BandwidthMbps { read, write } => {
            ("limitBw", ("readBWLimit", read), ("writeBWLimit", write))
        }
        QosLimit::IopsPerGb { read, write } => (
            "limitIOPSPerGB",
            ("readIOPSPerGBLimit", read),
            ("writeIOPSPerGBLimit", write),
        ),
    };
    // Declaration order is write before read.
    let v = Obj::new()
        .num(wk, u64::from(w))
        .num(rk, u64::from(r))
        .build();
    (key, v)
}

/// The `Policy` message; `detailed` shows scope and visibility (cluster admins only).
pub fn policy_json(p: &Policy, detailed: bool) -> Value {
    let mut qos = Map::new();
    if detailed {
        if !p.projects_scope.is_empty() {
            qos.insert("projectsNamesScope".into(), json!(p.projects_scope));
        }
        let vis = match p.visibility {
            PolicyVisibility::Global => "Global",
            PolicyVisibility::Scoped => "Scoped",
        };
        qos.insert("policyVisibility".into(), json!(vis));
    }
    let (key, limit) = limit_json(&p.limit);
    qos.insert(key.into(), limit);
    Obj::new()
        .str("UUID", &p.uuid.to_string())
        .str("name", &p.name)
        .str("description", &p.description)
        .str("state", "Active")
        .val("QoSRateLimitPolicy", Value::Object(qos))
        .build()
}

fn target(uuid: &str, name: Option<&str>) -> ApiResult<PolicyRef> {
    if !uuid.is_empty() {
        return Ok(PolicyRef::Uuid(parse_uuid(uuid)?));
    }
    match name {
        Some(n) if !n.is_empty() => Ok(PolicyRef::Name(n.to_string())),
        _ => Err(ApiError::bad_request(
            "either UUID or name must identify the policy",
        )),
    }
}

/// May the caller see `p`: admins all, others those visible to one of their projects.
fn may_see(who: &Principal, p: &Policy) -> bool {
    match who.readable_projects() {
        None => true,
        Some(projects) => projects.iter().any(|pr| p.visible_to(pr)),
    }
}

fn parse_visibility(v: Option<&Value>, scoped: bool) -> ApiResult<PolicyVisibility> {
    match v {
        // Absent or Unavailable (the enum's zero): infer it from the scope.
        None => Ok(if scoped {
            PolicyVisibility::Scoped
        } else {
            PolicyVisibility::Global
        }),
        Some(Value::String(s)) if s == "Unavailable" => Ok(if scoped {
            PolicyVisibility::Scoped
        } else {
            PolicyVisibility::Global
        }),
        Some(Value::Number(n)) if n.as_u64() == Some(0) => Ok(if scoped {
            PolicyVisibility::Scoped
        } else {
            PolicyVisibility::Global
        }),
        Some(Value::String(s)) if s == "Scoped" => Ok(PolicyVisibility::Scoped),
        Some(Value::Number(n)) if n.as_u64() == Some(1) => Ok(PolicyVisibility::Scoped),
        Some(Value::String(s)) if s == "Global" => Ok(PolicyVisibility::Global),
        Some(Value::Number(n)) if n.as_u64() == Some(2) => Ok(PolicyVisibility::Global),
        Some(other) => Err(ApiError::bad_request(format!(
            "unknown policyVisibility {other}"
        ))),
    }
}

/// `qoSRateLimitPolicy`: exactly one of the three limit kinds (a oneof).
fn qos_spec(q: &Body) -> ApiResult<QosSpec> {
    let projects_scope = q.strings("projectsNamesScope")?;
    let visibility = parse_visibility(q.get("policyVisibility"), !projects_scope.is_empty())?;
    let pair = |key: &str, r: &str, w: &str| -> ApiResult<Option<(u32, u32)>> {
        Ok(match q.object(key)? {
            Some(o) => Some((o.u32(r)?.unwrap_or(0), o.u32(w)?.unwrap_or(0))),
            None => None,
        })
    };
    let mut limits = Vec::new();
    if let Some((read, write)) = pair("limitIOPS", "readIOPSLimit", "writeIOPSLimit")? {
        limits.push(QosLimit::Iops { read, write });
    }
    if let Some((read, write)) = pair("limitBw", "readBWLimit", "writeBWLimit")? {
        limits.push(QosLimit::BandwidthMbps { read, write });
    }
    if let Some((read, write)) = pair(
        "limitIOPSPerGB",
        "readIOPSPerGBLimit",
        "writeIOPSPerGBLimit",
    )? {
        limits.push(QosLimit::IopsPerGb { read, write });
    }
    let [limit] = limits[..] else {
        return Err(ApiError::bad_request(
            "qoSRateLimitPolicy needs exactly one of limitIOPS, limitBw, limitIOPSPerGB",
        ));
    };
    Ok(QosSpec {
        visibility,
        projects_scope,
        limit,
    })
}

fn show(app: &App, who: &Principal, r: PolicyRef) -> ApiResult<Json<Value>> {
    let state = app.bus.state();
    let p = state.policies.resolve(&r)?;
    if !may_see(who, p) {
        // A policy the caller may not use does not exist for them.
        return Err(crate::domain::DomainError::not_found("policy", &p.name).into());
    }
    Ok(Json(policy_json(p, who.is_cluster_admin())))
}

async fn get_one(
    State(app): State<App>,
    who: Principal,
    Path(u): Path<String>,
    q: Query,
) -> ApiResult<Json<Value>> {
    show(&app, &who, target(&u, q.get("name"))?)
}

async fn get_by_name(State(app): State<App>, who: Principal, q: Query) -> ApiResult<Json<Value>> {
    show(&app, &who, target("", q.get("name"))?)
}

async fn list(State(app): State<App>, who: Principal, q: Query) -> ApiResult<Json<Value>> {
    let uuid = q.get("UUID").map(parse_uuid).transpose()?;
    let project = q.get("projectName");
    if let Some(p) = project {
        who.require_project(p, super::auth::Access::Read)?;
        app.bus.state().projects.require(p)?;
    }
    let state = app.bus.state();
    let policies: Vec<Value> = state
        .policies
        .by_uuid
        .values()
        .filter(|p| may_see(&who, p))
        .filter(|p| uuid.is_none_or(|u| p.uuid == u))
        .filter(|p| q.get("name").is_none_or(|n| p.name == n))
        .filter(|p| project.is_none_or(|pr| p.visible_to(pr)))
        .map(|p| policy_json(p, who.is_cluster_admin()))
        .collect();
    Ok(Json(json!({ "policies": policies })))
}

async fn create(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let qos = b
        .object("qoSRateLimitPolicy")?
        .ok_or_else(|| ApiError::bad_request("field qoSRateLimitPolicy is required"))?;
    let cmd = PolicyCommand::CreatePolicy {
        name: b.required_str("name")?,
        description: b.str("description")?.unwrap_or_default(),
        qos: qos_spec(&qos)?,
    };
    let committed = app.submit(&who, &headers, Command::Policy(cmd)).await?;
    let uuid = committed
        .events
        .iter()
        .find_map(|(_, e)| match e {
            Event::Policy(crate::domain::policy::Event::PolicyCreated { policy }) => {
                Some(policy.uuid)
            }
            _ => None,
        })
        .ok_or_else(|| ApiError::internal("policy creation produced no event"))?;
    let state = app.bus.state();
    let p = state
        .policies
        .get(uuid)
        .ok_or_else(|| ApiError::internal("created policy is not in the projection"))?;
    Ok(Json(policy_json(p, true)))
}

async fn change(
    app: App,
    who: Principal,
    headers: HeaderMap,
    uuid: &str,
    b: Body,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let r = target(uuid, b.str("name")?.as_deref())?;
    let qos = b
        .object("qoSRateLimitPolicy")?
        .map(|q| qos_spec(&q))
        .transpose()?;
    let cmd = PolicyCommand::UpdatePolicy {
        target: r,
        description: b.str("description")?,
        qos,
    };
    app.submit(&who, &headers, Command::Policy(cmd)).await?;
    Ok(Json(json!({})))
}

async fn update(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(u): Path<String>,
    b: Body,
) -> ApiResult<Json<Value>> {
    change(app, who, headers, &u, b).await
}

async fn update_by_name(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<Json<Value>> {
    change(app, who, headers, "", b).await
}

async fn remove(
    app: App,
    who: Principal,
    headers: HeaderMap,
    r: PolicyRef,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    app.submit(
        &who,
        &headers,
        Command::Policy(PolicyCommand::DeletePolicy { target: r }),
    )
    .await?;
    Ok(Json(json!({})))
}

async fn delete(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(u): Path<String>,
    q: Query,
) -> ApiResult<Json<Value>> {
    let r = target(&u, q.get("name"))?;
    remove(app, who, headers, r).await
}

async fn delete_by_name(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    q: Query,
) -> ApiResult<Json<Value>> {
    let r = target("", q.get("name"))?;
    remove(app, who, headers, r).await
}
