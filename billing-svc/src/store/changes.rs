//! Billing's changes as its feed stores them: each write records what it changed in its own
//! transaction (`storage::feed::Outbox`), as JSON of the subscription or licence assignment as
//! it is after the change (a removed one as it last was). [`decode`] reads them back, once
//! per change for every stream.

use serde::{Deserialize, Serialize};
use storage::feed::NewChange;

use crate::domain::model::{Assignment, ChangeKind, ChangeRecord, Changed, State, Subscription};
use crate::domain::offers;

/// A subscription as a change shows it.
#[derive(Debug, Serialize, Deserialize)]
struct Stored {
    id: String,
    offer_id: String,
    display_name: String,
    directory_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    owner_user_id: Option<String>,
    seats: i32,
    /// `State::code`.
    state: i64,
    created_by_user_id: String,
    create_time: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    cancel_time: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    end_time: Option<i64>,
}

/// A licence assignment as a change shows it.
#[derive(Debug, Serialize, Deserialize)]
struct StoredAssignment {
    user_id: String,
    offer_id: String,
    directory_id: String,
    assign_time: i64,
}

fn encoded(value: &impl Serialize) -> Result<String, sqlx::Error> {
    serde_json::to_string(value).map_err(|e| sqlx::Error::Encode(Box::new(e)))
}

pub fn assignment(kind: ChangeKind, a: &Assignment, time: i64) -> Result<NewChange, sqlx::Error> {
    let stored = StoredAssignment {
        user_id: a.user_id.clone(),
        offer_id: a.offer.id.to_owned(),
        directory_id: a.directory_id.clone(),
        assign_time: a.assign_time,
    };
    Ok(NewChange {
        time,
        kind: kind as i64,
        directory_id: a.directory_id.clone(),
        resource: encoded(&stored)?,
    })
}

pub fn subscription(
    kind: ChangeKind,
    s: &Subscription,
    time: i64,
) -> Result<NewChange, sqlx::Error> {
    let stored = Stored {
        id: s.id.clone(),
        offer_id: s.offer.id.to_owned(),
        display_name: s.display_name.clone(),
        directory_id: s.directory_id.clone(),
        owner_user_id: s.owner_user_id.clone(),
        seats: s.seats,
        state: s.state.code(),
        created_by_user_id: s.created_by_user_id.clone(),
        create_time: s.create_time,
        cancel_time: s.cancel_time,
        end_time: s.end_time,
    };
    Ok(NewChange {
        time,
        kind: kind as i64,
        directory_id: s.directory_id.clone(),
        resource: encoded(&stored)?,
    })
}

/// A stored change read back; `Err` names what did not decode.
pub fn decode(kind: i64, resource: &str) -> Result<ChangeRecord, String> {
    let kind = ChangeKind::from_value(kind).ok_or_else(|| format!("unknown change kind {kind}"))?;
    let unreadable = |e: serde_json::Error| format!("change resource: {e}");
    let offer = |id: &str| offers::find(id).ok_or_else(|| format!("offer {id}"));
    let resource = match kind {
        ChangeKind::LicenseAssigned | ChangeKind::LicenseRemoved => {
            let a: StoredAssignment = serde_json::from_str(resource).map_err(unreadable)?;
            Changed::Assignment(Assignment {
                offer: offer(&a.offer_id)?,
                user_id: a.user_id,
                directory_id: a.directory_id,
                assign_time: a.assign_time,
            })
        }
        ChangeKind::SubscriptionCreated
        | ChangeKind::SubscriptionUpdated
        | ChangeKind::SubscriptionCancelled => {
            let s: Stored = serde_json::from_str(resource).map_err(unreadable)?;
            Changed::Subscription(Subscription {
                offer: offer(&s.offer_id)?,
                state: State::from_code(s.state).ok_or_else(|| format!("state {}", s.state))?,
                id: s.id,
                display_name: s.display_name,
                directory_id: s.directory_id,
                owner_user_id: s.owner_user_id,
                seats: s.seats,
                created_by_user_id: s.created_by_user_id,
                create_time: s.create_time,
                cancel_time: s.cancel_time,
                end_time: s.end_time,
            })
        }
    };
    Ok(ChangeRecord { kind, resource })
}
