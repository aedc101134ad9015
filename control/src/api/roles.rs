//! `/api/v2/projects/{projectName}/roles…`: the fixed roles of the authorization model in
//! [`super::auth`], described as LightOS rule arrays. Every project has `admin` and `viewer`;
//! the `system` project also has `cluster-admin`. Roles cannot be created or changed.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth::{Access, Principal, Role};
use super::error::{ApiError, ApiResult};
use super::json::Obj;
use super::App;

pub fn routes() -> Router<App> {
    Router::new()
        .route("/api/v2/projects/{projectName}/roles", get(list))
        .route("/api/v2/projects/{projectName}/roles/{name}", get(get_one))
}

/// Resources a project role acts on inside its own project.
const PROJECT_RESOURCES: [&str; 7] = [
    "volumes",
    "snapshots",
    "resourcePolicies",
    "credentials",
    "events",
    "roles",
    "trustedHosts",
];
/// Cluster-wide facts any project role may read (clients look up node endpoints).
const SHARED_READS: [&str; 5] = ["versions", "clusters", "clusterInfos", "nodes", "policies"];
const READ_ACTIONS: [&str; 2] = ["get", "list"];
const WRITE_ACTIONS: [&str; 6] = ["get", "list", "create", "update", "delete", "rollback"];

pub fn role_name(r: Role) -> &'static str {
    match r {
        Role::ClusterAdmin => "cluster-admin",
        Role::Admin => "admin",
        Role::Viewer => "viewer",
    }
}

/// The rule array of a role, as enforced by [`Principal::require_project`] and
/// [`Principal::require_cluster_admin`].
pub fn rules(r: Role) -> Value {
    match r {
        Role::ClusterAdmin => json!([{"resources": ["*"], "actions": ["*"]}]),
        Role::Admin => json!([
            {"resources": PROJECT_RESOURCES, "actions": WRITE_ACTIONS},
            {"resources": ["projects"], "actions": ["get", "update"]},
            {"resources": SHARED_READS, "actions": READ_ACTIONS},
        ]),
        Role::Viewer => json!([
            {"resources": PROJECT_RESOURCES, "actions": READ_ACTIONS},
            {"resources": ["projects"], "actions": ["get"]},
            {"resources": SHARED_READS, "actions": READ_ACTIONS},
        ]),
    }
}

fn roles_of(project: &str) -> Vec<Role> {
    if project == "system" {
        vec![Role::ClusterAdmin, Role::Admin, Role::Viewer]
    } else {
        vec![Role::Admin, Role::Viewer]
    }
}

fn role_json(project: &str, r: Role) -> Value {
    Obj::new()
        .str("name", role_name(r))
        .str("projectName", project)
        .str("rulesJson", &rules(r).to_string())
        .build()
}

fn check_project(app: &App, who: &Principal, project: &str) -> ApiResult<()> {
    who.require_project(project, Access::Read)?;
    app.bus.state().projects.require(project)?;
    Ok(())
}

async fn list(
    State(app): State<App>,
    who: Principal,
    Path(project): Path<String>,
) -> ApiResult<Json<Value>> {
    check_project(&app, &who, &project)?;
    let roles: Vec<Value> = roles_of(&project)
        .into_iter()
        .map(|r| role_json(&project, r))
        .collect();
    Ok(Json(json!({ "roles": roles })))
}

async fn get_one(
    State(app): State<App>,
    who: Principal,
    Path((project, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    check_project(&app, &who, &project)?;
    let role = roles_of(&project)
        .into_iter()
        .find(|r| role_name(*r) == name)
        .ok_or_else(|| {
            ApiError::not_found(format!("role {name} not found in project {project}"))
        })?;
    Ok(Json(json!({ "role": role_json(&project, role) })))
}
