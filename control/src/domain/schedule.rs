//! Resource policies (LightOS `resourcePolicies`): snapshot schedules attached to a volume.
//!
//! A policy names a volume, a cadence (every N hours or days from a start time, or given
//! weekdays at a time of day) and a retention time. The reconciler asks [`due_fires`] which
//! policies have a slot due and submits `FireResourcePolicy`; `decide` recomputes the slot
//! from the policy and `Ctx` time, so a repeated or concurrent fire of the same slot finds
//! nothing to do. A fire records `ResourcePolicyFired` (the slot) and, in the same batch, the
//! ordinary `SnapshotCreationRequested` of a snapshot named `<policy>-<slot, UTC>` that
//! carries the policy's retention; the snapshot's own retention expiry (`SnapshotExpired`)
//! removes it later, so only snapshots a policy created (or that asked for a retention time
//! themselves) ever expire, and a deleted policy's snapshots still expire on time.
//!
//! Scheduler invariants: a slot fires at most once (`fired_through_unix_ns` only grows, and
//! only slots after it are due); after downtime only the latest missed slot is due (one
//! catch-up snapshot, never a storm); slots before the policy's creation or last update are
//! never due; deleting the volume deletes its policies (as events).
//!
//! Time: everything here is computed from the time passed in. `clock_scale` (1 in
//! production) makes schedule time run faster than real time for tests: real instant `t` is
//! schedule instant `t × scale`, so hourly slots come every `3600 s / scale` and a
//! snapshot's retention is divided by the scale.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::names::{check_description, check_etag, check_name};
use super::snapshot::{Event as SnapshotEvent, Snapshot};
use super::volume::{Event as VolumeEvent, VolumeRef, VolumeState};
use super::{Applied, Ctx, DomainError, Event as AnyEvent, RowKey, State};
use crate::limits::{
    API_DURATION_SECS_MAX, NAME_BYTES_MAX, RESOURCE_POLICIES_PER_PROJECT_MAX,
    RESOURCE_POLICIES_PER_VOLUME_MAX, SCHEDULED_SNAPSHOTS_KEPT_MAX, SCHEDULE_CYCLE_DAYS_MAX,
    SCHEDULE_CYCLE_HOURS_MAX, SCHEDULE_WEEKLY_ENTRIES_MAX, SNAPSHOTS_MAX,
};

const NS_PER_SEC: u128 = 1_000_000_000;
const HOUR_NS: u128 = 3_600 * NS_PER_SEC;
const DAY_NS: u128 = 24 * HOUR_NS;
const WEEK_NS: u128 = 7 * DAY_NS;
/// 1970-01-01 was a Thursday: the Unix epoch is this far into its Sunday-based week.
const EPOCH_WEEK_OFFSET_NS: u128 = 4 * DAY_NS;
/// `-YYYYMMDDTHHMMSSZ`, appended to the policy name to name a snapshot.
const SLOT_SUFFIX_BYTES: usize = 17;
/// Longest policy name: its snapshots' names must still be valid snapshot names.
pub const POLICY_NAME_BYTES_MAX: usize = NAME_BYTES_MAX - SLOT_SUFFIX_BYTES;

/// LightOS `DayOfWeek`: Sunday = 1 … Saturday = 7 (0, unspecified, is refused).
pub type Weekday = u8;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WeeklyEntry {
    pub day: Weekday,
    /// As given; only its UTC time of day counts.
    pub start_unix_ns: u64,
}

impl WeeklyEntry {
    fn offset_in_week_ns(&self) -> u128 {
        (u128::from(self.day) - 1) * DAY_NS + u128::from(self.start_unix_ns) % DAY_NS
    }
}

/// When snapshots are taken (LightOS `SnapshotSchedulePolicy`, a oneof).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cadence {
    Hourly { start_unix_ns: u64, hours: u32 },
    Daily { start_unix_ns: u64, days: u32 },
    Weekly { entries: Vec<WeeklyEntry> },
}

