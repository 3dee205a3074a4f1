//! What billing stores and answers with.

use super::offers::{self, Offer};

/// Lifecycle of a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Active,
    Cancelled,
}

impl State {
    pub fn code(self) -> i64 {
        match self {
            State::Active => 1,
            State::Cancelled => 2,
        }
    }

    pub fn from_code(code: i64) -> Option<Self> {
        match code {
            1 => Some(State::Active),
            2 => Some(State::Cancelled),
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
}

impl Subscription {
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

/// What a change recorded in the change feed's outbox is (the values of
/// `billing.v1.ChangeType`). The store records one in the transaction of each write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    SubscriptionCreated = 2,
    SubscriptionCancelled = 4,
}

impl ChangeKind {
    pub fn from_value(value: i64) -> Option<Self> {
        Some(match value {
            2 => Self::SubscriptionCreated,
            4 => Self::SubscriptionCancelled,
            _ => return None,
        })
    }
}

/// A committed change as the feed reads it back: the subscription as it is after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeRecord {
    pub kind: ChangeKind,
    pub subscription: Subscription,
}
