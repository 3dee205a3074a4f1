//! The gRPC edge of directory-svc. Each handler reads as a sentence: authenticate, convert
//! (validating every field), call the domain, map the error. Only this module knows tonic
//! and prost types.

mod convert;
mod status;
mod watch;

use std::sync::Arc;

use contract::directory::v1 as pb;
use platform::rpc::{bearer_token, record_directory, reply};
use tonic::{Request, Response, Status};

use contract::cursor::Cursors;
use storage::feed::Feed;

use crate::domain::Service;
use crate::domain::model::User;
use crate::store::ChangeValue;
pub use status::{ERROR_DOMAIN, to_status};

/// `directory.v1.DirectoryService` over the domain [`Service`].
#[derive(Debug, Clone)]
pub struct DirectoryApi {
    service: Arc<Service>,
    feed: Feed<ChangeValue>,
    cursors: Cursors,
}

impl DirectoryApi {
    pub fn new(service: Arc<Service>, feed: Feed<ChangeValue>, cursors: Cursors) -> Self {
        Self {
            service,
            feed,
            cursors,
        }
    }

    async fn caller<T>(&self, request: &Request<T>) -> Result<User, Status> {
        let user = self
            .service
            .authenticate(bearer_token(request))
            .await
            .map_err(to_status)?;
        record_directory(&user.directory_id);
        Ok(user)
    }
}