/// LightOS `SchedulePolicy`: the cadence and how long each snapshot is kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    pub cadence: Cadence,
    pub retention_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResourcePolicy {
    pub uuid: Uuid,
    pub name: String,
    pub project: String,
    pub description: String,
    pub volume: Uuid,
    pub schedule: Schedule,
    /// Every slot at or before this instant is accounted for: fired, or before the policy
    /// was created or last updated. Only grows.
    pub fired_through_unix_ns: u64,
    /// Slots fired so far (a snapshot was requested or the reason it was not recorded).
    pub fires: u64,
    pub created_unix_ns: u64,
    pub etag: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResourcePolicies {
    pub by_uuid: BTreeMap<Uuid, ResourcePolicy>,
}

impl ResourcePolicies {
    pub fn get(&self, uuid: Uuid) -> Option<&ResourcePolicy> {
        self.by_uuid.get(&uuid)
    }

    pub fn in_project<'a>(&'a self, project: &'a str) -> impl Iterator<Item = &'a ResourcePolicy> {
        self.by_uuid.values().filter(move |p| p.project == project)
    }

    pub fn of_volume(&self, volume: Uuid) -> impl Iterator<Item = &ResourcePolicy> {
        self.by_uuid.values().filter(move |p| p.volume == volume)
    }

    /// The policy `uuid` of `project`, or 404.
    pub fn resolve(&self, project: &str, uuid: Uuid) -> Result<&ResourcePolicy, DomainError> {
        self.get(uuid)
            .filter(|p| p.project == project)
            .ok_or_else(|| DomainError::not_found("resource policy", uuid))
    }
}

/// Everything a new policy needs; the API has parsed times and durations.
#[derive(Debug, Clone, PartialEq)]
pub struct NewResourcePolicy {
    pub project: String,
    pub name: String,
    pub volume: VolumeRef,
    pub description: String,
    pub schedule: Schedule,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    CreateResourcePolicy(NewResourcePolicy),
    UpdateResourcePolicy {
        project: String,
        uuid: Uuid,
        schedule: Schedule,
        description: Option<String>,
        if_match: Option<String>,
    },
    DeleteResourcePolicy {
        project: String,
        uuid: Uuid,
        if_match: Option<String>,
    },
    /// Reconciler: take the policy's snapshot if a slot is due now (else nothing).
    FireResourcePolicy {
        uuid: Uuid,
        clock_scale: u32,
    },
}

/// Append only: bincode stores the variant's position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    ResourcePolicyCreated {
        policy: Box<ResourcePolicy>,
    },
    /// A new schedule (and description); slots up to `since_unix_ns` are not due.
    ResourcePolicyUpdated {
        uuid: Uuid,
        schedule: Schedule,
        description: String,
        since_unix_ns: u64,
    },
    ResourcePolicyDeleted {
        uuid: Uuid,
    },
    /// The slot at `slot_unix_ns` fired: `snapshot` was requested in the same batch, or
    /// `skipped` says why none could be.
    ResourcePolicyFired {
        uuid: Uuid,
        slot_unix_ns: u64,
        snapshot: Option<Uuid>,
        skipped: String,
    },
}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::ResourcePolicyCreated { .. } => "ResourcePolicyCreated",
            Event::ResourcePolicyUpdated { .. } => "ResourcePolicyUpdated",
            Event::ResourcePolicyDeleted { .. } => "ResourcePolicyDeleted",
            Event::ResourcePolicyFired { .. } => "ResourcePolicyFired",
        }
    }

    pub fn uuid(&self) -> Uuid {
        match self {
            Event::ResourcePolicyCreated { policy } => policy.uuid,
            Event::ResourcePolicyUpdated { uuid, .. }
            | Event::ResourcePolicyDeleted { uuid }
            | Event::ResourcePolicyFired { uuid, .. } => *uuid,
        }
    }

    pub fn project<'a>(&'a self, state: &'a State) -> &'a str {
        match self {
            Event::ResourcePolicyCreated { policy } => &policy.project,
            other => state
                .resource_policies
                .get(other.uuid())
                .map(|p| p.project.as_str())
                .unwrap_or(""),
        }
    }
}

// ---- the pure schedule ----

/// Real time → schedule time (see the module comment).
fn to_schedule(t_unix_ns: u64, scale: u32) -> u128 {
    u128::from(t_unix_ns) * u128::from(scale.max(1))
}

/// Schedule time → real time, rounded up so a slot is never before its schedule instant.
fn to_real(t: u128, scale: u32) -> u64 {
    u64::try_from(t.div_ceil(u128::from(scale.max(1)))).unwrap_or(u64::MAX)
}

/// The first slot and the period of an hourly or daily cadence, in schedule time (`None`
/// for weekly). A zero period (never validated in) is read as 1 ns rather than divided by.
fn periodic(c: &Cadence, scale: u32) -> Option<(u128, u128)> {
    let (start, period) = match c {
        Cadence::Hourly {
            start_unix_ns,
            hours,
        } => (*start_unix_ns, u128::from(*hours) * HOUR_NS),
        Cadence::Daily {
            start_unix_ns,
            days,
        } => (*start_unix_ns, u128::from(*days) * DAY_NS),
        Cadence::Weekly { .. } => return None,
    };
    Some((to_schedule(start, scale), period.max(1)))
}

/// Offsets of a weekly cadence's entries within a Sunday-based week.
fn weekly_offsets(c: &Cadence) -> impl Iterator<Item = u128> + '_ {
    let entries = match c {
        Cadence::Weekly { entries } => &entries[..],
        _ => &[],
    };
    entries.iter().map(WeeklyEntry::offset_in_week_ns)
}

/// `t` (schedule time) as (start of its Sunday-based week, offset into it), epoch-shifted.
fn week_of(t: u128) -> (u128, u128) {
    let shifted = t + EPOCH_WEEK_OFFSET_NS;
    let week_start = shifted / WEEK_NS * WEEK_NS;
    (week_start, shifted - week_start)
}

/// The latest slot at or before `t`, in schedule time.
fn slot_at_or_before(c: &Cadence, t: u128, scale: u32) -> Option<u128> {
    if let Some((start, period)) = periodic(c, scale) {
        return (t >= start).then(|| start + (t - start) / period * period);
    }
    let (week_start, in_week) = week_of(t);
    let best = |limit: u128| weekly_offsets(c).filter(|o| *o <= limit).max();
    let slot = match best(in_week) {
        Some(o) => week_start + o,
        None => week_start.checked_sub(WEEK_NS)? + best(WEEK_NS)?,
    };
    slot.checked_sub(EPOCH_WEEK_OFFSET_NS)
}

