//! Requests into validated domain values (every bad field becomes a violation naming it), and
//! domain values into messages.

use contract::billing::v1 as pb;
use contract::fields::{self, Violation, Violations};
use contract::refusal::Refusal;
use contract::time::timestamp;

use crate::domain::licences::{AssignmentQuery, licensable};
use crate::domain::model::{Assignment, License, State, Subscription};
use crate::domain::offers::{self, Offer, OwnerType, ProductFamily};
use crate::domain::{Error, ListQuery, NewSubscription, check_seats};

fn done<T>(violations: Violations, value: impl FnOnce() -> Option<T>) -> Result<T, Error> {
    match violations.is_empty().then(value).flatten() {
        Some(value) => Ok(value),
        None => Err(Refusal::InvalidArgument(violations.into_vec()).into()),
    }
}

pub fn new_subscription(req: pb::CreateSubscriptionRequest) -> Result<NewSubscription, Error> {
    let pb::CreateSubscriptionRequest {
        offer_id,
        display_name,
        seats,
        request_id,
    } = req;
    let mut v = Violations::new();
    let offer = if offer_id.is_empty() {
        v.push(Violation::new("offer_id", "is required"));
        None
    } else {
        v.check(offers::find(&offer_id).ok_or_else(|| {
            Violation::new(
                "offer_id",
                "is not an offer of the catalogue (see ListOffers)",
            )
        }))
    };
    let display_name = v.check(fields::display_name("display_name", &display_name));
    if let Some(offer) = offer {
        v.check(check_seats(offer, seats));
    } else if seats < 0 {
        v.push(Violation::new("seats", "must not be negative"));
    }
    let request_id = if request_id.is_empty() {
        Some(None)
    } else {
        v.check(fields::id("request_id", &request_id)).map(Some)
    };
    done(v, || {
        Some(NewSubscription {
            offer: offer?,
            display_name: display_name?,
            seats,
            request_id: request_id?,
        })
    })
}

pub fn subscription_id(raw: &str) -> Result<uuid::Uuid, Error> {
    let mut v = Violations::new();
    let id = v.check(fields::id("subscription_id", raw));
    done(v, || id)
}

pub fn list_query(req: pb::ListSubscriptionsRequest) -> Result<ListQuery, Error> {
    let pb::ListSubscriptionsRequest {
        page_size,
        page_token,
    } = req;
    let mut v = Violations::new();
    let page_size = v.check(fields::page_size("page_size", page_size));
    done(v, || {
        Some(ListQuery {
            page_size: page_size?,
            page_token,
        })
    })
}

fn family(family: ProductFamily) -> pb::ProductFamily {
    match family {
        ProductFamily::Azure => pb::ProductFamily::Azure,
        ProductFamily::Office365 => pb::ProductFamily::Office365,
    }
}

fn owner_type(owner: OwnerType) -> pb::OwnerType {
    match owner {
        OwnerType::User => pb::OwnerType::User,
        OwnerType::Directory => pb::OwnerType::Directory,
    }
}

pub fn offer(offer: &Offer) -> pb::Offer {
    pb::Offer {
        id: offer.id.to_owned(),
        display_name: offer.display_name.to_owned(),
        product_family: family(offer.family) as i32,
        owner_type: owner_type(offer.owner) as i32,
        per_seat: offer.per_seat,
    }
}

pub fn subscription(s: Subscription) -> pb::Subscription {
    pb::Subscription {
        id: s.id,
        offer_id: s.offer.id.to_owned(),
        product_family: family(s.offer.family) as i32,
        display_name: s.display_name,
        directory_id: s.directory_id,
        owner_type: owner_type(s.offer.owner) as i32,
        owner_user_id: s.owner_user_id.unwrap_or_default(),
        seats: s.seats,
        state: match s.state {
            State::Active => pb::SubscriptionState::Active,
            State::Cancelled => pb::SubscriptionState::Cancelled,
            State::Expired => pb::SubscriptionState::Expired,
        } as i32,
        created_by_user_id: s.created_by_user_id,
        create_time: Some(timestamp(s.create_time)),
        cancel_time: s.cancel_time.map(timestamp),
        end_time: s.end_time.map(timestamp),
    }
}