type Reply<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl pb::directory_service_server::DirectoryService for DirectoryApi {
    async fn create_directory(
        &self,
        request: Request<pb::CreateDirectoryRequest>,
    ) -> Reply<pb::CreateDirectoryResponse> {
        let peer = request.remote_addr().map(|a| a.ip());
        let new = convert::new_directory(request.into_inner()).map_err(to_status)?;
        let (directory, admin) = self
            .service
            .create_directory(new, peer)
            .await
            .map_err(to_status)?;
        Ok(reply(pb::CreateDirectoryResponse {
            directory: Some(convert::directory(directory)),
            admin: Some(convert::user(admin)),
        }))
    }

    async fn sign_in(&self, request: Request<pb::SignInRequest>) -> Reply<pb::SignInResponse> {
        let peer = request.remote_addr().map(|a| a.ip());
        let (upn, password) = convert::sign_in(request.into_inner()).map_err(to_status)?;
        let signed_in = self
            .service
            .sign_in(upn, password, peer)
            .await
            .map_err(to_status)?;
        Ok(reply(pb::SignInResponse {
            access_token: signed_in.access_token,
            expire_time: Some(contract::time::timestamp(signed_in.expire_time)),
            user: Some(convert::user(signed_in.user)),
        }))
    }

    async fn who_am_i(&self, request: Request<pb::WhoAmIRequest>) -> Reply<pb::WhoAmIResponse> {
        let caller = self.caller(&request).await?;
        let (user, directory) = self.service.who_am_i(caller).await.map_err(to_status)?;
        Ok(reply(pb::WhoAmIResponse {
            user: Some(convert::user(user)),
            directory: Some(convert::directory(directory)),
        }))
    }

    async fn get_directory(
        &self,
        request: Request<pb::GetDirectoryRequest>,
    ) -> Reply<pb::Directory> {
        let caller = self.caller(&request).await?;
        let id = convert::get_directory(request.into_inner()).map_err(to_status)?;
        let directory = self
            .service
            .get_directory(&caller, id)
            .await
            .map_err(to_status)?;
        Ok(reply(convert::directory(directory)))
    }

    async fn create_user(&self, request: Request<pb::CreateUserRequest>) -> Reply<pb::User> {
        let caller = self.caller(&request).await?;
        let new = convert::new_user(request.into_inner()).map_err(to_status)?;
        let user = self
            .service
            .create_user(&caller, new)
            .await
            .map_err(to_status)?;
        Ok(reply(convert::user(user)))
    }

    async fn get_user(&self, request: Request<pb::GetUserRequest>) -> Reply<pb::User> {
        let caller = self.caller(&request).await?;
        let lookup = convert::get_user(request.into_inner()).map_err(to_status)?;
        let user = self
            .service
            .get_user(&caller, lookup)
            .await
            .map_err(to_status)?;
        Ok(reply(convert::user(user)))
    }

    async fn list_users(
        &self,
        request: Request<pb::ListUsersRequest>,
    ) -> Reply<pb::ListUsersResponse> {
        let caller = self.caller(&request).await?;
        let query = convert::list_users(request.into_inner()).map_err(to_status)?;
        let page = self
            .service
            .list_users(&caller, query)
            .await
            .map_err(to_status)?;
        Ok(reply(pb::ListUsersResponse {
            users: page.users.into_iter().map(convert::user).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn set_user_roles(&self, request: Request<pb::SetUserRolesRequest>) -> Reply<pb::User> {
        let caller = self.caller(&request).await?;
        let (id, roles) = convert::set_user_roles(request.into_inner()).map_err(to_status)?;
        let user = self
            .service
            .set_user_roles(&caller, id, roles)
            .await
            .map_err(to_status)?;
        Ok(reply(convert::user(user)))
    }

    async fn delete_user(&self, request: Request<pb::DeleteUserRequest>) -> Reply<()> {
        let caller = self.caller(&request).await?;
        let id = convert::delete_user(request.into_inner()).map_err(to_status)?;
        self.service
            .delete_user(&caller, id)
            .await
            .map_err(to_status)?;
        Ok(reply(()))
    }

    async fn list_deleted_users(
        &self,
        request: Request<pb::ListDeletedUsersRequest>,
    ) -> Reply<pb::ListDeletedUsersResponse> {
        let caller = self.caller(&request).await?;
        let page = convert::list_deleted_users(request.into_inner()).map_err(to_status)?;
        let page = self
            .service
            .list_deleted_users(&caller, page)
            .await
            .map_err(to_status)?;
        Ok(reply(pb::ListDeletedUsersResponse {
            users: page.users.into_iter().map(convert::deleted_user).collect(),
            next_page_token: page.next_page_token,
        }))
    }

    async fn restore_user(&self, request: Request<pb::RestoreUserRequest>) -> Reply<pb::User> {
        let caller = self.caller(&request).await?;
        let (id, upn) = convert::restore_user(request.into_inner()).map_err(to_status)?;
        let user = self
            .service
            .restore_user(&caller, id, upn)
            .await
            .map_err(to_status)?;
        Ok(reply(convert::user(user)))
    }

    async fn purge_user(&self, request: Request<pb::PurgeUserRequest>) -> Reply<()> {
        let caller = self.caller(&request).await?;
        let id = convert::purge_user(request.into_inner()).map_err(to_status)?;
        self.service
            .purge_user(&caller, id)
            .await
            .map_err(to_status)?;
        Ok(reply(()))
    }

    async fn authorize(
        &self,
        request: Request<pb::AuthorizeRequest>,
    ) -> Reply<pb::AuthorizeResponse> {
        let caller = self.caller(&request).await?;
        let (action, subject) = convert::authorize(request.into_inner()).map_err(to_status)?;
        let decision = self
            .service
            .authorize(caller, action, subject)
            .await
            .map_err(to_status)?;
        Ok(reply(convert::decision(decision)))
    }

    type WatchChangesStream = watch::ChangeStream;

    async fn watch_changes(
        &self,
        request: Request<pb::WatchChangesRequest>,
    ) -> Reply<Self::WatchChangesStream> {
        // Read before the watcher is authenticated: every change up to here is reflected in
        // what it is authenticated as, and each later one is checked (`watch::Rule`).
        let opened_at = self
            .feed
            .head()
            .await
            .map_err(|e| to_status(watch::database(e)))?;
        let watcher = self
            .service
            .watcher(bearer_token(&request))
            .await
            .map_err(to_status)?;
        if let Some(directory) = watcher.directory() {
            record_directory(directory);
        }
        let (start, bookmark_first, cursor_time) =
            watch::begin(&self.cursors, request.get_ref()).map_err(to_status)?;
        self.service.may_watch(&watcher).map_err(to_status)?;
        if let Some(time) = cursor_time {
            self.service.check_cursor_time(time).map_err(to_status)?;
        }
        let directory = watcher.directory().map(str::to_owned);
        let rule = watch::Rule {
            service: self.service.clone(),
            watcher,
            opened_at,
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