/// The first slot after `t`, in schedule time.
fn slot_after(c: &Cadence, t: u128, scale: u32) -> Option<u128> {
    if let Some((start, period)) = periodic(c, scale) {
        return Some(if t < start {
            start
        } else {
            start + ((t - start) / period + 1) * period
        });
    }
    let (week_start, in_week) = week_of(t);
    let slot = match weekly_offsets(c).filter(|o| *o > in_week).min() {
        Some(o) => week_start + o,
        None => week_start + WEEK_NS + weekly_offsets(c).min()?,
    };
    slot.checked_sub(EPOCH_WEEK_OFFSET_NS)
}

/// The slot of `p` due at real time `now` (the latest one not yet accounted for), if any.
/// At most one, however many were missed: this is the "one catch-up, never a storm" rule.
pub fn due_slot(p: &ResourcePolicy, now_unix_ns: u64, scale: u32) -> Option<u64> {
    let slot = slot_at_or_before(&p.schedule.cadence, to_schedule(now_unix_ns, scale), scale)?;
    let real = to_real(slot, scale);
    (real > p.fired_through_unix_ns && real <= now_unix_ns).then_some(real)
}

/// The real time of the next slot of `p` after `now` (when the reconciler should look again).
pub fn next_slot(p: &ResourcePolicy, now_unix_ns: u64, scale: u32) -> Option<u64> {
    let from = now_unix_ns.max(p.fired_through_unix_ns);
    slot_after(&p.schedule.cadence, to_schedule(from, scale), scale).map(|s| to_real(s, scale))
}