/// An offer licences can be assigned of (a per-seat Office 365 offer).
fn licensable_offer(v: &mut Violations, raw: &str) -> Option<&'static Offer> {
    if raw.is_empty() {
        v.push(Violation::new("offer_id", "is required"));
        return None;
    }
    match offers::find(raw) {
        Some(offer) if licensable(offer) => Some(offer),
        Some(_) => {
            v.push(Violation::new(
                "offer_id",
                "licences exist only of per-seat Office 365 offers",
            ));
            None
        }
        None => {
            v.push(Violation::new(
                "offer_id",
                "is not an offer of the catalogue (see ListOffers)",
            ));
            None
        }
    }
}

/// The user and offer of AssignLicense and RemoveLicense.
pub fn license_key(user_id: &str, offer_id: &str) -> Result<(uuid::Uuid, &'static Offer), Error> {
    let mut v = Violations::new();
    let user = v.check(fields::id("user_id", user_id));
    let offer = licensable_offer(&mut v, offer_id);
    done(v, || Some((user?, offer?)))
}

pub fn assignment_query(req: pb::ListLicenseAssignmentsRequest) -> Result<AssignmentQuery, Error> {
    let pb::ListLicenseAssignmentsRequest {
        page_size,
        page_token,
        user_id,
        offer_id,
    } = req;
    let mut v = Violations::new();
    let page_size = v.check(fields::page_size("page_size", page_size));
    let user_id = if user_id.is_empty() {
        Some(None)
    } else {
        v.check(fields::id("user_id", &user_id)).map(Some)
    };
    let offer = if offer_id.is_empty() {
        Some(None)
    } else {
        licensable_offer(&mut v, &offer_id).map(Some)
    };
    done(v, || {
        Some(AssignmentQuery {
            page_size: page_size?,
            page_token,
            user_id: user_id?,
            offer: offer?,
        })
    })
}

pub fn change_seats(req: &pb::ChangeSeatsRequest) -> Result<(uuid::Uuid, i32), Error> {
    let mut v = Violations::new();
    let id = v.check(fields::id("subscription_id", &req.subscription_id));
    if !(1..=offers::MAX_SEATS).contains(&req.seats) {
        v.push(Violation::new(
            "seats",
            format!("must be 1 to {}", offers::MAX_SEATS),
        ));
    }
    done(v, || Some((id?, req.seats)))
}

pub fn assignment(a: Assignment) -> pb::LicenseAssignment {
    pb::LicenseAssignment {
        user_id: a.user_id,
        offer_id: a.offer.id.to_owned(),
        directory_id: a.directory_id,
        assign_time: Some(timestamp(a.assign_time)),
    }
}

/// A pool's counts, at most `i32::MAX` on the wire.
pub fn license(l: License) -> pb::License {
    let units = |n: i64| i32::try_from(n).unwrap_or(i32::MAX);
    pb::License {
        offer_id: l.offer.id.to_owned(),
        enabled_units: units(l.enabled),
        consumed_units: units(l.consumed),
    }
}

pub fn upgrade(
    req: &pb::UpgradeSubscriptionRequest,
) -> Result<(uuid::Uuid, &'static Offer), Error> {
    let mut v = Violations::new();
    let id = v.check(fields::id("subscription_id", &req.subscription_id));
    let offer = if req.offer_id.is_empty() {
        v.push(Violation::new("offer_id", "is required"));
        None
    } else {
        v.check(offers::find(&req.offer_id).ok_or_else(|| {
            Violation::new(
                "offer_id",
                "is not an offer of the catalogue (see ListOffers)",
            )
        }))
    };
    done(v, || Some((id?, offer?)))
}

pub fn transfer(req: &pb::TransferSubscriptionRequest) -> Result<(uuid::Uuid, uuid::Uuid), Error> {
    let mut v = Violations::new();
    let id = v.check(fields::id("subscription_id", &req.subscription_id));
    let owner = v.check(fields::id("new_owner_user_id", &req.new_owner_user_id));
    done(v, || Some((id?, owner?)))
}
