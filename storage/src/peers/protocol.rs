//! The peer-lease protocol's rules, apart from the SQL and the connections that drive them
//! ([`super`]): what a notification says, what a holder does with it, how long its lease
//! lasts, when a writer may stop waiting for acknowledgements. Time comes in as arguments
//! (monotonic instants), so each rule is tested below on instants the test chooses.

use std::collections::HashSet;
use std::time::{Duration, Instant};

/// How long a registration or renewal holds, by the database's clock.
pub const LEASE: Duration = Duration::from_secs(3);
/// How long before the database's expiry this process stops answering from its cache.
pub const MARGIN: Duration = Duration::from_millis(500);
/// How often a holder sends itself a heartbeat (each one renews the lease).
pub const BEAT: Duration = Duration::from_millis(500);
/// How long a writer waits for acknowledgements before it sends another fence.
pub const REFENCE: Duration = Duration::from_secs(1);
/// How long after a commit no lease can still cover a copy older than it (see
/// [`Settle`]), with some slack for clocks running at slightly different rates.
pub const SAFE_AFTER: Duration = Duration::from_millis(2700);
const _: () = assert!(SAFE_AFTER.as_millis() > LEASE.as_millis() - MARGIN.as_millis());
/// How long after its expiry a holder's row is deleted by writers (until then a writer waits
/// [`SAFE_AFTER`] for a holder that died without withdrawing).
pub const FORGET_AFTER: Duration = Duration::from_secs(30);
/// Silence on the listening connection longer than this means it died without a word (a cut
/// network): the holder's own heartbeats would have come back through it.
pub const SILENCE: Duration = LEASE;

/// The channel writers' announcements, fences and heartbeats go on.
pub const INVALIDATIONS: &str = "cache_invalidations";
/// The channel holders acknowledge fences on.
pub const ACKS: &str = "cache_acks";

/// A notification, as sent and as it arrives on the listening connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Note<'a> {
    /// The row `key` of `kind` changed (sent within the write's transaction).
    Invalidate { kind: &'a str, key: &'a str },
    /// A writer asks every holder to acknowledge once it has handled what came before.
    Fence { token: &'a str },
    /// A holder's heartbeat: who sent it, when by its monotonic clock (nanoseconds after its
    /// base instant), and when by the database's clock (microseconds since the epoch).
    Beat {
        holder: &'a str,
        sent_ns: u64,
        database_us: i64,
    },
    /// `holder` has handled everything before the fence `token`.
    Ack { token: &'a str, holder: &'a str },
}

impl<'a> Note<'a> {
    /// Reads a notification of `channel`; `None` for anything else (never trusted further).
    pub fn parse(channel: &str, payload: &'a str) -> Option<Self> {
        if channel == ACKS {
            let (token, holder) = payload.split_once(' ')?;
            return Some(Self::Ack { token, holder });
        }
        if channel != INVALIDATIONS {
            return None;
        }
        if let Some(rest) = payload.strip_prefix("inval:") {
            let (kind, key) = rest.split_once(':')?;
            Some(Self::Invalidate { kind, key })
        } else if let Some(token) = payload.strip_prefix("fence:") {
            Some(Self::Fence { token })
        } else {
            let mut parts = payload.strip_prefix("beat:")?.split(':');
            let holder = parts.next()?;
            let sent_ns = parts.next()?.parse().ok()?;
            let database_us = parts.next()?.parse().ok()?;
            parts.next().is_none().then_some(Self::Beat {
                holder,
                sent_ns,
                database_us,
            })
        }
    }

    /// The payload that [`Note::parse`] reads back as this note, on its channel.
    pub fn payload(&self) -> String {
        match self {
            Self::Invalidate { kind, key } => format!("inval:{kind}:{key}"),
            Self::Fence { token } => format!("fence:{token}"),
            Self::Beat {
                holder,
                sent_ns,
                database_us,
            } => format!("beat:{holder}:{sent_ns}:{database_us}"),
            Self::Ack { token, holder } => format!("{token} {holder}"),
        }
    }
}

