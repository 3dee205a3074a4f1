//! Licences: the seats of an Office 365 offer in one directory form one pool, and assigning
//! a licence to a user takes a seat of it. Who may do what is the directory's answer; that
//! the user is an active user of the caller's directory, too (asked in the same call). That
//! a pool never hands out more licences than it has seats is the store's, in the database
//! (see `store::sql`), under any concurrency.

use contract::refusal::Refusal;

use super::model::{Assigned, Assignment, AssignmentPage, License, SeatsChanged, Subscription};
use super::offers::{Offer, ProductFamily};
use super::{Caller, Error, Result, Service, store_error};

const LIST_ASSIGNMENTS: &str = "billing.v1.BillingService/ListLicenseAssignments";

/// A validated ListLicenseAssignments request.
#[derive(Debug, Clone)]
pub struct AssignmentQuery {
    pub page_size: u32,
    pub page_token: String,
    pub user_id: Option<uuid::Uuid>,
    pub offer: Option<&'static Offer>,
}

/// Whether licences of `offer` can be assigned: it is sold per seat to a directory.
pub fn licensable(offer: &Offer) -> bool {
    offer.per_seat && offer.family == ProductFamily::Office365
}

impl Service {
    /// Gives the user a seat of the pool (`caller` from [`super::Check::ManageLicenses`],
    /// asked about the user). A licence the user holds already is returned as it is.
    pub async fn assign_license(
        &self,
        caller: &Caller,
        user_id: uuid::Uuid,
        offer: &'static Offer,
    ) -> Result<Assignment> {
        if !caller.allowed {
            return Err(Error::PermissionDenied(caller.reason.clone()));
        }
        if !caller.subject_active {
            return Err(Error::UserNotFound);
        }
        let assignment = Assignment {
            user_id: user_id.to_string(),
            offer,
            directory_id: caller.directory_id.clone(),
            assign_time: self.clock.now_micros(),
        };
        match self.store.assign(&assignment).await.map_err(store_error)? {
            Assigned::New(assignment) | Assigned::Held(assignment) => Ok(assignment),
            Assigned::NoSeat => Err(Error::NoAvailableLicenses),
            // Deleted after the directory answered: the feed told billing first.
            Assigned::UserDeleted => Err(Error::UserNotFound),
        }
    }

    /// Frees the user's seat (`caller` from [`super::Check::ManageLicenses`]).
    pub async fn remove_license(
        &self,
        caller: &Caller,
        user_id: uuid::Uuid,
        offer: &'static Offer,
    ) -> Result<()> {
        if !caller.allowed {
            return Err(Error::PermissionDenied(caller.reason.clone()));
        }
        self.store
            .unassign(
                &caller.directory_id,
                &user_id.to_string(),
                offer.id,
                self.clock.now_micros(),
            )
            .await
            .map_err(store_error)?
            .map(|_| ())
            .ok_or(Error::LicenseNotFound)
    }

    /// The caller's directory's pools (any user of it).
    pub async fn list_licenses(&self, caller: &Caller) -> Result<Vec<License>> {
        self.store
            .licenses(&caller.directory_id)
            .await
            .map_err(store_error)
    }

    /// A page of assignments: the directory's for an administrator (`caller` from
    /// [`super::Check::ReadLicenses`]), the caller's own otherwise (a filter on another user
    /// then finds nothing).
    pub async fn list_assignments(
        &self,
        caller: &Caller,
        query: AssignmentQuery,
    ) -> Result<AssignmentPage> {
        let wanted = query.user_id.map(|id| id.to_string());
        let user = if caller.allowed {
            wanted
        } else {
            match wanted {
                Some(other) if other != caller.user_id => {
                    return Ok(AssignmentPage {
                        assignments: Vec::new(),
                        next_page_token: String::new(),
                    });
                }
                _ => Some(caller.user_id.clone()),
            }
        };
        let scope = format!(
            "{}/{}/{}",
            caller.directory_id,
            user.as_deref().unwrap_or("*"),
            query.offer.map_or("*", |o| o.id)
        );
        let after = if query.page_token.is_empty() {
            None
        } else {
            let key = self
                .pages
                .open(&query.page_token, LIST_ASSIGNMENTS, &scope, "")
                .map_err(Refusal::InvalidPageToken)?;
            let (user, offer) = key.split_once('|').ok_or(Refusal::InvalidPageToken(
                contract::paging::PageTokenError::Invalid,
            ))?;
            Some((user.to_owned(), offer.to_owned()))
        };
        let mut assignments = self
            .store
            .assignments(
                &caller.directory_id,
                user.as_deref(),
                query.offer.map(|o| o.id),
                after,
                query.page_size + 1,
            )
            .await
            .map_err(store_error)?;
        let more = assignments.len() > query.page_size as usize;
        assignments.truncate(query.page_size as usize);
        let next_page_token = match assignments.last() {
            Some(last) if more => {
                let (user, offer) = last.list_key();
                self.pages
                    .issue(LIST_ASSIGNMENTS, &scope, "", &format!("{user}|{offer}"))
            }
            _ => String::new(),
        };
        Ok(AssignmentPage {
            assignments,
            next_page_token,
        })
    }

    /// Sets the seats (1..=[`super::offers::MAX_SEATS`], checked by the caller) of an active
    /// Office 365 subscription (`caller` from [`super::Check::Manage`]). The same count again
    /// returns it unchanged.
    pub async fn change_seats(
        &self,
        caller: &Caller,
        id: uuid::Uuid,
        seats: i32,
    ) -> Result<Subscription> {
        if !caller.allowed {
            return Err(Error::PermissionDenied(
                "only a Global or Billing Administrator may change seats".into(),
            ));
        }
        let subscription = self.visible(caller, id).await?;
        if !licensable(subscription.offer) {
            return Err(Error::NotPerSeat);
        }
        match self
            .store
            .change_seats(&subscription.id, seats, self.clock.now_micros())
            .await
            .map_err(store_error)?
        {
            None => Err(Error::NotFound),
            Some(SeatsChanged::Changed(s) | SeatsChanged::Unchanged(s)) => Ok(s),
            Some(SeatsChanged::NotActive) => Err(Error::SubscriptionNotActive),
            Some(SeatsChanged::NotPerSeat) => Err(Error::NotPerSeat),
            Some(SeatsChanged::InUse) => Err(Error::LicensesInUse),
        }
    }
}
