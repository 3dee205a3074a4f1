//! What billing stores and answers with.

use super::offers::{self, Offer};

/// Lifecycle of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Active,
    Cancelled,
    /// A free trial past its end.
    Expired,
}

impl State {
    pub fn code(self) -> i64 {
        match self {
            State::Active => 1,
            State::Cancelled => 2,
            State::Expired => 3,
        }
    }

    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            1 => Some(State::Active),
            2 => Some(State::Cancelled),
            3 => Some(State::Expired),
            _ => None,
        }
    }
}

/// A subscription, placed in the directory of the user who bought it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub id: String,
    pub offer: &'static Offer,
    pub display_name: String,
    pub directory_id: String,
    /// The owning user; `None` when the directory owns it.
    pub owner_user_id: Option<String>,
    pub seats: i32,
    pub state: State,
    pub created_by_user_id: String,
    /// Microseconds since the Unix epoch.
    pub create_time: i64,
    pub cancel_time: Option<i64>,
    /// When a free trial ends; `None` on other subscriptions.
    pub end_time: Option<i64>,
}

impl Subscription {
    /// The subscription as it reads at `now`: an active trial whose end has come is expired,
    /// whether or not the task that records its end has run yet.
    pub fn as_of(mut self, now: i64) -> Self {
        if self.state == State::Active && self.end_time.is_some_and(|end| end <= now) {
            self.state = State::Expired;
        }
        self
    }

    /// The keyset position of this subscription in list order.
    pub fn list_key(&self) -> String {
        format!("{}|{}", self.create_time, self.id)
    }

    pub fn owned_by(&self, user_id: &str) -> bool {
        self.owner_user_id.as_deref() == Some(user_id)
    }

    pub fn is_azure(&self) -> bool {
        self.offer.family == offers::ProductFamily::Azure
    }
}

/// One page of subscriptions.
#[derive(Debug)]
pub struct SubscriptionPage {
    pub subscriptions: Vec<Subscription>,
    /// Empty on the last page.
    pub next_page_token: String,
}

/// One user's licence of one offer: a seat of its directory's pool of that offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub user_id: String,
    pub offer: &'static Offer,
    pub directory_id: String,
    /// Microseconds since the Unix epoch.
    pub assign_time: i64,
}

impl Assignment {
    /// The keyset position of this assignment in list order (user, then offer).
    pub fn list_key(&self) -> (String, String) {
        (self.user_id.clone(), self.offer.id.to_owned())
    }
}

/// The seats of one offer in one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct License {
    pub offer: &'static Offer,
    /// Seats of the directory's active subscriptions of the offer.
    pub enabled: i64,
    /// Licences of the offer assigned to active users.
    pub consumed: i64,
}

/// One page of assignments.
#[derive(Debug)]
pub struct AssignmentPage {
    pub assignments: Vec<Assignment>,
    /// Empty on the last page.
    pub next_page_token: String,
}

/// What the store did with an assignment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assigned {
    /// Assigned now: a seat taken.
    New(Assignment),
    /// The user holds it already: as it was.
    Held(Assignment),
    /// Every seat of the pool is taken (or the directory has none of the offer).
    NoSeat,
    /// Billing has seen the user deleted.
    UserDeleted,
}

/// What the store did with an upgrade of a free trial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upgraded {
    /// Upgraded now.
    Now(Subscription),
    /// On the target offer already: as it is.
    Already(Subscription),
    /// Not an active or expired free trial.
    NotConvertible,
}

/// What the store did with a transfer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transferred {
    /// To the new owner now.
    Now(Subscription),
    /// Owned by them already: as it is.
    Already(Subscription),
    /// Not an active pay-as-you-go subscription.
    NotTransferable(Subscription),
}

/// What the store did with a change of seats.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeatsChanged {
    Changed(Subscription),
    /// It had that many already.
    Unchanged(Subscription),
    /// Cancelled.
    NotActive,
    /// Not sold per seat (Azure).
    NotPerSeat,
    /// The pool would have fewer seats than assigned licences.
    InUse,
}

/// What a change recorded in the change feed's outbox is (the values of
/// `billing.v1.ChangeType`). The store records one in the transaction of each write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    SubscriptionCreated = 2,
    SubscriptionUpdated = 3,
    SubscriptionCancelled = 4,
    LicenseAssigned = 5,
    LicenseRemoved = 6,
}

impl ChangeKind {
    pub fn from_value(value: i64) -> Option<Self> {
        Some(match value {
            2 => Self::SubscriptionCreated,
            3 => Self::SubscriptionUpdated,
            4 => Self::SubscriptionCancelled,
            5 => Self::LicenseAssigned,
            6 => Self::LicenseRemoved,
            _ => return None,
        })
    }
}

/// What a change is about, as it is after the change (a removed licence: as it last was).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    Subscription(Subscription),
    Assignment(Assignment),
}

/// A committed change as the feed reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    pub kind: ChangeKind,
    pub resource: Changed,
}