/// The payload of a heartbeat of `id` sent at `sent`, counted from `base`, less the
/// database's clock, which the sending statement appends (see [`Note::Beat`]).
pub fn beat_prefix(id: &str, base: Instant, sent: Instant) -> String {
    let sent_ns = sent.saturating_duration_since(base).as_nanos();
    format!("beat:{id}:{sent_ns}:")
}

/// What the listening side does with a notification.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<'a> {
    /// Drop the row from the caches of `kind`.
    Invalidate { kind: &'a str, key: &'a str },
    /// Acknowledge the fence on [`ACKS`] as this holder.
    Acknowledge { token: &'a str },
    /// Hand the acknowledgement to this process's writer waiting on `token`, if any.
    Deliver { token: &'a str, holder: &'a str },
    /// Renew the row (only if it has not expired) to the heartbeat's database time plus
    /// [`LEASE`]; then report the outcome with [`Holder::renewed`].
    Renew { database_us: i64, sent: Instant },
    /// Nothing to do.
    Ignore,
}

/// One listening connection's life, on the holder's side. A process without caches listens
/// too (for its writers' acknowledgements) but holds nothing.
#[derive(Debug)]
pub struct Holder {
    /// The id its heartbeats (and, when holding, its registration) go under.
    id: String,
    /// Whether this process holds caches.
    holding: bool,
    /// The instant heartbeats' sending times count from.
    base: Instant,
    /// Until when the caches may answer; `None` before registration and after losing it.
    until: Option<Instant>,
}

impl Holder {
    /// A listener whose heartbeats go under `id` and count time from `base`; `holding`: it
    /// registers as a holder of caches under that id.
    pub fn new(id: String, holding: bool, base: Instant) -> Self {
        Self {
            id,
            holding,
            base,
            until: None,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn holding(&self) -> bool {
        self.holding
    }

    /// The registration committed; its statement was sent at `sent`. The caches must be
    /// emptied before answering (nothing read before the registration is kept); the lease
    /// holds until the returned instant, which is before the row expires by the database's
    /// clock (that began after `sent`).
    pub fn registered(&mut self, sent: Instant) -> Instant {
        self.extend(sent)
    }

    /// What to do with `note`.
    pub fn on_note<'a>(&self, note: Note<'a>) -> Step<'a> {
        match note {
            Note::Ack { token, holder } => Step::Deliver { token, holder },
            // A listener without caches only delivers acknowledgements.
            _ if !self.holding => Step::Ignore,
            Note::Invalidate { kind, key } => Step::Invalidate { kind, key },
            // Notifications arrive in commit order and are handled in order: everything
            // committed before the fence has been handled by now.
            Note::Fence { token } => Step::Acknowledge { token },
            Note::Beat {
                holder,
                sent_ns,
                database_us,
            } if holder == self.id => Step::Renew {
                database_us,
                sent: self.base + Duration::from_nanos(sent_ns),
            },
            // Another holder's heartbeat.
            Note::Beat { .. } => Step::Ignore,
        }
    }

    /// The outcome of a [`Step::Renew`] for a heartbeat sent at `sent`: `Some(until)` when the
    /// row was renewed, extending the lease from the heartbeat's *sending* time, so a holder
    /// that lags behind its notifications holds no lease past what it had handled when the
    /// heartbeat was sent; `None` when the row had expired or is gone: the lease is lost and
    /// the holder registers afresh (emptying its caches).
    pub fn renewed(&mut self, sent: Instant, rows_affected: u64) -> Option<Instant> {
        if rows_affected == 1 {
            Some(self.extend(sent))
        } else {
            self.lost();
            None
        }
    }

    /// The connection was lost, failed or fell silent: the caches stop answering at once.
    pub fn lost(&mut self) {
        self.until = None;
    }

