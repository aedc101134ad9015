//! A simulated week of the scheduler, in milliseconds: the reconciler's pure pieces
//! (`pending`, `schedule::due_fires`, the completion commands) drive `decide`/`evolve` on a
//! simulated clock ticking every five minutes (hourly, daily and weekly policies), with two
//! outages after which the state is rebuilt from the recorded events (a restart).

use uuid::Uuid;

use super::{completion, pending, Work};
use crate::domain::schedule::tests::{hourly, new_policy, MONDAY};
use crate::domain::schedule::{self, Cadence, Command as ScheduleCommand, Schedule, WeeklyEntry};
use crate::domain::snapshot::{Command as SnapshotCommand, Event as SnapshotEvent, NewSnapshot};
use crate::domain::volume::tests::with_volume;
use crate::domain::volume::VolumeRef;
use crate::domain::{decide, Applied, Command, Ctx, Event, State};

const MIN: u64 = 60_000_000_000;
const H: u64 = 60 * MIN;
const D: u64 = 24 * H;
const TICK: u64 = 5 * MIN;

/// The cluster as the journal has it: every event with where it sits.
struct Sim {
    log: Vec<(Applied, Event)>,
    state: State,
    commands: u64,
}

impl Sim {
    fn new(given: Vec<Event>) -> Sim {
        let mut sim = Sim {
            log: Vec::new(),
            state: State::default(),
            commands: 0,
        };
        for e in given {
            sim.append(0, e);
        }
        sim
    }

    fn append(&mut self, now: u64, e: Event) {
        let at = Applied {
            seq: self.log.len() as u64 + 1,
            time_unix_ns: now,
        };
        self.state.evolve(at, &e);
        self.log.push((at, e));
    }

    fn submit(&mut self, now: u64, cmd: Command) -> Vec<Event> {
        self.commands += 1;
        let mut seed = [0u8; 16];
        seed[..8].copy_from_slice(&self.commands.to_le_bytes());
        let ctx = Ctx {
            now_unix_ns: now,
            actor: "sim".into(),
            seed,
        };
        let events = decide(&self.state, &ctx, &cmd).expect("the reconciler's commands are valid");
        for e in &events {
            self.append(now, e.clone());
        }
        events
    }

    /// One pass of the reconciler at `now`, repeated until nothing is left (as the real one
    /// wakes on its own commits). Returns the slots fired in this tick, per policy.
    fn tick(&mut self, now: u64) -> Vec<(Uuid, u64)> {
        let mut fired = Vec::new();
        loop {
            let (mut work, _) = pending(&self.state, now);
            let (fires, _) = schedule::due_fires(&self.state, now, 1);
            work.extend(fires.into_iter().map(|u| Work::Fire(u, 1)));
            if work.is_empty() {
                return fired;
            }
            for w in work {
                let (cmd, _) = completion(&w);
                for e in self.submit(now, cmd) {
                    if let Event::Schedule(schedule::Event::ResourcePolicyFired {
                        uuid,
                        slot_unix_ns,
                        ..
                    }) = e
                    {
                        fired.push((uuid, slot_unix_ns));
                    }
                }
            }
        }
    }

    /// A restart: the state rebuilt from the journal alone must be the live one.
    fn restart(&mut self) {
        let mut rebuilt = State::default();
        for (at, e) in &self.log {
            rebuilt.evolve(*at, e);
        }
        assert_eq!(rebuilt, self.state, "replay differs from the live state");
        self.state = rebuilt;
    }
}

/// The slots of `every` from `start` in `[start, end)`.
fn slots(start: u64, every: u64, end: u64) -> Vec<u64> {
    (0..)
        .map(|k| start + k * every)
        .take_while(|t| *t < end)
        .collect()
}

/// What must fire: every slot the server was up for, plus, per outage `[from, to)`, only the
/// latest slot it missed.
fn expected(all: &[u64], outages: &[(u64, u64)]) -> Vec<u64> {
    let down = |t: &u64| outages.iter().any(|(f, to)| *f <= *t && *t < *to);
    let mut want: Vec<u64> = all.iter().copied().filter(|t| !down(t)).collect();
    for (f, to) in outages {
        want.extend(all.iter().copied().filter(|t| *f <= *t && *t < *to).max());
    }
    want.sort_unstable();
    want
}

