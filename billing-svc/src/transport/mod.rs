//! The gRPC edge of billing-svc. Each handler reads as a sentence: take the call's context
//! (token, deadline, request id), convert (validating every field), call the domain, map the
//! error. Only this module and [`crate::directory`] know tonic and prost types.

mod convert;
mod status;

use std::sync::Arc;

use contract::billing::v1 as pb;
use contract::rpc::{RequestId, bearer_token, caller_deadline};
use tonic::{Request, Response, Status};

use crate::domain::{CallContext, Error, Service};
pub use status::{ERROR_DOMAIN, to_status};

/// `billing.v1.BillingService` over the domain [`Service`].
#[derive(Debug, Clone)]
pub struct BillingApi {
    service: Arc<Service>,
}

impl BillingApi {
    pub fn new(service: Arc<Service>) -> Self {
        Self { service }
    }
}

/// The call's context; a call without a bearer token stops here, before any validation.
fn context<T>(request: &Request<T>) -> Result<CallContext, Status> {
    let token = bearer_token(request).ok_or_else(|| to_status(Error::MissingToken))?;
    Ok(CallContext {
        token: Some(token.to_owned()),
        deadline: caller_deadline(request.metadata()),
        request_id: request
            .extensions()
            .get::<RequestId>()
            .map(|id| id.0.clone()),
    })
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
        Ok(Response::new(pb::ListOffersResponse { offers }))
    }

    async fn create_subscription(
        &self,
        request: Request<pb::CreateSubscriptionRequest>,
    ) -> Reply<pb::Subscription> {
        let call = context(&request)?;
        let new = convert::new_subscription(request.into_inner()).map_err(to_status)?;
        let created = self
            .service
            .create_subscription(&call, new)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::subscription(created)))
    }

    async fn get_subscription(
        &self,
        request: Request<pb::GetSubscriptionRequest>,
    ) -> Reply<pb::Subscription> {
        let call = context(&request)?;
        let id =
            convert::subscription_id(&request.into_inner().subscription_id).map_err(to_status)?;
        let found = self
            .service
            .get_subscription(&call, id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::subscription(found)))
    }

    async fn list_subscriptions(
        &self,
        request: Request<pb::ListSubscriptionsRequest>,
    ) -> Reply<pb::ListSubscriptionsResponse> {
        let call = context(&request)?;
        let query = convert::list_query(request.into_inner()).map_err(to_status)?;
        let page = self
            .service
            .list_subscriptions(&call, query)
            .await
            .map_err(to_status)?;
        Ok(Response::new(pb::ListSubscriptionsResponse {
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
        let call = context(&request)?;
        let id =
            convert::subscription_id(&request.into_inner().subscription_id).map_err(to_status)?;
        let cancelled = self
            .service
            .cancel_subscription(&call, id)
            .await
            .map_err(to_status)?;
        Ok(Response::new(convert::subscription(cancelled)))
    }
}
