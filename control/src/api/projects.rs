//! `/api/v2/projects`: create, list, get, update default policies, delete.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use uuid::Uuid;

use super::auth::{Access, Principal};
use super::error::{ApiError, ApiResult};
use super::json::{Body, Obj};
use super::App;
use crate::domain::project::{Command as ProjectCommand, DefaultPolicy, PolicyType, Project};
use crate::domain::Command;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/v2/projects", get(list).post(create))
        .route(
            "/api/v2/projects/{name}",
            get(get_one).delete(delete).put(update),
        )
}

fn policy_type_name(t: PolicyType) -> &'static str {
    match t {
        PolicyType::Unknown => "unknown",
        PolicyType::Snapshot => "snapshot",
        PolicyType::QosRateLimit => "qosRateLimit",
    }
}

pub fn project_json(p: &Project) -> Value {
    let policies: Vec<Value> = p
        .default_policies
        .iter()
        .map(|d| json!({"policyType": policy_type_name(d.policy_type), "policyUUID": d.policy_uuid.to_string()}))
        .collect();
    Obj::new()
        .str("UUID", &p.uuid.to_string())
        .str("name", &p.name)
        .str("description", &p.description)
        .val("defaultPolicies", Value::Array(policies))
        .build()
}

fn default_policies(b: &Body) -> ApiResult<Vec<DefaultPolicy>> {
    b.array("defaultPolicies")?
        .into_iter()
        .map(|v| {
            let Value::Object(m) = v else {
                return Err(ApiError::bad_request("defaultPolicies holds objects"));
            };
            let d = Body(m);
            let policy_type = match d.get("policyType") {
                Some(Value::String(s)) if s == "qosRateLimit" => PolicyType::QosRateLimit,
                Some(Value::String(s)) if s == "snapshot" => PolicyType::Snapshot,
                Some(Value::Number(n)) if n.as_u64() == Some(2) => PolicyType::QosRateLimit,
                Some(Value::Number(n)) if n.as_u64() == Some(1) => PolicyType::Snapshot,
                other => {
                    return Err(ApiError::bad_request(format!(
                        "unknown policyType {other:?}"
                    )))
                }
            };
            let uuid = d.required_str("policyUUID")?;
            let policy_uuid = Uuid::parse_str(&uuid)
                .map_err(|_| ApiError::bad_request(format!("policyUUID {uuid:?} is not a UUID")))?;
            Ok(DefaultPolicy {
                policy_type,
                policy_uuid,
            })
        })
        .collect()
}

async fn list(State(app): State<App>, who: Principal) -> ApiResult<Json<Value>> {
    let visible = who.readable_projects();
    let state = app.bus.state();
    let projects: Vec<Value> = state
        .projects
        .by_name
        .values()
        .filter(|p| visible.as_ref().is_none_or(|v| v.contains(&p.name)))
        .map(project_json)
        .collect();
    Ok(Json(json!({ "projects": projects })))
}

async fn get_one(
    State(app): State<App>,
    who: Principal,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    who.require_project(&name, Access::Read)?;
    let state = app.bus.state();
    Ok(Json(project_json(state.projects.require(&name)?)))
}

async fn create(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    b: Body,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    let name = b.required_str("name")?;
    let cmd = ProjectCommand::CreateProject {
        name: name.clone(),
        description: b.str("description")?.unwrap_or_default(),
        default_policies: default_policies(&b)?,
    };
    app.submit(&who, &headers, Command::Project(cmd)).await?;
    let state = app.bus.state();
    Ok(Json(project_json(state.projects.require(&name)?)))
}

async fn update(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(name): Path<String>,
    b: Body,
) -> ApiResult<Json<Value>> {
    who.require_project(&name, Access::Write)?;
    let cmd = ProjectCommand::UpdateProject {
        name,
        default_policies: default_policies(&b)?,
    };
    app.submit(&who, &headers, Command::Project(cmd)).await?;
    Ok(Json(json!({})))
}

async fn delete(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    who.require_cluster_admin()?;
    app.submit(
        &who,
        &headers,
        Command::Project(ProjectCommand::DeleteProject { name }),
    )
    .await?;
    Ok(Json(json!({})))
}
