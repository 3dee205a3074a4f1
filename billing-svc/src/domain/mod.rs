//! The rules of billing: the catalogue, who may buy, see and cancel what, where a purchase
//! lands, who owns it, and idempotent purchases. No tonic or prost type appears here: the
//! directory is reached through the [`Authorizer`] trait, the database through
//! [`BillingStore`].

pub mod error;
pub mod follow;
pub mod licences;
pub mod model;
pub mod offers;
pub mod ports;
pub mod watch;

use std::sync::Arc;

use async_trait::async_trait;
use contract::fields::Violation;
use contract::paging::PageTokens;
use contract::refusal::Refusal;
use platform::clock::Clock;

pub use error::{Error, Result};
use model::{State, Subscription, SubscriptionPage};
use offers::{Offer, OwnerType};

use ports::{BillingStore, StoreError};

const LIST_SUBSCRIPTIONS: &str = "billing.v1.BillingService/ListSubscriptions";

/// What billing asks the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// May the caller buy? (Global or Billing Administrator.)
    Purchase,
    /// May the caller manage every subscription of the directory? (Global or Billing
    /// Administrator.) A caller refused this is still a valid user: an owner at most.
    Manage,
    /// Is the caller a user of a directory? (Anyone signed in.)
    Read,
    /// May the caller assign and remove licences? (Global, User or License Administrator.)
    ManageLicenses,
    /// May the caller read every licence assignment of the directory? (Global, User, License
    /// or Billing Administrator.) A caller refused this reads their own.
    ReadLicenses,
}

/// The directory's answer: who the caller is, and whether the check passed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub user_id: String,
    pub directory_id: String,
    pub allowed: bool,
    pub reason: String,
    /// Whether the user asked about (if any) is an active user of the caller's directory.
    pub subject_active: bool,
}

/// The directory service, as billing needs it.
#[async_trait]
pub trait Authorizer: Send + Sync + 'static {
    /// Fails with [`Refusal::InvalidToken`] when the directory refuses the token, with
    /// [`Error::DeadlineExceeded`] when the caller's deadline runs out first, and with
    /// [`Error::DirectoryUnavailable`] when the directory fails within the time allowed.
    /// The call's deadline, request id and trace travel beside it (the client reads them from
    /// the call it serves), not through the domain. With a `subject` (a user id), the answer
    /// also tells whether that user is an active user of the caller's directory, in the same
    /// call.
    async fn authorize(&self, token: &str, check: Check, subject: Option<&str>) -> Result<Caller>;
}

/// A validated CreateSubscription request.
#[derive(Debug, Clone)]
pub struct NewSubscription {
    pub offer: &'static Offer,
    pub display_name: String,
    pub seats: i32,
    pub request_id: Option<uuid::Uuid>,
}

impl NewSubscription {
    /// What a retry with the same request_id must ask for again.
    fn fingerprint(&self) -> String {
        format!("{}|{}|{}", self.offer.id, self.seats, self.display_name)
    }
}

/// Checks the seat count against the offer: per-seat offers 1..=MAX_SEATS, others 0.
pub fn check_seats(offer: &Offer, seats: i32) -> Result<(), Violation> {
    if offer.per_seat && !(1..=offers::MAX_SEATS).contains(&seats) {
        return Err(Violation::new(
            "seats",
            format!(
                "{} is sold per seat: seats must be 1 to {}",
                offer.id,
                offers::MAX_SEATS
            ),
        ));
    }
    if !offer.per_seat && seats != 0 {
        return Err(Violation::new(
            "seats",
            format!("{} is not sold per seat: seats must be 0", offer.id),
        ));
    }
    Ok(())
}

/// A validated ListSubscriptions request.
#[derive(Debug, Clone)]
pub struct ListQuery {
    pub page_size: u32,
    pub page_token: String,
}

pub struct Service {
    store: Arc<dyn BillingStore>,
    directory: Arc<dyn Authorizer>,
    pages: PageTokens,
    clock: Arc<dyn Clock>,
    /// How long a free trial lasts.
    free_trial_period: std::time::Duration,
}

