//! `/api/v2/projects/{projectName}/resourcePolicies[/{UUID}]`: snapshot schedules
//! (SCHEMAS.md 2.5). Project members read them, project admins change them. The
//! `ResourcePolicy` message has no ETag field, so the ETag (for `If-Match` on PUT and DELETE)
//! travels in the `ETag` response header of GET and POST.

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

use super::auth::{Access, Principal};
use super::error::{ApiError, ApiResult};
use super::json::{parse_duration_secs, parse_uuid, Body, Obj};
use super::{if_match, App, Query};
use crate::domain::schedule::{
    Cadence, Command as ScheduleCommand, Event as ScheduleEvent, NewResourcePolicy, ResourcePolicy,
    Schedule, WeeklyEntry,
};
use crate::domain::volume::VolumeRef;
use crate::domain::{Command, Event, State as DomainState};

pub fn routes() -> Router<App> {
    Router::new()
        .route(
            "/api/v2/projects/{projectName}/resourcePolicies",
            get(list).post(create),
        )
        .route(
            "/api/v2/projects/{projectName}/resourcePolicies/{UUID}",
            get(get_one).put(update).delete(delete),
        )
}

/// `DayOfWeek` names by value (0 is `DayOfWeekUnspecified`).
const DAYS: [&str; 8] = [
    "DayOfWeekUnspecified",
    "Sunday",
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
];

fn cadence_json(c: &Cadence) -> Value {
    match c {
        Cadence::Hourly {
            start_unix_ns,
            hours,
        } => json!({"hourlySchedule": Obj::new().time("startTime", *start_unix_ns)
            .num("hoursInCycle", u64::from(*hours)).build()}),
        Cadence::Daily {
            start_unix_ns,
            days,
        } => json!({"dailySchedule": Obj::new().time("startTime", *start_unix_ns)
            .num("daysInCycle", u64::from(*days)).build()}),
        Cadence::Weekly { entries } => {
            let days: Vec<Value> = entries
                .iter()
                .map(|e| {
                    Obj::new()
                        .time("startTime", e.start_unix_ns)
                        .str("day", DAYS[usize::from(e.day).min(7)])
                        .build()
                })
                .collect();
            json!({"weeklySchedule": {"daysOfWeek": days}})
        }
    }
}

/// The `ResourcePolicy` message, keys in declaration order.
pub fn policy_json(state: &DomainState, p: &ResourcePolicy) -> Value {
    let volume_name = state
        .volumes
        .get(p.volume)
        .map(|v| v.name.clone())
        .unwrap_or_default();
    let schedule = Obj::new()
        .val("snapshotSchedulePolicy", cadence_json(&p.schedule.cadence))
        .str("retentionTime", &format!("{}s", p.schedule.retention_secs))
        .build();
    Obj::new()
        .str("UUID", &p.uuid.to_string())
        .str("name", &p.name)
        .str("resourceUUID", &p.volume.to_string())
        .str("resourceName", &volume_name)
        .str("projectName", &p.project)
        .val("schedulePolicy", schedule)
        .str("description", &p.description)
        .str("state", "Active")
        .build()
}