    /// Whether the caches may answer at `now`.
    pub fn valid_at(&self, now: Instant) -> bool {
        self.until.is_some_and(|until| now < until)
    }

    fn extend(&mut self, from: Instant) -> Instant {
        let until = from + LEASE - MARGIN;
        // A heartbeat handled late never shortens a lease a later one gave.
        let until = self.until.map_or(until, |held| held.max(until));
        self.until = Some(until);
        until
    }
}

/// A writer waiting, after its commit, for every holder to acknowledge a fence sent after it.
///
/// It may stop when all have, and in any case [`SAFE_AFTER`] after it started: a lease only
/// grows from a heartbeat, and lasts until that heartbeat's sending time plus
/// `LEASE - MARGIN`; a heartbeat sent after the commit reaches its holder after the
/// announcement (notifications arrive in commit order), so a holder that has not handled the
/// announcement holds at most a lease from a heartbeat sent before the commit, which has run
/// out by then.
#[derive(Debug)]
pub struct Settle {
    started: Instant,
    pending: HashSet<String>,
    last_fence: Option<Instant>,
}

/// What a writer does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Every holder acknowledged.
    Done,
    /// Send a fence (the first, or another after [`REFENCE`] of silence: an acknowledgement
    /// may have been lost with the writer's own listening connection).
    Fence,
    /// Wait for acknowledgements until this instant.
    WaitUntil(Instant),
    /// [`SAFE_AFTER`] has passed: no holder can still answer from a copy older than the write.
    WaitedOut,
}

impl Settle {
    /// Started at `started` (after the commit) with the holders registered then.
    pub fn new(started: Instant, holders: impl IntoIterator<Item = String>) -> Self {
        Self {
            started,
            pending: holders.into_iter().collect(),
            last_fence: None,
        }
    }

    /// The instant after which the writer stops waiting whatever happened.
    pub fn deadline(&self) -> Instant {
        self.started + SAFE_AFTER
    }

    /// A fence was sent at `at`.
    pub fn fenced(&mut self, at: Instant) {
        self.last_fence = Some(at);
    }

    /// `holder` acknowledged a fence of this writer's.
    pub fn acknowledged(&mut self, holder: &str) {
        self.pending.remove(holder);
    }