/// How long a free trial lasts unless configured otherwise (Azure's 30 days).
pub const DEFAULT_FREE_TRIAL_PERIOD: std::time::Duration =
    std::time::Duration::from_secs(30 * 24 * 3600);

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

fn store_error(err: StoreError) -> Error {
    match err {
        StoreError::Unavailable(e) => Error::Unavailable(e),
        StoreError::Internal(e) => Error::Internal(e),
        StoreError::Conflict => Error::Internal(anyhow::anyhow!("unexpected unique conflict")),
        StoreError::LicensesInUse => Error::LicensesInUse,
    }
}

impl Service {
    pub fn new(
        store: Arc<dyn BillingStore>,
        directory: Arc<dyn Authorizer>,
        pages: PageTokens,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            store,
            directory,
            pages,
            clock,
            free_trial_period: DEFAULT_FREE_TRIAL_PERIOD,
        }
    }

    /// Free trials last `period`.
    pub fn with_free_trial_period(self, period: std::time::Duration) -> Self {
        Self {
            free_trial_period: period,
            ..self
        }
    }

    fn now(&self) -> i64 {
        self.clock.now_micros()
    }

    /// Records the end of every free trial whose `end_time` has come (one
    /// `SUBSCRIPTION_UPDATED` each, once whatever the number of replicas): what a background
    /// task calls every second. Reads do not wait for it (`Subscription::as_of`).
    pub async fn record_trial_ends(&self) -> Result<usize> {
        self.store
            .expire_trials(self.now())
            .await
            .map_err(store_error)
    }

    pub fn list_offers(&self) -> &'static [Offer] {
        &offers::CATALOGUE
    }

    /// Who is calling, as the directory says, and whether `check` passed. The first step of
    /// every authenticated call: a bad token fails here, before the request is even validated.
    pub async fn caller(&self, token: Option<&str>, check: Check) -> Result<Caller> {
        self.caller_about(token, check, None).await
    }

    /// As [`Service::caller`], also asking whether `subject` is an active user of the
    /// caller's directory.
    pub async fn caller_about(
        &self,
        token: Option<&str>,
        check: Check,
        subject: Option<uuid::Uuid>,
    ) -> Result<Caller> {
        let token = token.ok_or(Refusal::MissingToken)?;
        let subject = subject.map(|id| id.to_string());
        self.directory
            .authorize(token, check, subject.as_deref())
            .await
    }

    /// The subscription with this id in the caller's directory; any other answers as missing.
    async fn visible(&self, caller: &Caller, id: uuid::Uuid) -> Result<Subscription> {
        self.store
            .get(&id.to_string())
            .await
            .map_err(store_error)?
            .filter(|s| s.directory_id == caller.directory_id)
            .map(|s| s.as_of(self.now()))
            .ok_or(Error::NotFound)
    }

    /// Buys an offer: authorised by the directory, placed in the caller's directory, owned by
    /// the caller (Azure) or the directory (Office 365). With a request_id, a retry of the
    /// same request returns the first subscription, even if the caller has since lost the
    /// purchasing role: that purchase was authorised when it was made. Anything else such a
    /// caller sends is refused as not allowed, a reused request_id included (so a refused
    /// caller learns nothing about their earlier requests). `caller` comes from
    /// [`Check::Purchase`].
    pub async fn create_subscription(
        &self,
        caller: &Caller,
        new: NewSubscription,
    ) -> Result<Subscription> {
        let fingerprint = new.fingerprint();
        let request_id = new.request_id.map(|id| id.to_string());
        if !caller.allowed {
            // A retry of a purchase made while the caller could still buy answers with it.
            return match self
                .replay(caller, request_id.as_deref(), &fingerprint)
                .await
            {
                Ok(Some(first)) => Ok(first),
                Ok(None) | Err(Error::RequestIdReused) => {
                    Err(Error::PermissionDenied(caller.reason.clone()))
                }
                Err(other) => Err(other),
            };
        }
        // Insert first: the unique index on (creator, request_id) finds a retry (or a
        // concurrent twin) in the same statement, so a new purchase costs one write and no read.
        // A time-ordered (version 7) id: new rows go to the end of the primary-key index
        // instead of a random page of it, so a commit writes far fewer pages (WAL on both
        // engines, full-page images on PostgreSQL). 74 of its bits are still random
        // (docs/decisions/time-ordered-ids.md).
        let create_time = self.clock.now_micros();
        let subscription = Subscription {
            id: uuid::Uuid::now_v7().to_string(),
            offer: new.offer,
            display_name: new.display_name,
            directory_id: caller.directory_id.clone(),
            owner_user_id: match new.offer.owner {
                OwnerType::User => Some(caller.user_id.clone()),
                OwnerType::Directory => None,
            },
            seats: new.seats,
            state: State::Active,
            created_by_user_id: caller.user_id.clone(),
            create_time,
            cancel_time: None,
            end_time: new.offer.free_trial.then(|| {
                create_time.saturating_add(
                    i64::try_from(self.free_trial_period.as_micros()).unwrap_or(i64::MAX),
                )
            }),
        };
        let request = request_id.as_deref().map(|r| (r, fingerprint.as_str()));
        match self.store.insert(&subscription, request).await {
            Ok(()) => Ok(subscription.as_of(self.now())),
            Err(StoreError::Conflict) => {
                // An earlier or concurrent call with this request_id holds the index: answer
                // with its row (or refuse a reused request_id).
                if let Some(first) = self
                    .replay(caller, request_id.as_deref(), &fingerprint)
                    .await?
                {
                    return Ok(first);
                }
                if new.offer.free_trial {
                    Err(Error::FreeTrialUsed)
                } else {
                    Err(Error::Internal(anyhow::anyhow!(
                        "unexpected unique conflict"
                    )))
                }
            }
            Err(other) => Err(store_error(other)),
        }
    }

    /// The subscription an earlier call with this request_id created, if any.
    async fn replay(
        &self,
        caller: &Caller,
        request_id: Option<&str>,
        fingerprint: &str,
    ) -> Result<Option<Subscription>> {
        let Some(request_id) = request_id else {
            return Ok(None);
        };
        match self
            .store
            .by_request(&caller.user_id, request_id)
            .await
            .map_err(store_error)?
        {
            Some((first, stored)) if stored == fingerprint => Ok(Some(first.as_of(self.now()))),
            Some(_) => Err(Error::RequestIdReused),
            None => Ok(None),
        }
    }

    /// Admins of the directory see any of its subscriptions; other users those they own.
    pub async fn get_subscription(&self, caller: &Caller, id: uuid::Uuid) -> Result<Subscription> {
        let subscription = self.visible(caller, id).await?;
        if caller.allowed || subscription.owned_by(&caller.user_id) {
            Ok(subscription)
        } else {
            Err(Error::PermissionDenied(
                "only its owner or a Global or Billing Administrator may read this subscription"
                    .into(),
            ))
        }
    }

    /// A page of what the caller may see, oldest first.
    pub async fn list_subscriptions(
        &self,
        caller: &Caller,
        query: ListQuery,
    ) -> Result<SubscriptionPage> {
        let owner = (!caller.allowed).then_some(caller.user_id.as_str());
        let scope = format!("{}/{}", caller.directory_id, owner.unwrap_or("*"));
        let after = if query.page_token.is_empty() {
            None
        } else {
            let key = self
                .pages
                .open(&query.page_token, LIST_SUBSCRIPTIONS, &scope, "")
                .map_err(Refusal::InvalidPageToken)?;
            let (time, id) = key
                .split_once('|')
                .and_then(|(t, id)| Some((t.parse::<i64>().ok()?, id.to_owned())))
                .ok_or(Refusal::InvalidPageToken(
                    contract::paging::PageTokenError::Invalid,
                ))?;
            Some((time, id))
        };
        let mut subscriptions = self
            .store
            .list(&caller.directory_id, owner, after, query.page_size + 1)
            .await
            .map_err(store_error)?;
        let more = subscriptions.len() > query.page_size as usize;
        subscriptions.truncate(query.page_size as usize);
        let next_page_token = match subscriptions.last() {
            Some(last) if more => {
                self.pages
                    .issue(LIST_SUBSCRIPTIONS, &scope, "", &last.list_key())
            }
            _ => String::new(),
        };
        let now = self.now();
        Ok(SubscriptionPage {
            subscriptions: subscriptions.into_iter().map(|s| s.as_of(now)).collect(),
            next_page_token,
        })
    }

    /// Upgrades a free trial to pay-as-you-go, keeping its id, owner and directory (admins, or
    /// its owner). One on the target offer already is returned as it is.
    pub async fn upgrade_subscription(
        &self,
        caller: &Caller,
        id: uuid::Uuid,
        target: &'static Offer,
    ) -> Result<Subscription> {
        let subscription = self.visible(caller, id).await?;
        if !(caller.allowed || subscription.owned_by(&caller.user_id)) {
            return Err(Error::PermissionDenied(
                "only its owner or a Global or Billing Administrator may upgrade this subscription"
                    .into(),
            ));
        }
        let trial = offers::CATALOGUE
            .iter()
            .find(|o| o.free_trial)
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("no free-trial offer")))?;
        if target.id != offers::PAY_AS_YOU_GO {
            return Err(Error::UpgradeNotAllowed);
        }
        match self
            .store
            .upgrade(&subscription.id, trial.id, target.id, self.now())
            .await
            .map_err(store_error)?
        {
            None => Err(Error::NotFound),
            Some(model::Upgraded::Now(s) | model::Upgraded::Already(s)) => {
                if s.offer.id == target.id {
                    Ok(s.as_of(self.now()))
                } else {
                    Err(Error::UpgradeNotAllowed)
                }
            }
            Some(model::Upgraded::NotConvertible) => Err(Error::UpgradeNotAllowed),
        }
    }

    /// Gives an Azure pay-as-you-go subscription a new owner (admins, or its current owner;
    /// `caller` from [`Check::Manage`], asked whether the new owner is an active user of the
    /// directory). To the current owner it is returned as it is.
    pub async fn transfer_subscription(
        &self,
        caller: &Caller,
        id: uuid::Uuid,
        new_owner: uuid::Uuid,
    ) -> Result<Subscription> {
        let subscription = self.visible(caller, id).await?;
        if !(caller.allowed || subscription.owned_by(&caller.user_id)) {
            return Err(Error::PermissionDenied(
                "only its owner or a Global or Billing Administrator may transfer this subscription"
                    .into(),
            ));
        }
        if subscription.offer.owner == OwnerType::Directory {
            return Err(Error::DirectoryOwned);
        }
        if subscription.offer.id != offers::PAY_AS_YOU_GO || subscription.state != State::Active {
            return Err(Error::TransferNotAllowed);
        }
        if !caller.subject_active {
            return Err(Error::UserNotFound);
        }
        match self
            .store
            .transfer(
                &subscription.id,
                offers::PAY_AS_YOU_GO,
                &new_owner.to_string(),
                self.now(),
            )
            .await
            .map_err(store_error)?
        {
            None => Err(Error::NotFound),
            Some(model::Transferred::Now(s) | model::Transferred::Already(s)) => {
                Ok(s.as_of(self.now()))
            }
            Some(model::Transferred::NotTransferable(_)) => Err(Error::TransferNotAllowed),
        }
    }

    /// Cancels a subscription (admins, or the owner of an Azure subscription). Cancelling a
    /// cancelled subscription returns it unchanged.
    pub async fn cancel_subscription(
        &self,
        caller: &Caller,
        id: uuid::Uuid,
    ) -> Result<Subscription> {
        let subscription = self.visible(caller, id).await?;
        let owner_may = subscription.is_azure() && subscription.owned_by(&caller.user_id);
        if !(caller.allowed || owner_may) {
            return Err(Error::PermissionDenied(
                "only the owner of an Azure subscription or a Global or Billing Administrator may cancel it".into(),
            ));
        }
        // Even when it is cancelled already: the store returns it unchanged, and first makes
        // sure every replica's cache has seen the cancellation (it may have been committed by
        // a call that has not answered yet).
        self.store
            .cancel(&subscription.id, self.clock.now_micros())
            .await
            .map_err(store_error)?
            .map(|s| s.as_of(self.now()))
            .ok_or(Error::NotFound)
    }
}
