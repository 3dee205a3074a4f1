//! The gRPC edge of billing-svc. Each handler reads as a sentence: take the call's context
//! (token, deadline, request id), convert (validating every field), call the domain, map the
//! error. Only this module and [`crate::directory`] know tonic and prost types.

mod convert;
mod status;
mod watch;

use std::sync::Arc;

use contract::billing::v1 as pb;
use platform::rpc::{
    REQUEST_ID_KEY, TRACEPARENT_KEY, bearer_token, caller_deadline, record_directory, reply,
};
use tonic::{Request, Response, Status};

use contract::cursor::Cursors;
use storage::feed::Feed;

use crate::directory::CallContext;
use crate::domain::{Caller, Check, Service};
use crate::store::ChangeValue;
pub use status::{ERROR_DOMAIN, to_status};

/// `billing.v1.BillingService` over the domain [`Service`].
#[derive(Debug, Clone)]
pub struct BillingApi {
    service: Arc<Service>,
    feed: Feed<ChangeValue>,
    cursors: Cursors,
    /// How long changes are kept, and how often a stream's watcher is authorised again.
    change_retention: std::time::Duration,
    watch_recheck: std::time::Duration,
}

impl BillingApi {
    pub fn new(
        service: Arc<Service>,
        feed: Feed<ChangeValue>,
        cursors: Cursors,
        change_retention: std::time::Duration,
        watch_recheck: std::time::Duration,
    ) -> Self {
        Self {
            service,
            feed,
            cursors,
            change_retention,
            watch_recheck,
        }
    }
}

impl BillingApi {
    /// Authenticates the call through the directory (forwarding the bearer token, the
    /// caller's deadline and the request id) and learns whether `check` passed.
    async fn caller<T>(&self, request: &Request<T>, check: Check) -> Result<Caller, Status> {
        self.caller_about(request, check, None).await
    }