    pub fn next(&self, now: Instant) -> Next {
        if self.pending.is_empty() {
            return Next::Done;
        }
        if now >= self.deadline() {
            return Next::WaitedOut;
        }
        match self.last_fence {
            None => Next::Fence,
            Some(at) if now >= at + REFENCE => Next::Fence,
            Some(at) => Next::WaitUntil((at + REFENCE).min(self.deadline())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn holder(t0: Instant) -> Holder {
        Holder::new("h1".to_owned(), true, t0)
    }

    #[test]
    fn notes_round_trip_and_anything_else_is_ignored() {
        let notes = [
            (
                INVALIDATIONS,
                Note::Invalidate {
                    kind: "users",
                    key: "u:1",
                },
            ),
            (INVALIDATIONS, Note::Fence { token: "abc" }),
            (
                INVALIDATIONS,
                Note::Beat {
                    holder: "h1",
                    sent_ns: 42,
                    database_us: 1_800_000_000_000_000,
                },
            ),
            (
                ACKS,
                Note::Ack {
                    token: "abc",
                    holder: "h1",
                },
            ),
        ];
        for (channel, note) in notes {
            let payload = note.payload();
            assert_eq!(Note::parse(channel, &payload), Some(note), "{payload}");
        }
        // A key may hold ':' (only the first one splits kind from key).
        assert_eq!(
            Note::parse(INVALIDATIONS, "inval:users:a:b"),
            Some(Note::Invalidate {
                kind: "users",
                key: "a:b"
            })
        );
        for (channel, payload) in [
            ("other", "inval:users:1"),
            (INVALIDATIONS, "inval:users"),
            (INVALIDATIONS, "beat:h1:x:1"),
            (INVALIDATIONS, "beat:h1:1"),
            (INVALIDATIONS, "beat:h1:1:2:3"),
            (INVALIDATIONS, "hello"),
            (ACKS, "no-space"),
        ] {
            assert_eq!(Note::parse(channel, payload), None, "{channel} {payload}");
        }
    }

    #[test]
    fn a_registration_holds_until_lease_less_margin_after_it_was_sent() {
        let t0 = Instant::now();
        let mut h = holder(t0);
        assert!(!h.valid_at(t0), "nothing before registering");
        let until = h.registered(t0 + ms(100));
        assert_eq!(until, t0 + ms(100) + LEASE - MARGIN);
        assert!(h.valid_at(until - ms(1)));
        assert!(!h.valid_at(until), "the lease ends at its bound, not after");
    }

    #[test]
    fn a_heartbeat_renews_from_when_it_was_sent_not_when_it_arrived() {
        let t0 = Instant::now();
        let mut h = holder(t0);
        h.registered(t0);
        let beat = Note::Beat {
            holder: "h1",
            sent_ns: ms(1000).as_nanos() as u64,
            database_us: 7,
        };
        let Step::Renew { database_us, sent } = h.on_note(beat) else {
            panic!("our own heartbeat renews");
        };
        assert_eq!((database_us, sent), (7, t0 + ms(1000)));
        // Handled at 2.4 s (a lagging listener): the lease counts from 1 s all the same.
        let until = h.renewed(sent, 1).expect("renewed");
        assert_eq!(until, t0 + ms(1000) + LEASE - MARGIN);
        assert!(h.valid_at(t0 + ms(3499)));
        assert!(!h.valid_at(t0 + ms(3500)));
    }

    #[test]
    fn a_late_heartbeat_never_shortens_the_lease() {
        let t0 = Instant::now();
        let mut h = holder(t0);
        h.registered(t0 + ms(2000));
        let until = h.renewed(t0 + ms(500), 1).expect("renewed");
        assert_eq!(until, t0 + ms(2000) + LEASE - MARGIN);
    }

    #[test]
    fn a_refused_renewal_loses_the_lease_at_once() {
        let t0 = Instant::now();
        let mut h = holder(t0);
        h.registered(t0);
        assert!(h.valid_at(t0 + ms(1)));
        assert_eq!(h.renewed(t0 + ms(500), 0), None, "the row had expired");
        assert!(!h.valid_at(t0 + ms(501)), "stops answering at once");
    }

    #[test]
    fn a_heartbeat_carries_its_sending_time_back_to_its_holder() {
        let t0 = Instant::now();
        let h = holder(t0);
        let payload = format!("{}1800000000000000", beat_prefix(h.id(), t0, t0 + ms(1500)));
        let note = Note::parse(INVALIDATIONS, &payload).expect("a heartbeat");
        assert_eq!(
            h.on_note(note),
            Step::Renew {
                database_us: 1_800_000_000_000_000,
                sent: t0 + ms(1500)
            }
        );
    }

    #[test]
    fn a_lost_connection_stops_the_caches_at_once() {
        let t0 = Instant::now();
        let mut h = holder(t0);
        h.registered(t0);
        h.lost();
        assert!(!h.valid_at(t0));
    }

    #[test]
    fn a_holder_invalidates_acknowledges_and_renews_only_its_own_heartbeats() {
        let t0 = Instant::now();
        let h = holder(t0);
        assert_eq!(
            h.on_note(Note::Invalidate {
                kind: "users",
                key: "1"
            }),
            Step::Invalidate {
                kind: "users",
                key: "1"
            }
        );
        assert_eq!(
            h.on_note(Note::Fence { token: "f" }),
            Step::Acknowledge { token: "f" }
        );
        assert_eq!(
            h.on_note(Note::Beat {
                holder: "h2",
                sent_ns: 1,
                database_us: 1
            }),
            Step::Ignore,
            "another holder's heartbeat"
        );
        assert_eq!(
            h.on_note(Note::Ack {
                token: "f",
                holder: "h2"
            }),
            Step::Deliver {
                token: "f",
                holder: "h2"
            }
        );
    }

    #[test]
    fn a_listener_without_caches_only_delivers_acknowledgements() {
        let t0 = Instant::now();
        let h = Holder::new("h3".to_owned(), false, t0);
        assert_eq!(
            h.on_note(Note::Invalidate {
                kind: "users",
                key: "1"
            }),
            Step::Ignore
        );
        assert_eq!(h.on_note(Note::Fence { token: "f" }), Step::Ignore);
        assert_eq!(
            h.on_note(Note::Beat {
                holder: "h3",
                sent_ns: 1,
                database_us: 1
            }),
            Step::Ignore,
            "its own heartbeats only keep the connection from falling silent"
        );
        assert_eq!(
            h.on_note(Note::Ack {
                token: "f",
                holder: "h2"
            }),
            Step::Deliver {
                token: "f",
                holder: "h2"
            }
        );
    }

    #[test]
    fn a_writer_with_no_holders_is_done_at_once() {
        let t0 = Instant::now();
        assert_eq!(Settle::new(t0, []).next(t0), Next::Done);
    }

    #[test]
    fn a_writer_fences_waits_refences_after_silence_and_is_done_when_all_acknowledged() {
        let t0 = Instant::now();
        let mut s = Settle::new(t0, ["h1".to_owned(), "h2".to_owned()]);
        assert_eq!(s.next(t0), Next::Fence);
        s.fenced(t0);
        assert_eq!(s.next(t0 + ms(10)), Next::WaitUntil(t0 + REFENCE));
        s.acknowledged("h1");
        s.acknowledged("stranger");
        assert_eq!(s.next(t0 + ms(20)), Next::WaitUntil(t0 + REFENCE));
        assert_eq!(s.next(t0 + REFENCE), Next::Fence, "silence: ask again");
        s.fenced(t0 + REFENCE);
        // The second wait is cut at the deadline.
        assert_eq!(
            s.next(t0 + REFENCE + ms(1)),
            Next::WaitUntil(t0 + REFENCE + REFENCE)
        );
        s.fenced(t0 + ms(2000));
        assert_eq!(s.next(t0 + ms(2001)), Next::WaitUntil(t0 + SAFE_AFTER));
        s.acknowledged("h2");
        assert_eq!(s.next(t0 + ms(2002)), Next::Done);
    }

    #[test]
    fn a_writer_stops_waiting_for_a_silent_holder_after_safe_after() {
        let t0 = Instant::now();
        let mut s = Settle::new(t0, ["dead".to_owned()]);
        s.fenced(t0);
        assert_ne!(s.next(t0 + SAFE_AFTER - ms(1)), Next::WaitedOut);
        assert_eq!(s.next(t0 + SAFE_AFTER), Next::WaitedOut);
    }

    /// The rule the writer's wait rests on: a holder that has not handled a write's
    /// announcement holds at most a lease from a heartbeat sent before the commit, and every
    /// such lease has ended by the time the writer stops waiting.
    #[test]
    fn no_lease_from_before_a_commit_outlives_the_writers_wait() {
        let t0 = Instant::now();
        let commit = t0 + ms(10_000);
        for before in (0..=3_000).step_by(50) {
            let sent = commit - ms(before);
            let mut h = holder(t0);
            h.registered(sent);
            let until = h.renewed(sent, 1).expect("renewed");
            let settle = Settle::new(commit, ["h1".to_owned()]);
            assert!(
                !h.valid_at(settle.deadline()),
                "a heartbeat sent {before} ms before the commit holds until {:?} after it",
                until - commit
            );
        }
    }
}