/// Policies whose slot is due at `now` and whose volume can be snapshotted now, and the
/// earliest later slot of any policy. Pure, like the reconciler's `pending`: after a crash it
/// finds the same due slots again.
pub fn due_fires(state: &State, now_unix_ns: u64, scale: u32) -> (Vec<Uuid>, Option<u64>) {
    let mut due = Vec::new();
    let mut next = None::<u64>;
    for p in state.resource_policies.by_uuid.values() {
        let ready = state
            .volumes
            .get(p.volume)
            .is_some_and(|v| v.state == VolumeState::Available);
        if ready && due_slot(p, now_unix_ns, scale).is_some() {
            due.push(p.uuid);
        }
        if let Some(t) = next_slot(p, now_unix_ns, scale) {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
    }
    (due, next)
}

/// `<policy>-YYYYMMDDTHHMMSSZ` (UTC), the name of the snapshot a slot takes.
pub fn snapshot_name(policy: &str, slot_unix_ns: u64) -> String {
    let secs = slot_unix_ns / 1_000_000_000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{policy}-{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// Days since 1970-01-01 → (year, month, day) (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

// ---- validation ----

/// The shortest gap between two slots of the cadence.
fn min_interval_ns(c: &Cadence) -> u128 {
    match c {
        Cadence::Hourly { hours, .. } => u128::from(*hours) * HOUR_NS,
        Cadence::Daily { days, .. } => u128::from(*days) * DAY_NS,
        Cadence::Weekly { entries } => {
            let mut offsets: Vec<u128> =
                entries.iter().map(WeeklyEntry::offset_in_week_ns).collect();
            offsets.sort_unstable();
            let wrap = offsets.first().map_or(WEEK_NS, |f| f + WEEK_NS);
            offsets
                .windows(2)
                .map(|w| w[1] - w[0])
                .chain(offsets.last().map(|l| wrap - l))
                .min()
                .unwrap_or(WEEK_NS)
        }
    }
}

fn invalid(text: String) -> DomainError {
    DomainError::InvalidArgument(text)
}

fn check_cadence(c: &Cadence) -> Result<(), DomainError> {
    match c {
        Cadence::Hourly { hours, .. } if !(1..=SCHEDULE_CYCLE_HOURS_MAX).contains(hours) => {
            Err(invalid(format!(
                "hoursInCycle must be 1-{SCHEDULE_CYCLE_HOURS_MAX}, not {hours}"
            )))
        }
        Cadence::Daily { days, .. } if !(1..=SCHEDULE_CYCLE_DAYS_MAX).contains(days) => {
            Err(invalid(format!(
                "daysInCycle must be 1-{SCHEDULE_CYCLE_DAYS_MAX}, not {days}"
            )))
        }
        Cadence::Weekly { entries } => {
            if entries.is_empty() || entries.len() > SCHEDULE_WEEKLY_ENTRIES_MAX {
                return Err(invalid(format!(
                    "weeklySchedule needs 1-{SCHEDULE_WEEKLY_ENTRIES_MAX} daysOfWeek entries, not {}",
                    entries.len()
                )));
            }
            if let Some(e) = entries.iter().find(|e| !(1..=7).contains(&e.day)) {
                return Err(invalid(format!(
                    "daysOfWeek day {} is not Sunday (1) … Saturday (7)",
                    e.day
                )));
            }
            let mut offsets: Vec<u128> =
                entries.iter().map(WeeklyEntry::offset_in_week_ns).collect();
            offsets.sort_unstable();
            offsets.dedup();
            if offsets.len() != entries.len() {
                return Err(invalid(
                    "daysOfWeek names the same day and time twice".into(),
                ));
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Validates a schedule: cadence bounds, a retention within the Duration range, and not so
/// long that one policy would keep more than [`SCHEDULED_SNAPSHOTS_KEPT_MAX`] snapshots.
pub fn check_schedule(s: &Schedule) -> Result<(), DomainError> {
    check_cadence(&s.cadence)?;
    if s.retention_secs == 0 {
        return Err(invalid(
            "schedulePolicy.retentionTime is required (how long each snapshot is kept)".into(),
        ));
    }
    if s.retention_secs > API_DURATION_SECS_MAX {
        return Err(invalid(format!(
            "retentionTime of {}s is longer than {API_DURATION_SECS_MAX}s",
            s.retention_secs
        )));
    }
    let kept = u128::from(s.retention_secs) * NS_PER_SEC / min_interval_ns(&s.cadence).max(1);
    if kept > SCHEDULED_SNAPSHOTS_KEPT_MAX as u128 {
        return Err(invalid(format!(
            "retentionTime of {}s would keep about {kept} snapshots of this schedule; at most {SCHEDULED_SNAPSHOTS_KEPT_MAX}",
            s.retention_secs
        )));
    }
    Ok(())
}

// ---- decide ----

fn check_room(state: &State, project: &str, volume: Uuid) -> Result<(), DomainError> {
    if state.resource_policies.of_volume(volume).count() >= RESOURCE_POLICIES_PER_VOLUME_MAX {
        return Err(DomainError::ResourceExhausted(format!(
            "volume {volume} already has {RESOURCE_POLICIES_PER_VOLUME_MAX} resource policies"
        )));
    }
    if state.resource_policies.in_project(project).count() >= RESOURCE_POLICIES_PER_PROJECT_MAX {
        return Err(DomainError::ResourceExhausted(format!(
            "project {project} already has {RESOURCE_POLICIES_PER_PROJECT_MAX} resource policies"
        )));
    }
    Ok(())
}

fn create(state: &State, ctx: &Ctx, n: &NewResourcePolicy) -> Result<Vec<AnyEvent>, DomainError> {
    state.projects.require(&n.project)?;
    check_name("resource policy", &n.name)?;
    if n.name.len() > POLICY_NAME_BYTES_MAX {
        return Err(invalid(format!(
            "resource policy name of {} bytes is longer than {POLICY_NAME_BYTES_MAX} (its snapshots are named <name>-YYYYMMDDTHHMMSSZ)",
            n.name.len()
        )));
    }
    check_description(&n.description)?;
    check_schedule(&n.schedule)?;
    let volume = state.volumes.resolve(&n.project, &n.volume)?;
    if matches!(
        volume.state,
        VolumeState::Deleting | VolumeState::Deleted | VolumeState::Failed
    ) {
        return Err(invalid(format!(
            "volume {} is {:?}",
            volume.uuid, volume.state
        )));
    }
    if state
        .resource_policies
        .in_project(&n.project)
        .any(|p| p.name == n.name)
    {
        return Err(DomainError::exists("resource policy", &n.name));
    }
    check_room(state, &n.project, volume.uuid)?;
    let policy = ResourcePolicy {
        uuid: ctx.new_id(0),
        name: n.name.clone(),
        project: n.project.clone(),
        description: n.description.clone(),
        volume: volume.uuid,
        schedule: n.schedule.clone(),
        fired_through_unix_ns: ctx.now_unix_ns,
        fires: 0,
        created_unix_ns: ctx.now_unix_ns,
        etag: 0,
    };
    Ok(vec![AnyEvent::Schedule(Event::ResourcePolicyCreated {
        policy: Box::new(policy),
    })])
}

/// The events of firing `p`'s due slot: the fire, and the snapshot it requests (or why not).
fn fire(state: &State, ctx: &Ctx, uuid: Uuid, scale: u32) -> Vec<AnyEvent> {
    let Some(p) = state.resource_policies.get(uuid) else {
        return vec![];
    };
    let Some(slot) = due_slot(p, ctx.now_unix_ns, scale) else {
        return vec![];
    };
    let Some(volume) = state.volumes.get(p.volume) else {
        return vec![];
    };
    if volume.state != VolumeState::Available {
        // Not a refusal: the slot stays due and fires once the volume is Available again.
        return vec![];
    }
    let name = snapshot_name(&p.name, slot);
    let skipped = if state.snapshots.by_name(&p.project, &name).is_some() {
        format!("a snapshot named {name} already exists")
    } else if state.snapshots.by_uuid.len() >= SNAPSHOTS_MAX {
        format!("the cluster holds {SNAPSHOTS_MAX} snapshots")
    } else {
        String::new()
    };
    let mut events = Vec::with_capacity(2);
    let mut snapshot_uuid = None;
    if skipped.is_empty() {
        let mut s = Snapshot::of(volume, ctx.new_id(0), &name, ctx.now_unix_ns);
        s.description = format!("taken by resource policy {}", p.name);
        s.retention_secs = p.schedule.retention_secs.div_ceil(u64::from(scale.max(1)));
        snapshot_uuid = Some(s.uuid);
        events.push(AnyEvent::Snapshot(
            SnapshotEvent::SnapshotCreationRequested {
                snapshot: Box::new(s),
            },
        ));
    }
    events.insert(
        0,
        AnyEvent::Schedule(Event::ResourcePolicyFired {
            uuid,
            slot_unix_ns: slot,
            snapshot: snapshot_uuid,
            skipped,
        }),
    );
    events
}

pub fn decide(state: &State, ctx: &Ctx, cmd: &Command) -> Result<Vec<AnyEvent>, DomainError> {
    match cmd {
        Command::CreateResourcePolicy(n) => create(state, ctx, n),
        Command::UpdateResourcePolicy {
            project,
            uuid,
            schedule,
            description,
            if_match,
        } => {
            state.projects.require(project)?;
            let p = state.resource_policies.resolve(project, *uuid)?;
            check_etag("resource policy", p.uuid, p.etag, if_match)?;
            check_schedule(schedule)?;
            let description = description.clone().unwrap_or_else(|| p.description.clone());
            check_description(&description)?;
            Ok(vec![AnyEvent::Schedule(Event::ResourcePolicyUpdated {
                uuid: p.uuid,
                schedule: schedule.clone(),
                description,
                since_unix_ns: ctx.now_unix_ns,
            })])
        }
        Command::DeleteResourcePolicy {
            project,
            uuid,
            if_match,
        } => {
            state.projects.require(project)?;
            let p = state.resource_policies.resolve(project, *uuid)?;
            check_etag("resource policy", p.uuid, p.etag, if_match)?;
            Ok(vec![AnyEvent::Schedule(Event::ResourcePolicyDeleted {
                uuid: p.uuid,
            })])
        }
        Command::FireResourcePolicy { uuid, clock_scale } => {
            Ok(fire(state, ctx, *uuid, *clock_scale))
        }
    }
}

/// A volume's deletion takes its policies with it: `ResourcePolicyDeleted` for each policy
/// of a volume whose `VolumeDeletionRequested` is among `events`, appended to them.
pub fn cascade_volume_deletions(state: &State, mut events: Vec<AnyEvent>) -> Vec<AnyEvent> {
    let doomed: Vec<Uuid> = events
        .iter()
        .filter_map(|e| match e {
            AnyEvent::Volume(VolumeEvent::VolumeDeletionRequested { uuid }) => Some(*uuid),
            _ => None,
        })
        .collect();
    for v in doomed {
        let policies: Vec<Uuid> = state
            .resource_policies
            .of_volume(v)
            .map(|p| p.uuid)
            .collect();
        events.extend(
            policies
                .into_iter()
                .map(|uuid| AnyEvent::Schedule(Event::ResourcePolicyDeleted { uuid })),
        );
    }
    events
}

pub fn evolve(state: &mut State, at: Applied, event: &Event) -> Vec<RowKey> {
    let uuid = event.uuid();
    let policies = &mut state.resource_policies.by_uuid;
    if let Event::ResourcePolicyCreated { policy } = event {
        let mut p = ResourcePolicy::clone(policy);
        p.etag = at.seq;
        policies.insert(uuid, p);
        return vec![RowKey::ResourcePolicy(uuid)];
    }
    if let Event::ResourcePolicyDeleted { .. } = event {
        policies.remove(&uuid);
        return vec![RowKey::ResourcePolicy(uuid)];
    }
    let p = policies
        .get_mut(&uuid)
        .expect("invariant: resource policy events after creation name an existing policy");
    match event {
        Event::ResourcePolicyUpdated {
            schedule,
            description,
            since_unix_ns,
            ..
        } => {
            p.schedule = schedule.clone();
            p.description = description.clone();
            p.fired_through_unix_ns = p.fired_through_unix_ns.max(*since_unix_ns);
            p.etag = at.seq;
        }
        Event::ResourcePolicyFired { slot_unix_ns, .. } => {
            // Not a change the API shows, so the ETag stays: an If-Match read before a fire
            // still holds.
            p.fired_through_unix_ns = p.fired_through_unix_ns.max(*slot_unix_ns);
            p.fires += 1;
        }
        Event::ResourcePolicyCreated { .. } | Event::ResourcePolicyDeleted { .. } => {}
    }
    vec![RowKey::ResourcePolicy(uuid)]
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::domain::snapshot::SnapshotState;
    use crate::domain::volume::tests::with_volume;
    use crate::domain::volume::Command as VolumeCommand;
    use crate::domain::{given_when, test_ctx, Command as AnyCommand};

    const S: u64 = 1_000_000_000;
    const H: u64 = 3_600 * S;
    const D: u64 = 24 * H;
    /// 2024-01-01T00:00:00Z, a Monday.
    pub(crate) const MONDAY: u64 = 1_704_067_200 * S;
    /// Ten weeks earlier: before `test_ctx()` time.
    const EARLY: u64 = MONDAY - 70 * D;

    pub(crate) fn hourly(start: u64, hours: u32, retention_secs: u64) -> Schedule {
        Schedule {
            cadence: Cadence::Hourly {
                start_unix_ns: start,
                hours,
            },
            retention_secs,
        }
    }

    pub(crate) fn new_policy(name: &str, schedule: Schedule) -> NewResourcePolicy {
        NewResourcePolicy {
            project: "default".into(),
            name: name.into(),
            volume: VolumeRef::Name("v1".into()),
            description: String::new(),
            schedule,
        }
    }

    fn create(n: NewResourcePolicy) -> AnyCommand {
        AnyCommand::Schedule(Command::CreateResourcePolicy(n))
    }

    fn policy_at(schedule: Schedule, fired_through: u64) -> ResourcePolicy {
        ResourcePolicy {
            uuid: Uuid::nil(),
            name: "p".into(),
            project: "default".into(),
            description: String::new(),
            volume: Uuid::nil(),
            schedule,
            fired_through_unix_ns: fired_through,
            fires: 0,
            created_unix_ns: fired_through,
            etag: 0,
        }
    }

    fn err(given: &[AnyEvent], cmd: AnyCommand) -> DomainError {
        given_when(given, cmd).unwrap_err()
    }

    #[test]
    fn hourly_and_daily_slots_count_from_the_start_time() {
        let p = policy_at(hourly(MONDAY, 2, 3600), MONDAY - 1);
        assert_eq!(due_slot(&p, MONDAY - 1, 1), None, "before the start");
        assert_eq!(due_slot(&p, MONDAY, 1), Some(MONDAY));
        assert_eq!(due_slot(&p, MONDAY + 3 * H, 1), Some(MONDAY + 2 * H));
        assert_eq!(next_slot(&p, MONDAY + 3 * H, 1), Some(MONDAY + 4 * H));
        let fired = policy_at(hourly(MONDAY, 2, 3600), MONDAY + 2 * H);
        assert_eq!(due_slot(&fired, MONDAY + 3 * H, 1), None, "already fired");
        let daily = Schedule {
            cadence: Cadence::Daily {
                start_unix_ns: MONDAY + 2 * H,
                days: 2,
            },
            retention_secs: 86_400,
        };
        let p = policy_at(daily, MONDAY);
        assert_eq!(due_slot(&p, MONDAY + D + 3 * H, 1), Some(MONDAY + 2 * H));
        assert_eq!(
            next_slot(&p, MONDAY + 3 * H, 1),
            Some(MONDAY + 2 * D + 2 * H)
        );
    }

    #[test]
    fn weekly_slots_fall_on_their_weekdays_and_times_of_day() {
        // Monday (2) at 04:30, Friday (6) at 02:30; the date part of a start time is ignored.
        let weekly = Schedule {
            cadence: Cadence::Weekly {
                entries: vec![
                    WeeklyEntry {
                        day: 2,
                        start_unix_ns: 4 * H + 1_800 * S,
                    },
                    WeeklyEntry {
                        day: 6,
                        start_unix_ns: MONDAY + 10 * D + 2 * H + 1_800 * S,
                    },
                ],
            },
            retention_secs: 86_400,
        };
        let p = policy_at(weekly, MONDAY - 7 * D);
        let mon = MONDAY + 4 * H + 1_800 * S;
        let fri = MONDAY + 4 * D + 2 * H + 1_800 * S;
        assert_eq!(due_slot(&p, mon, 1), Some(mon));
        assert_eq!(
            due_slot(&p, mon - 1, 1),
            Some(fri - 7 * D),
            "last week's Friday"
        );
        assert_eq!(due_slot(&p, fri + H, 1), Some(fri));
        assert_eq!(next_slot(&p, mon, 1), Some(fri));
        assert_eq!(next_slot(&p, fri, 1), Some(mon + 7 * D));
        assert_eq!(snapshot_name("p", fri), "p-20240105T023000Z");
    }

    #[test]
    fn after_downtime_only_the_latest_missed_slot_is_due() {
        let p = policy_at(hourly(MONDAY, 1, 3600), MONDAY + H);
        assert_eq!(due_slot(&p, MONDAY + 10 * H + 5, 1), Some(MONDAY + 10 * H));
        let caught_up = policy_at(hourly(MONDAY, 1, 3600), MONDAY + 10 * H);
        assert_eq!(due_slot(&caught_up, MONDAY + 10 * H + 5, 1), None);
    }

    #[test]
    fn the_clock_scale_shrinks_periods_from_the_real_start() {
        let p = policy_at(hourly(MONDAY, 1, 3600), MONDAY);
        assert_eq!(due_slot(&p, MONDAY + 2 * S + 5, 3600), Some(MONDAY + 2 * S));
        assert_eq!(next_slot(&p, MONDAY + 2 * S, 3600), Some(MONDAY + 3 * S));
    }

    #[test]
    fn invalid_schedules_are_400_with_the_reason() {
        let bad = |s: Schedule, says: &str| {
            let e = check_schedule(&s).unwrap_err();
            assert!(
                matches!(&e, DomainError::InvalidArgument(m) if m.contains(says)),
                "{e:?}"
            );
        };
        bad(hourly(MONDAY, 0, 3600), "hoursInCycle must be 1-8784");
        bad(
            hourly(MONDAY, SCHEDULE_CYCLE_HOURS_MAX + 1, 3600),
            "hoursInCycle",
        );
        bad(hourly(MONDAY, 1, 0), "retentionTime is required");
        bad(hourly(MONDAY, 1, API_DURATION_SECS_MAX + 1), "longer than");
        bad(hourly(MONDAY, 1, 3600 * 1025), "at most 1024");
        let daily = |days| Schedule {
            cadence: Cadence::Daily {
                start_unix_ns: MONDAY,
                days,
            },
            retention_secs: 3600,
        };
        bad(daily(0), "daysInCycle");
        bad(daily(SCHEDULE_CYCLE_DAYS_MAX + 1), "daysInCycle");
        let weekly = |entries: Vec<(u8, u64)>| Schedule {
            cadence: Cadence::Weekly {
                entries: entries
                    .into_iter()
                    .map(|(day, start_unix_ns)| WeeklyEntry { day, start_unix_ns })
                    .collect(),
            },
            retention_secs: 3600,
        };
        bad(weekly(vec![]), "1-28 daysOfWeek");
        bad(weekly(vec![(0, 0)]), "Sunday (1)");
        bad(weekly(vec![(8, 0)]), "Sunday (1)");
        bad(weekly(vec![(2, H), (2, D + H)]), "same day and time twice");
        bad(weekly(vec![(2, 0); 29]), "1-28");
        assert!(check_schedule(&weekly(vec![(2, H), (3, H)])).is_ok());
        assert!(check_schedule(&hourly(MONDAY, 1, 3600 * 1024)).is_ok());
    }

    #[test]
    fn create_checks_project_volume_name_and_limits() {
        let given = with_volume();
        let ok = new_policy("p1", hourly(MONDAY, 1, 3600));
        let events = given_when(&given, create(ok.clone())).unwrap();
        let [AnyEvent::Schedule(Event::ResourcePolicyCreated { policy })] = &events[..] else {
            panic!("{events:?}")
        };
        assert_eq!(policy.volume, test_ctx().new_id(0));
        assert_eq!(policy.fired_through_unix_ns, test_ctx().now_unix_ns);
        let mut n = ok.clone();
        n.project = "nope".into();
        assert!(matches!(err(&given, create(n)), DomainError::NotFound(_)));
        let mut n = ok.clone();
        n.volume = VolumeRef::Name("nope".into());
        assert!(matches!(err(&given, create(n)), DomainError::NotFound(_)));
        let mut n = ok.clone();
        n.name = "x".repeat(POLICY_NAME_BYTES_MAX + 1);
        assert!(matches!(
            err(&given, create(n)),
            DomainError::InvalidArgument(_)
        ));
        let mut n = ok.clone();
        n.description = "d".repeat(257);
        assert!(matches!(
            err(&given, create(n)),
            DomainError::InvalidArgument(_)
        ));
        let mut with_p1 = given.clone();
        with_p1.extend(events);
        assert!(matches!(
            err(&with_p1, create(ok.clone())),
            DomainError::AlreadyExists(_)
        ));
        // At most RESOURCE_POLICIES_PER_VOLUME_MAX on one volume.
        let mut full = given.clone();
        for i in 0..RESOURCE_POLICIES_PER_VOLUME_MAX {
            let mut ev = given_when(
                &full,
                create(new_policy(&format!("p{i}"), hourly(MONDAY, 1, 3600))),
            )
            .unwrap();
            if let AnyEvent::Schedule(Event::ResourcePolicyCreated { policy }) = &mut ev[0] {
                policy.uuid = Uuid::from_u128(i as u128 + 1);
            }
            full.extend(ev);
        }
        let e = err(
            &full,
            create(new_policy("one-more", hourly(MONDAY, 1, 3600))),
        );
        assert!(matches!(e, DomainError::ResourceExhausted(_)), "{e:?}");
    }

    /// [`with_volume`] plus policy `p1` (hourly from [`EARLY`], kept `retention_secs`),
    /// created at `test_ctx()` time.
    fn with_policy(retention_secs: u64) -> (Vec<AnyEvent>, Uuid) {
        let mut given = with_volume();
        let events = given_when(
            &given,
            create(new_policy("p1", hourly(EARLY, 1, retention_secs))),
        )
        .unwrap();
        given.extend(events);
        (given, test_ctx().new_id(0))
    }

    fn state_of(given: &[AnyEvent]) -> State {
        let mut state = State::default();
        for (i, e) in given.iter().enumerate() {
            let at = Applied {
                seq: i as u64 + 1,
                time_unix_ns: 1,
            };
            state.evolve(at, e);
        }
        state
    }

    #[test]
    fn a_fire_requests_one_named_snapshot_with_the_retention_and_only_once() {
        let (mut given, uuid) = with_policy(7200);
        let now = test_ctx().now_unix_ns;
        let mut ctx = test_ctx();
        ctx.now_unix_ns = now + H;
        ctx.seed = [9; 16];
        let state = state_of(&given);
        assert!(
            decide(
                &state,
                &test_ctx(),
                &Command::FireResourcePolicy {
                    uuid,
                    clock_scale: 1
                }
            )
            .unwrap()
            .is_empty(),
            "nothing due at creation"
        );
        let events = decide(
            &state,
            &ctx,
            &Command::FireResourcePolicy {
                uuid,
                clock_scale: 1,
            },
        )
        .unwrap();
        let [AnyEvent::Schedule(Event::ResourcePolicyFired {
            slot_unix_ns,
            snapshot: Some(s),
            skipped,
            ..
        }), AnyEvent::Snapshot(SnapshotEvent::SnapshotCreationRequested { snapshot })] =
            &events[..]
        else {
            panic!("{events:?}")
        };
        assert!(skipped.is_empty());
        assert_eq!(*s, snapshot.uuid);
        assert_eq!(*slot_unix_ns, (now + H - EARLY) / H * H + EARLY);
        assert_eq!(snapshot.name, snapshot_name("p1", *slot_unix_ns));
        assert_eq!(snapshot.retention_secs, 7200);
        assert_eq!(snapshot.source_volume, test_ctx().new_id(0));
        assert_eq!(snapshot.state, SnapshotState::Creating);
        given.extend(events);
        let state = state_of(&given);
        assert!(
            decide(
                &state,
                &ctx,
                &Command::FireResourcePolicy {
                    uuid,
                    clock_scale: 1
                }
            )
            .unwrap()
            .is_empty(),
            "the same slot again"
        );
        assert_eq!(state.resource_policies.get(uuid).unwrap().fires, 1);
    }

    #[test]
    fn a_fire_waits_for_an_available_volume_and_records_a_name_clash() {
        let (given, uuid) = with_policy(7200);
        let mut ctx = test_ctx();
        ctx.now_unix_ns += H;
        let mut state = state_of(&given);
        let vol = test_ctx().new_id(0);
        state.volumes.by_uuid.get_mut(&vol).unwrap().state = VolumeState::Rollback;
        let fire = Command::FireResourcePolicy {
            uuid,
            clock_scale: 1,
        };
        assert!(decide(&state, &ctx, &fire).unwrap().is_empty());
        assert!(due_fires(&state, ctx.now_unix_ns, 1).0.is_empty());
        state.volumes.by_uuid.get_mut(&vol).unwrap().state = VolumeState::Available;
        assert_eq!(due_fires(&state, ctx.now_unix_ns, 1).0, [uuid]);
        let events = decide(&state, &ctx, &fire).unwrap();
        let AnyEvent::Snapshot(SnapshotEvent::SnapshotCreationRequested { snapshot }) = &events[1]
        else {
            panic!("{events:?}")
        };
        // The same name already taken (say, a policy deleted and created again): the slot is
        // recorded as skipped, so it does not come back.
        let mut clash = snapshot.as_ref().clone();
        clash.uuid = Uuid::from_u128(77);
        state.snapshots.by_uuid.insert(clash.uuid, clash);
        let events = decide(&state, &ctx, &fire).unwrap();
        let [AnyEvent::Schedule(Event::ResourcePolicyFired {
            snapshot: None,
            skipped,
            ..
        })] = &events[..]
        else {
            panic!("{events:?}")
        };
        assert!(skipped.contains("already exists"), "{skipped}");
    }

    #[test]
    fn update_moves_the_schedule_forward_and_checks_the_etag() {
        let (given, uuid) = with_policy(7200);
        let update = |if_match: Option<&str>, schedule: Schedule| {
            AnyCommand::Schedule(Command::UpdateResourcePolicy {
                project: "default".into(),
                uuid,
                schedule,
                description: Some("new".into()),
                if_match: if_match.map(str::to_string),
            })
        };
        let e = err(&given, update(Some("1"), hourly(MONDAY, 2, 7200)));
        assert!(matches!(e, DomainError::EtagMismatch(_)), "{e:?}");
        let e = err(&given, update(None, hourly(MONDAY, 0, 7200)));
        assert!(matches!(e, DomainError::InvalidArgument(_)), "{e:?}");
        let etag = given.len().to_string();
        let events = given_when(&given, update(Some(&etag), hourly(MONDAY, 2, 7200))).unwrap();
        let mut after = given.clone();
        after.extend(events);
        let p = state_of(&after)
            .resource_policies
            .get(uuid)
            .unwrap()
            .clone();
        assert_eq!(p.description, "new");
        assert_eq!(p.schedule, hourly(MONDAY, 2, 7200));
        let missing = AnyCommand::Schedule(Command::DeleteResourcePolicy {
            project: "default".into(),
            uuid: Uuid::from_u128(5),
            if_match: None,
        });
        assert!(matches!(err(&after, missing), DomainError::NotFound(_)));
    }

    #[test]
    fn deleting_the_volume_deletes_its_policies() {
        let (given, uuid) = with_policy(7200);
        let events = given_when(
            &given,
            AnyCommand::Volume(VolumeCommand::DeleteVolume {
                project: "default".into(),
                target: VolumeRef::Name("v1".into()),
                if_match: None,
            }),
        )
        .unwrap();
        let names: Vec<&str> = events.iter().map(AnyEvent::type_name).collect();
        assert_eq!(names, ["VolumeDeletionRequested", "ResourcePolicyDeleted"]);
        let mut after = given.clone();
        after.extend(events);
        assert!(state_of(&after).resource_policies.get(uuid).is_none());
    }
}