    /// As [`BillingApi::caller`], also asking whether `subject` is an active user of the
    /// caller's directory (in the same call to the directory).
    async fn caller_about<T>(
        &self,
        request: &Request<T>,
        check: Check,
        subject: Option<uuid::Uuid>,
    ) -> Result<Caller, Status> {
        // The request id and this hop's `traceparent` as the RPC layer left them in the
        // headers (platform::rpc), passed on as they are: a cheap clone, no parse.
        let per_call = |name: &str| {
            let mut value = request.metadata().get(name)?.clone();
            // New on every call: never indexed (see `platform::rpc::per_call_value`).
            value.set_sensitive(true);
            Some(value)
        };
        let call = CallContext {
            deadline: caller_deadline(request),
            request_id: per_call(REQUEST_ID_KEY),
            traceparent: per_call(TRACEPARENT_KEY),
        };
        let caller = call
            .scope(
                self.service
                    .caller_about(bearer_token(request), check, subject),
            )
            .await
            .map_err(to_status)?;
        record_directory(&caller.directory_id);
        Ok(caller)
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl pb::billing_service_server::BillingService for BillingApi {
    async fn list_offers(
        &self,
        _request: Request<pb::ListOffersRequest>,
    ) -> Reply<pb::ListOffersResponse> {
        let offers = self
            .service
            .list_offers()
            .iter()
            .map(convert::offer)
            .collect();
        Ok(reply(pb::ListOffersResponse { offers }))
    }

    async fn create_subscription(
        &self,
        request: Request<pb::CreateSubscriptionRequest>,
    ) -> Reply<pb::Subscription> {
        let caller = self.caller(&request, Check::Purchase).await?;
        let new = convert::new_subscription(request.into_inner()).map_err(to_status)?;
        let created = self
            .service
            .create_subscription(&caller, new)
            .await
            .map_err(to_status)?;
        Ok(reply(convert::subscription(created)))
    }

    async fn get_subscription(
        &self,
        request: Request<pb::GetSubscriptionRequest>,
    ) -> Reply<pb::Subscription> {
        let caller = self.caller(&request, Check::Manage).await?;
        let id =
            convert::subscription_id(&request.into_inner().subscription_id).map_err(to_status)?;
        let found = self
            .service
            .get_subscription(&caller, id)
            .await
            .map_err(to_status)?;
        Ok(reply(convert::subscription(found)))
    }

    async fn list_subscriptions(
        &self,
        request: Request<pb::ListSubscriptionsRequest>,
    ) -> Reply<pb::ListSubscriptionsResponse> {
        let caller = self.caller(&request, Check::Manage).await?;
        let query = convert::list_query(request.into_inner()).map_err(to_status)?;
        let page = self
            .service
            .list_subscriptions(&caller, query)
            .await
            .map_err(to_status)?;
        Ok(reply(pb::ListSubscriptionsResponse {
            subscriptions: page
                .subscriptions
                .into_iter()
                .map(convert::subscription)
                .collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn cancel_subscription(
        &self,
        request: Request<pb::CancelSubscriptionRequest>,
    ) -> Reply<pb::Subscription> {
        let caller = self.caller(&request, Check::Manage).await?;
        let id =
            convert::subscription_id(&request.into_inner().subscription_id).map_err(to_status)?;
        let cancelled = self
            .service
            .cancel_subscription(&caller, id)
            .await
            .map_err(to_status)?;
        Ok(reply(convert::subscription(cancelled)))
    }

    async fn assign_license(
        &self,
        request: Request<pb::AssignLicenseRequest>,
    ) -> Reply<pb::LicenseAssignment> {
        let req = request.get_ref();
        let key = convert::license_key(&req.user_id, &req.offer_id);
        // A bad token answers before a bad field; the directory is asked about the user in
        // the same call when the id is one.
        let subject = key.as_ref().ok().map(|(user, _)| *user);
        let caller = self
            .caller_about(&request, Check::ManageLicenses, subject)
            .await?;
        let (user, offer) = key.map_err(to_status)?;
        let assigned = self
            .service
            .assign_license(&caller, user, offer)
            .await
            .map_err(to_status)?;
        Ok(reply(convert::assignment(assigned)))
    }

    async fn remove_license(&self, request: Request<pb::RemoveLicenseRequest>) -> Reply<()> {
        let caller = self.caller(&request, Check::ManageLicenses).await?;
        let req = request.into_inner();
        let (user, offer) = convert::license_key(&req.user_id, &req.offer_id).map_err(to_status)?;
        self.service
            .remove_license(&caller, user, offer)
            .await
            .map_err(to_status)?;
        Ok(reply(()))
    }

    async fn list_licenses(
        &self,
        request: Request<pb::ListLicensesRequest>,
    ) -> Reply<pb::ListLicensesResponse> {
        let caller = self.caller(&request, Check::Read).await?;
        let licenses = self
            .service
            .list_licenses(&caller)
            .await
            .map_err(to_status)?;
        Ok(reply(pb::ListLicensesResponse {
            licenses: licenses.into_iter().map(convert::license).collect(),
        }))
    }

    async fn list_license_assignments(
        &self,
        request: Request<pb::ListLicenseAssignmentsRequest>,
    ) -> Reply<pb::ListLicenseAssignmentsResponse> {
        let caller = self.caller(&request, Check::ReadLicenses).await?;
        let query = convert::assignment_query(request.into_inner()).map_err(to_status)?;
        let page = self
            .service
            .list_assignments(&caller, query)
            .await
            .map_err(to_status)?;
        Ok(reply(pb::ListLicenseAssignmentsResponse {
            assignments: page
                .assignments
                .into_iter()
                .map(convert::assignment)
                .collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn change_seats(
        &self,
        request: Request<pb::ChangeSeatsRequest>,
    ) -> Reply<pb::Subscription> {
        let caller = self.caller(&request, Check::Manage).await?;
        let (id, seats) = convert::change_seats(request.get_ref()).map_err(to_status)?;
        let changed = self
            .service
            .change_seats(&caller, id, seats)
            .await
            .map_err(to_status)?;
        Ok(reply(convert::subscription(changed)))
    }

    async fn upgrade_subscription(
        &self,
        request: Request<pb::UpgradeSubscriptionRequest>,
    ) -> Reply<pb::Subscription> {
        let caller = self.caller(&request, Check::Manage).await?;
        let (id, offer) = convert::upgrade(request.get_ref()).map_err(to_status)?;
        let upgraded = self
            .service
            .upgrade_subscription(&caller, id, offer)
            .await
            .map_err(to_status)?;
        Ok(reply(convert::subscription(upgraded)))
    }

    async fn transfer_subscription(
        &self,
        request: Request<pb::TransferSubscriptionRequest>,
    ) -> Reply<pb::Subscription> {
        let fields = convert::transfer(request.get_ref());
        // A bad token answers before a bad field; the directory is asked about the new owner
        // in the same call when the id is one.
        let subject = fields.as_ref().ok().map(|(_, owner)| *owner);
        let caller = self.caller_about(&request, Check::Manage, subject).await?;
        let (id, owner) = fields.map_err(to_status)?;
        let moved = self
            .service
            .transfer_subscription(&caller, id, owner)
            .await
            .map_err(to_status)?;
        Ok(reply(convert::subscription(moved)))
    }

    type WatchChangesStream = watch::ChangeStream;

    async fn watch_changes(
        &self,
        request: Request<pb::WatchChangesRequest>,
    ) -> Reply<Self::WatchChangesStream> {
        let caller = self.caller(&request, Check::Manage).await?;
        let (start, bookmark_first, cursor_time) =
            watch::begin(&self.cursors, request.get_ref()).map_err(to_status)?;
        let token = bearer_token(&request).unwrap_or_default();
        let watcher = self
            .service
            .watcher(caller, token, self.watch_recheck)
            .map_err(to_status)?;
        if let Some(time) = cursor_time {
            self.service
                .check_cursor_time(time, self.change_retention)
                .map_err(to_status)?;
        }
        let directory = Some(watcher.directory_id.clone());
        let rule = watch::Rule {
            service: self.service.clone(),
            watcher,
        };
        let stream = self
            .feed
            .watch(start, directory, bookmark_first, rule)
            .await
            .map_err(|e| to_status(watch::not_opened(e)))?;
        Ok(Response::new(watch::changes(
            stream,
            self.cursors.clone(),
            self.service.clone(),
        )))
    }
}