fn with_etag(p: &ResourcePolicy, body: Value) -> Response {
    let mut r = Json(body).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("\"{}\"", p.etag)) {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

/// An RFC 3339 time, `Z` or a numeric offset.
fn parse_time(key: &str, text: &str) -> ApiResult<u64> {
    let bad = |why: &str| {
        ApiError::bad_request(format!(
            "field {key}: {text:?} is not an RFC 3339 time like 2024-01-01T02:00:00Z{why}"
        ))
    };
    let t = text.trim();
    // humantime reads UTC only: fold a trailing ±hh:mm offset into the result by hand.
    let (base, offset_secs) = match t.len().checked_sub(6).map(|i| t.split_at(i)) {
        Some((b, off))
            if (off.starts_with('+') || off.starts_with('-')) && off.as_bytes()[3] == b':' =>
        {
            let h: i64 = off[1..3].parse().map_err(|_| bad(""))?;
            let m: i64 = off[4..6].parse().map_err(|_| bad(""))?;
            let sign = if off.starts_with('-') { -1 } else { 1 };
            (format!("{b}Z"), sign * (h * 3600 + m * 60))
        }
        _ => (t.to_string(), 0),
    };
    let at = humantime::parse_rfc3339_weak(&base).map_err(|e| bad(&format!(" ({e})")))?;
    let ns = at
        .duration_since(std::time::UNIX_EPOCH)
        .map_err(|_| bad(" (before 1970)"))?
        .as_nanos() as i128
        - i128::from(offset_secs) * 1_000_000_000;
    u64::try_from(ns).map_err(|_| bad(" (out of range)"))
}

fn start_time(o: &Body, what: &str) -> ApiResult<u64> {
    match o.str("startTime")? {
        Some(t) if !t.trim().is_empty() => parse_time(&format!("{what}.startTime"), &t),
        _ => Err(ApiError::bad_request(format!(
            "field {what}.startTime is required"
        ))),
    }
}

fn day_of_week(v: Option<&Value>) -> ApiResult<u8> {
    let day = match v {
        Some(Value::String(s)) => DAYS.iter().position(|d| d == s),
        Some(Value::Number(n)) => n.as_u64().map(|n| n as usize).filter(|n| *n < DAYS.len()),
        None => Some(0),
        Some(_) => None,
    };
    match day {
        Some(d) if d > 0 => Ok(d as u8),
        _ => Err(ApiError::bad_request(format!(
            "daysOfWeek day must be one of Sunday … Saturday, not {}",
            v.map_or("nothing".to_string(), Value::to_string)
        ))),
    }
}

fn weekly(o: &Body) -> ApiResult<Cadence> {
    let entries = o
        .array("daysOfWeek")?
        .into_iter()
        .map(|v| match v {
            Value::Object(m) => {
                let e = Body(m);
                Ok(WeeklyEntry {
                    day: day_of_week(e.get("day"))?,
                    start_unix_ns: start_time(&e, "daysOfWeek")?,
                })
            }
            other => Err(ApiError::bad_request(format!(
                "daysOfWeek holds objects, not {other}"
            ))),
        })
        .collect::<ApiResult<Vec<_>>>()?;
    Ok(Cadence::Weekly { entries })
}

/// `schedulePolicy`: a `snapshotSchedulePolicy` with exactly one cadence, and the retention.
fn schedule(b: &Body) -> ApiResult<Schedule> {
    let sp = b
        .object("schedulePolicy")?
        .ok_or_else(|| ApiError::bad_request("field schedulePolicy is required"))?;
    let snap = sp.object("snapshotSchedulePolicy")?.ok_or_else(|| {
        ApiError::bad_request("field schedulePolicy.snapshotSchedulePolicy is required")
    })?;
    let mut cadences = Vec::new();
    if let Some(h) = snap.object("hourlySchedule")? {
        cadences.push(Cadence::Hourly {
            start_unix_ns: start_time(&h, "hourlySchedule")?,
            hours: h.u32("hoursInCycle")?.unwrap_or(0),
        });
    }
    if let Some(d) = snap.object("dailySchedule")? {
        cadences.push(Cadence::Daily {
            start_unix_ns: start_time(&d, "dailySchedule")?,
            days: d.u32("daysInCycle")?.unwrap_or(0),
        });
    }
    if let Some(w) = snap.object("weeklySchedule")? {
        cadences.push(weekly(&w)?);
    }
    let Ok([cadence]) = <[Cadence; 1]>::try_from(cadences) else {
        return Err(ApiError::bad_request(
            "snapshotSchedulePolicy needs exactly one of hourlySchedule, dailySchedule, weeklySchedule",
        ));
    };
    let retention_secs = match sp.str("retentionTime")? {
        Some(t) if !t.trim().is_empty() => parse_duration_secs(&t)
            .map_err(|why| ApiError::bad_request(format!("field retentionTime: {why}")))?,
        _ => 0,
    };
    Ok(Schedule {
        cadence,
        retention_secs,
    })
}

fn show(app: &App, who: &Principal, project: &str, uuid: &str) -> ApiResult<Response> {
    who.require_project(project, Access::Read)?;
    let uuid = parse_uuid(uuid)?;
    let state = app.bus.state();
    state.projects.require(project)?;
    let p = state.resource_policies.resolve(project, uuid)?;
    Ok(with_etag(p, policy_json(&state, p)))
}

async fn get_one(
    State(app): State<App>,
    who: Principal,
    Path((p, u)): Path<(String, String)>,
) -> ApiResult<Response> {
    show(&app, &who, &p, &u)
}

async fn list(
    State(app): State<App>,
    who: Principal,
    Path(project): Path<String>,
    q: Query,
) -> ApiResult<Json<Value>> {
    who.require_project(&project, Access::Read)?;
    let uuid = q.get("UUID").map(parse_uuid).transpose()?;
    let volume = q.get("volumeUUID").map(parse_uuid).transpose()?;
    let state = app.bus.state();
    state.projects.require(&project)?;
    let policies: Vec<Value> = state
        .resource_policies
        .in_project(&project)
        .filter(|p| uuid.is_none_or(|u| p.uuid == u))
        .filter(|p| volume.is_none_or(|v| p.volume == v))
        .map(|p| policy_json(&state, p))
        .collect();
    Ok(Json(json!({ "resourcePolicies": policies })))
}

async fn create(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path(project): Path<String>,
    b: Body,
) -> ApiResult<Response> {
    who.require_project(&project, Access::Write)?;
    // The UUID wins when both are given (reference: CreateResourcePolicy).
    let volume = match (b.str("resourceUUID")?, b.str("resourceName")?) {
        (Some(u), _) if !u.is_empty() => VolumeRef::Uuid(parse_uuid(&u)?),
        (_, Some(n)) if !n.is_empty() => VolumeRef::Name(n),
        _ => {
            return Err(ApiError::bad_request(
                "resourceUUID or resourceName (the volume) is required",
            ))
        }
    };
    let n = NewResourcePolicy {
        project,
        name: b.required_str("name")?,
        volume,
        description: b.str("description")?.unwrap_or_default(),
        schedule: schedule(&b)?,
    };
    let cmd = Command::Schedule(ScheduleCommand::CreateResourcePolicy(n));
    let committed = app.submit(&who, &headers, cmd).await?;
    let uuid = committed
        .events
        .iter()
        .find_map(|(_, e)| match e {
            Event::Schedule(ScheduleEvent::ResourcePolicyCreated { policy }) => Some(policy.uuid),
            _ => None,
        })
        .ok_or_else(|| ApiError::internal("resource policy creation produced no event"))?;
    let state = app.bus.state();
    let p = state
        .resource_policies
        .get(uuid)
        .ok_or_else(|| ApiError::internal("created resource policy is not in the projection"))?;
    Ok(with_etag(p, policy_json(&state, p)))
}

async fn update(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path((project, u)): Path<(String, String)>,
    b: Body,
) -> ApiResult<Json<Value>> {
    who.require_project(&project, Access::Write)?;
    let cmd = ScheduleCommand::UpdateResourcePolicy {
        project,
        uuid: parse_uuid(&u)?,
        schedule: schedule(&b)?,
        description: b.str("description")?,
        if_match: if_match(&headers)?,
    };
    app.submit(&who, &headers, Command::Schedule(cmd)).await?;
    Ok(Json(json!({})))
}

async fn delete(
    State(app): State<App>,
    who: Principal,
    headers: HeaderMap,
    Path((project, u)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    who.require_project(&project, Access::Write)?;
    let cmd = ScheduleCommand::DeleteResourcePolicy {
        project,
        uuid: parse_uuid(&u)?,
        if_match: if_match(&headers)?,
    };
    app.submit(&who, &headers, Command::Schedule(cmd)).await?;
    Ok(Json(json!({})))
}