#[test]
fn a_simulated_week_fires_and_expires_exactly_as_scheduled_across_restarts() {
    let mut sim = Sim::new(with_volume());
    let t0 = MONDAY;
    let end = t0 + 7 * D;
    // Wednesday 10:20 to 17:40, and Thursday 01:00 to Friday 05:10.
    let outages = [
        (
            t0 + 2 * D + 10 * H + 20 * MIN,
            t0 + 2 * D + 17 * H + 40 * MIN,
        ),
        (t0 + 3 * D + H, t0 + 4 * D + 5 * H + 10 * MIN),
    ];
    let created = t0 - 30 * MIN;
    let daily = new_policy(
        "daily",
        Schedule {
            cadence: Cadence::Daily {
                start_unix_ns: t0 + 2 * H,
                days: 1,
            },
            retention_secs: 72 * 3600,
        },
    );
    // Tuesday 06:00, Thursday 12:00 (in the second outage), Saturday 18:00; kept 5 days.
    let weekly_at = [(3u8, 6 * H), (5, 12 * H), (7, 18 * H)];
    let weekly = new_policy(
        "weekly",
        Schedule {
            cadence: Cadence::Weekly {
                entries: weekly_at
                    .iter()
                    .map(|(day, time)| WeeklyEntry {
                        day: *day,
                        start_unix_ns: *time,
                    })
                    .collect(),
            },
            retention_secs: 5 * 24 * 3600,
        },
    );
    let create = |n| Command::Schedule(ScheduleCommand::CreateResourcePolicy(n));
    let hourly_id = sim.submit(
        created,
        create(new_policy("hourly", hourly(t0, 1, 6 * 3600))),
    )[0]
    .clone();
    let daily_id = sim.submit(created, create(daily))[0].clone();
    let id = |e: Event| match e {
        Event::Schedule(schedule::Event::ResourcePolicyCreated { policy }) => policy.uuid,
        other => panic!("{other:?}"),
    };
    let weekly_id = id(sim.submit(created, create(weekly))[0].clone());
    let (hourly_id, daily_id) = (id(hourly_id), id(daily_id));
    // A snapshot no policy took, without retention: never expired.
    let manual = sim.submit(
        created,
        Command::Snapshot(SnapshotCommand::CreateSnapshot(NewSnapshot {
            project: "default".into(),
            name: "manual".into(),
            source: VolumeRef::Name("v1".into()),
            description: String::new(),
            retention_secs: 0,
        })),
    );
    let manual = match &manual[0] {
        Event::Snapshot(SnapshotEvent::SnapshotCreationRequested { snapshot }) => snapshot.uuid,
        other => panic!("{other:?}"),
    };

    let mut fired: Vec<(Uuid, u64)> = Vec::new();
    let mut now = created;
    let mut was_down = false;
    while now < end {
        let down = outages.iter().any(|(f, to)| *f <= now && now < *to);
        if down {
            was_down = true;
        } else {
            if was_down {
                sim.restart();
                was_down = false;
            }
            let this_tick = sim.tick(now);
            for p in [hourly_id, daily_id, weekly_id] {
                let n = this_tick.iter().filter(|(u, _)| *u == p).count();
                assert!(n <= 1, "{n} fires of one policy at {now}: a storm");
            }
            fired.extend(this_tick);
            // Nothing outlives its retention by a tick while the server is up.
            for s in sim.state.snapshots.by_uuid.values() {
                assert!(
                    s.expiry_unix_ns().is_none_or(|t| t > now),
                    "{} kept past its retention",
                    s.name
                );
            }
        }
        now += TICK;
    }

    let of = |p: Uuid| -> Vec<u64> {
        fired
            .iter()
            .filter(|(u, _)| *u == p)
            .map(|(_, t)| *t)
            .collect()
    };
    let want_hourly = expected(&slots(t0, H, end), &outages);
    let want_daily = expected(&slots(t0 + 2 * H, D, end), &outages);
    assert_eq!(want_hourly.len(), 168 - 6 - 28);
    assert_eq!(want_daily.len(), 6);
    assert_eq!(of(hourly_id), want_hourly);
    assert_eq!(of(daily_id), want_daily);
    // Monday is day 2: Tuesday (3) is one day after t0.
    let weekly_slots: Vec<u64> = weekly_at
        .iter()
        .map(|(day, time)| t0 + u64::from(day - 2) * D + time)
        .collect();
    let want_weekly = expected(&weekly_slots, &outages);
    assert_eq!(want_weekly.len(), 3);
    assert_eq!(of(weekly_id), want_weekly);

    // What is left at the end: the hourly snapshots of the last six hours, the daily ones of
    // Friday (the catch-up), Saturday and Sunday, and the manual one.
    let live = |prefix: &str| -> Vec<String> {
        let mut names: Vec<String> = sim
            .state
            .snapshots
            .by_uuid
            .values()
            .filter(|s| s.name.starts_with(prefix))
            .map(|s| s.name.clone())
            .collect();
        names.sort();
        names
    };
    assert_eq!(live("hourly-").len(), 6, "{:?}", live("hourly-"));
    assert_eq!(
        live("daily-"),
        [
            "daily-20240105T020000Z",
            "daily-20240106T020000Z",
            "daily-20240107T020000Z"
        ]
    );
    assert_eq!(
        live("weekly-"),
        ["weekly-20240104T120000Z", "weekly-20240106T180000Z"]
    );
    assert!(sim.state.snapshots.get(manual).is_some());
    // Each snapshot a policy took and that is gone was expired exactly once, by an event.
    let expired = sim
        .log
        .iter()
        .filter(|(_, e)| matches!(e, Event::Snapshot(SnapshotEvent::SnapshotExpired { .. })))
        .count();
    assert_eq!(
        expired,
        want_hourly.len() - 6 + want_daily.len() - 3 + want_weekly.len() - 2
    );
    sim.restart();
}
