//! The rules of the directory: who may do what, and what each operation means. No tonic or
//! prost type appears here; the transport converts requests into the validated types of
//! [`types`] and maps [`Error`] to statuses.

pub mod error;
pub mod model;
pub mod passwords;
pub mod ports;
pub mod tokens;
pub mod types;
pub mod watch;

use std::net::IpAddr;
use std::sync::Arc;

use contract::fields::Violation;
use contract::paging::PageTokens;
use contract::refusal::Refusal;
use platform::clock::Clock;
use platform::limits::Limiter;

pub use error::{Denied, Error, Resource, Result};
use model::{Decision, DeletedUserPage, Directory, SignedIn, User, UserPage};
use passwords::Passwords;
use tokens::{TokenSubject, Tokens};
use types::{
    Action, ListUsersQuery, NewDirectory, NewUser, Page, Password, Role, RoleSet, Upn, UserLookup,
};

use ports::{Actor, DirectoryStore, StoreError, Target};

/// The page-token list name of ListUsers.
const LIST_USERS: &str = "directory.v1.DirectoryService/ListUsers";
/// The page-token list name of ListDeletedUsers.
const LIST_DELETED_USERS: &str = "directory.v1.DirectoryService/ListDeletedUsers";

/// Roles that may create and delete users.
const USER_MANAGERS: &[Role] = &[Role::GlobalAdministrator, Role::UserAdministrator];

/// The directory's operations. Every method but sign-up and sign-in takes the authenticated
/// caller, as loaded from the store for this call.
/// Abuse limits (0 disables one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbuseLimits {
    /// Failed sign-ins per UPN per minute (brute force on one account).
    pub signin_failures_per_upn_per_minute: u32,
    /// Sign-in attempts per peer address per minute (password spraying from one host).
    pub signin_per_peer_per_minute: u32,
    /// Sign-ups per peer address per minute.
    pub signup_per_peer_per_minute: u32,
}

impl Default for AbuseLimits {
    fn default() -> Self {
        Self {
            signin_failures_per_upn_per_minute: 10,
            signin_per_peer_per_minute: 600,
            signup_per_peer_per_minute: 30,
        }
    }
}

/// The buckets behind [`AbuseLimits`].
#[derive(Debug)]
struct Throttles {
    failed_signins: Limiter,
    signin_peers: Limiter,
    signup_peers: Limiter,
}

pub struct Service {
    store: Arc<dyn DirectoryStore>,
    passwords: Passwords,
    tokens: Tokens,
    pages: PageTokens,
    throttles: Throttles,
    clock: Arc<dyn Clock>,
    /// How long a deleted user stays restorable, in microseconds.
    retention_micros: i64,
    /// Who may follow the change feed besides Global Administrators, and for how long a
    /// cursor stays good.
    watching: watch::Watching,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service").finish_non_exhaustive()
    }
}

fn internal(err: StoreError) -> Error {
    match err {
        StoreError::Unavailable(e) => Error::Unavailable(e),
        StoreError::Internal(e) => Error::Internal(e),
        other => Error::Internal(anyhow::anyhow!("unexpected store outcome: {other}")),
    }
}

/// How often a write is decided again because the caller's roles changed under it.
const MAX_ACTOR_RETRIES: usize = 3;

fn actor_unstable() -> Error {
    Error::Unavailable(anyhow::anyhow!(
        "the caller's roles kept changing during the call"
    ))
}

fn new_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

impl Service {
    pub fn new(
        store: Arc<dyn DirectoryStore>,
        passwords: Passwords,
        tokens: Tokens,
        pages: PageTokens,
        limits: AbuseLimits,
        clock: Arc<dyn Clock>,
        deleted_user_retention: std::time::Duration,
    ) -> Self {
        Self {
            watching: watch::Watching::default(),
            store,
            passwords,
            tokens,
            pages,
            clock,
            retention_micros: i64::try_from(deleted_user_retention.as_micros()).unwrap_or(i64::MAX),
            throttles: Throttles {
                failed_signins: Limiter::per_minute(limits.signin_failures_per_upn_per_minute),
                signin_peers: Limiter::per_minute(limits.signin_per_peer_per_minute),
                signup_peers: Limiter::per_minute(limits.signup_per_peer_per_minute),
            },
        }
    }

    /// Sign-up: a directory `<prefix>.onmicrosoft.com` and its first Global Administrator.
    pub async fn create_directory(
        &self,
        new: NewDirectory,
        peer: Option<IpAddr>,
    ) -> Result<(Directory, User)> {
        if let Some(peer) = peer {
            self.throttles
                .signup_peers
                .take(&peer.to_string())
                .map_err(Error::Throttled)?;
        }
        let now = self.clock.now_micros();
        let directory = Directory {
            id: new_id(),
            display_name: new.display_name,
            domain_prefix: new.domain_prefix.as_str().to_owned(),
            initial_domain: new.domain_prefix.initial_domain(),
            create_time: now,
        };
        let admin = User {
            id: new_id(),
            directory_id: directory.id.clone(),
            upn: new
                .admin_user_name
                .at(&directory.initial_domain)
                .as_str()
                .to_owned(),
            display_name: new.admin_display_name,
            roles: RoleSet::of([Role::GlobalAdministrator]),
            create_time: now,
            token_generation: 0,
        };
        let hash = self.passwords.hash(new.admin_password).await?;
        match self.store.create_directory(&directory, &admin, &hash).await {
            Ok(()) => Ok((directory, admin)),
            Err(StoreError::DomainTaken) => Err(Error::DomainTaken(directory.domain_prefix)),
            Err(StoreError::UpnTaken) => Err(Error::UpnTaken(admin.upn)),
            Err(other) => Err(internal(other)),
        }
    }

    /// A token for the user whose UPN and password these are. Unknown users and wrong
    /// passwords fail the same way, in about the same time. A UPN with too many recent
    /// failures, or a peer with too many attempts, is throttled before any password is checked
    /// (so throttling says nothing about whether the UPN exists).
    pub async fn sign_in(
        &self,
        upn: Upn,
        password: Password,
        peer: Option<IpAddr>,
    ) -> Result<SignedIn> {
        let key = upn.key();
        if let Some(peer) = peer {
            self.throttles
                .signin_peers
                .take(&peer.to_string())
                .map_err(Error::Throttled)?;
        }
        // A failure's token is taken before the password is checked and given back if it
        // matches (or the check never happened): concurrent guesses each need a token, so a
        // burst of them cannot all get past a bucket that has one left.
        let failure = self
            .throttles
            .failed_signins
            .reserve(&key)
            .map_err(Error::Throttled)?;
        let found = self.store.credentials(&key).await.map_err(internal)?;
        let (user, hash) = match found {
            Some((user, hash)) => (Some(user), Some(hash)),
            None => (None, None),
        };
        let matches = self.passwords.verify(password, hash).await?;
        let user = match user {
            Some(user) if matches => user,
            _ => {
                failure.keep();
                return Err(Error::BadCredentials);
            }
        };
        let subject = TokenSubject {
            user_id: user.id.clone(),
            directory_id: user.directory_id.clone(),
            generation: user.token_generation,
        };
        let (access_token, exp) = self
            .tokens
            .issue(&subject, self.clock.now_micros())
            .map_err(Error::Internal)?;
        Ok(SignedIn {
            access_token,
            expire_time: exp.saturating_mul(1_000_000),
            user,
        })
    }

    /// The user a bearer token names, as stored now. A deleted user's token fails here, and so
    /// does one issued before a deletion the user was restored from (an older generation).
    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<User> {
        self.authenticate_until(bearer).await.map(|(user, _)| user)
    }

    /// [`Service::authenticate`], with the token's expiry (microseconds since the epoch).
    async fn authenticate_until(&self, bearer: Option<&str>) -> Result<(User, i64)> {
        let token = bearer.ok_or(Refusal::MissingToken)?;
        let (subject, expiry) = self
            .tokens
            .verify_with_expiry(token, self.clock.now_micros())
            .ok_or(Refusal::InvalidToken)?;
        match self.store.user(&subject.user_id).await.map_err(internal)? {
            Some(user)
                if user.directory_id == subject.directory_id
                    && user.token_generation == subject.generation =>
            {
                Ok((user, expiry))
            }
            _ => Err(Refusal::InvalidToken.into()),
        }
    }

    async fn own_directory(&self, caller: &User) -> Result<Directory> {
        self.store
            .directory(&caller.directory_id)
            .await
            .map_err(internal)?
            .ok_or_else(|| Error::Internal(anyhow::anyhow!("the caller's directory is missing")))
    }

    pub async fn who_am_i(&self, caller: User) -> Result<(User, Directory)> {
        let directory = self.own_directory(&caller).await?;
        Ok((caller, directory))
    }

    /// The caller's own directory; any other id answers as a missing one.
    pub async fn get_directory(&self, caller: &User, id: uuid::Uuid) -> Result<Directory> {
        if id.to_string() != caller.directory_id {
            return Err(Error::NotFound(Resource::Directory));
        }
        self.own_directory(caller).await
    }

    /// Creates a user (Global or User Administrator; granting roles needs Global Administrator).
    pub async fn create_user(&self, caller: &User, new: NewUser) -> Result<User> {
        let may_create = |roles: RoleSet| {
            if !roles.any_of(USER_MANAGERS) {
                return Err(Error::PermissionDenied(Denied::NeedsUserManager));
            }
            if !new.roles.is_empty() && !roles.contains(Role::GlobalAdministrator) {
                return Err(Error::PermissionDenied(
                    Denied::NeedsGlobalAdministratorToGrant,
                ));
            }
            Ok(())
        };
        may_create(caller.roles)?;
        let directory = self.own_directory(caller).await?;
        check_domain(&new.upn, &directory, "user_principal_name")?;
        let user = User {
            id: new_id(),
            directory_id: directory.id,
            upn: new.upn.as_str().to_owned(),
            display_name: new.display_name.clone(),
            roles: new.roles,
            create_time: self.clock.now_micros(),
            token_generation: 0,
        };
        let hash = self.passwords.hash(new.password.clone()).await?;
        let mut actor = Actor::of(caller);
        for _ in 0..MAX_ACTOR_RETRIES {
            match self.store.insert_user(&user, &hash, &actor).await {
                Ok(()) => return Ok(user),
                Err(StoreError::UpnTaken) => return Err(Error::UpnTaken(user.upn)),
                Err(StoreError::ActorChanged(now)) => actor.roles = self.recheck(now)?,
                Err(other) => return Err(internal(other)),
            }
            may_create(actor.roles)?;
        }
        Err(actor_unstable())
    }

    /// The caller's roles changed between authentication and the write: decide again from the
    /// roles stored now, or fail as a deleted caller's token would.
    fn recheck(&self, now: Option<RoleSet>) -> Result<RoleSet> {
        now.ok_or(Refusal::InvalidToken.into())
    }

    /// A user of the caller's directory; users of other directories answer as missing ones.
    pub async fn get_user(&self, caller: &User, lookup: UserLookup) -> Result<User> {
        let found = match lookup {
            UserLookup::Id(id) => self.store.user(&id.to_string()).await,
            UserLookup::Upn(upn) => self.store.user_by_upn(&upn.key()).await,
        }
        .map_err(internal)?;
        found
            .filter(|user| user.directory_id == caller.directory_id)
            .ok_or(Error::NotFound(Resource::User))
    }

    /// A page of the caller's directory's users, ordered by UPN.
    pub async fn list_users(&self, caller: &User, query: ListUsersQuery) -> Result<UserPage> {
        let (mask, filter) = match query.role {
            Some(role) => (
                RoleSet::mask_of(role),
                format!("role={}", RoleSet::mask_of(role)),
            ),
            None => (0, String::new()),
        };
        let after = if query.page_token.is_empty() {
            String::new()
        } else {
            self.pages
                .open(&query.page_token, LIST_USERS, &caller.directory_id, &filter)
                .map_err(Refusal::InvalidPageToken)?
        };
        let mut users = self
            .store
            .list_users(&caller.directory_id, mask, &after, query.page_size + 1)
            .await
            .map_err(internal)?;
        let more = users.len() > query.page_size as usize;
        users.truncate(query.page_size as usize);
        let next_page_token = match users.last() {
            Some(last) if more => {
                self.pages
                    .issue(LIST_USERS, &caller.directory_id, &filter, &last.upn_key())
            }
            _ => String::new(),
        };
        Ok(UserPage {
            users,
            next_page_token,
        })
    }

    /// Replaces a user's roles (Global Administrator only).
    pub async fn set_user_roles(
        &self,
        caller: &User,
        id: uuid::Uuid,
        roles: RoleSet,
    ) -> Result<User> {
        let id = id.to_string();
        let may_set = |actor_roles: RoleSet| {
            if !actor_roles.contains(Role::GlobalAdministrator) {
                return Err(Error::PermissionDenied(Denied::NeedsGlobalAdministrator));
            }
            if id == caller.id && !roles.contains(Role::GlobalAdministrator) {
                return Err(Error::SelfDemotion);
            }
            Ok(())
        };
        let mut actor = Actor::of(caller);
        for _ in 0..MAX_ACTOR_RETRIES {
            may_set(actor.roles)?;
            match self
                .store
                .set_roles(
                    &caller.directory_id,
                    &id,
                    roles,
                    &actor,
                    self.clock.now_micros(),
                )
                .await
            {
                Ok(user) => return Ok(user),
                Err(StoreError::ActorChanged(now)) => actor.roles = self.recheck(now)?,
                Err(StoreError::UserNotFound) => return Err(Error::NotFound(Resource::User)),
                Err(StoreError::LastGlobalAdministrator) => {
                    return Err(Error::LastGlobalAdministrator);
                }
                Err(other) => return Err(internal(other)),
            }
        }
        Err(actor_unstable())
    }

    /// Moves a user to the directory's deleted users (Global or User Administrator; a User
    /// Administrator only users without roles). Their tokens stop working at once, since
    /// every call reloads the user, and never work again (a restore moves the generation on).
    pub async fn delete_user(&self, caller: &User, id: uuid::Uuid) -> Result<()> {
        let id = id.to_string();
        let now = self.clock.now_micros();
        let purge_time = now.saturating_add(self.retention_micros);
        self.as_user_manager(
            caller,
            &id,
            Write::Delete {
                delete_time: now,
                purge_time,
            },
        )
        .await
        .map(|_| ())
    }

    /// A page of the caller's directory's deleted users, ordered by UPN then id (Global or User
    /// Administrator). Users past their `purge_time` are gone, whether or not the purge has
    /// run yet.
    pub async fn list_deleted_users(&self, caller: &User, page: Page) -> Result<DeletedUserPage> {
        if !caller.roles.any_of(USER_MANAGERS) {
            return Err(Error::PermissionDenied(Denied::NeedsUserManager));
        }
        let after = if page.page_token.is_empty() {
            None
        } else {
            let key = self
                .pages
                .open(
                    &page.page_token,
                    LIST_DELETED_USERS,
                    &caller.directory_id,
                    "",
                )
                .map_err(Refusal::InvalidPageToken)?;
            // Written by this service below: `<upn key> <id>` (a UPN has no space).
            let (upn_key, id) = key.rsplit_once(' ').ok_or_else(|| {
                Error::Internal(anyhow::anyhow!("a page token of ours holds no id"))
            })?;
            Some((upn_key.to_owned(), id.to_owned()))
        };
        let mut users = self
            .store
            .list_deleted_users(
                &caller.directory_id,
                self.clock.now_micros(),
                after.as_ref().map(|(k, i)| (k.as_str(), i.as_str())),
                page.page_size + 1,
            )
            .await
            .map_err(internal)?;
        let more = users.len() > page.page_size as usize;
        users.truncate(page.page_size as usize);
        let next_page_token = match users.last() {
            Some(last) if more => self.pages.issue(
                LIST_DELETED_USERS,
                &caller.directory_id,
                "",
                &format!("{} {}", last.user.upn_key(), last.user.id),
            ),
            _ => String::new(),
        };
        Ok(DeletedUserPage {
            users,
            next_page_token,
        })
    }

    /// Brings a deleted user back with the same id, password and roles (Global or User
    /// Administrator; a User Administrator only users without roles), under `new_upn` if
    /// given (CreateUser's rules), else its old UPN. Tokens issued before the deletion stay
    /// dead: the user signs in again.
    pub async fn restore_user(
        &self,
        caller: &User,
        id: uuid::Uuid,
        new_upn: Option<Upn>,
    ) -> Result<User> {
        // Decided before the UPN is checked against the directory, as CreateUser does.
        if !caller.roles.any_of(USER_MANAGERS) {
            return Err(Error::PermissionDenied(Denied::NeedsUserManager));
        }
        if let Some(upn) = &new_upn {
            let directory = self.own_directory(caller).await?;
            check_domain(upn, &directory, "new_user_principal_name")?;
        }
        let id = id.to_string();
        let now = self.clock.now_micros();
        let upn = new_upn.as_ref().map(Upn::as_str);
        let restored = self
            .as_user_manager(caller, &id, Write::Restore { new_upn: upn, now })
            .await;
        match restored {
            Ok(Some(user)) => Ok(user),
            Ok(None) => Err(Error::Internal(anyhow::anyhow!(
                "a restore answered without the user"
            ))),
            Err(Error::UpnTaken(_)) => Err(Error::UpnTaken(upn.unwrap_or_default().to_owned())),
            Err(other) => Err(other),
        }
    }

    /// Deletes a deleted user for good (Global or User Administrator; a User Administrator
    /// only users without roles).
    pub async fn purge_user(&self, caller: &User, id: uuid::Uuid) -> Result<()> {
        let id = id.to_string();
        let now = self.clock.now_micros();
        self.as_user_manager(caller, &id, Write::Purge { now })
            .await
            .map(|_| ())
    }

    /// Purges the deleted users whose `purge_time` has come, in batches; how many went. The
    /// background task of [`Service::purge_in_background`] calls it.
    pub async fn purge_expired(&self) -> Result<u64> {
        const BATCH: u32 = 500;
        let mut purged = 0;
        loop {
            let now = self.clock.now_micros();
            let batch = self
                .store
                .purge_expired(now, BATCH)
                .await
                .map_err(internal)?;
            purged += batch;
            if batch < u64::from(BATCH) {
                return Ok(purged);
            }
        }
    }

    /// Runs [`Service::purge_expired`] every `every` (of real time; which users are due is
    /// decided on the service's clock) until the task is aborted.
    pub fn purge_in_background(
        self: &Arc<Self>,
        every: std::time::Duration,
    ) -> tokio::task::JoinHandle<()> {
        let service = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(service) = service.upgrade() else {
                    return;
                };
                match service.purge_expired().await {
                    Ok(0) => {}
                    Ok(purged) => tracing::info!(purged, "purged deleted users past retention"),
                    Err(e) => tracing::warn!(error = %e, "purging deleted users failed; retrying"),
                }
            }
        })
    }

    /// Runs `write` on the user `id` of the caller's directory as a user manager (Global or
    /// User Administrator; a User Administrator only on users without roles), deciding again
    /// when the caller's roles change under it, and maps the store's refusals. A restore
    /// answers with the user.
    async fn as_user_manager(
        &self,
        caller: &User,
        id: &str,
        write: Write<'_>,
    ) -> Result<Option<User>> {
        let mut actor = Actor::of(caller);
        for _ in 0..MAX_ACTOR_RETRIES {
            if !actor.roles.any_of(USER_MANAGERS) {
                return Err(Error::PermissionDenied(Denied::NeedsUserManager));
            }
            let target = Target {
                directory_id: &caller.directory_id,
                user_id: id,
                only_without_roles: !actor.roles.contains(Role::GlobalAdministrator),
            };
            let written = match write {
                Write::Delete {
                    delete_time,
                    purge_time,
                } => self
                    .store
                    .delete_user(target, &actor, delete_time, purge_time)
                    .await
                    .map(|()| None),
                Write::Restore { new_upn, now } => self
                    .store
                    .restore_user(target, new_upn, &actor, now)
                    .await
                    .map(Some),
                Write::Purge { now } => self
                    .store
                    .purge_user(target, &actor, now)
                    .await
                    .map(|()| None),
            };
            match written {
                Ok(value) => return Ok(value),
                Err(StoreError::ActorChanged(now)) => actor.roles = self.recheck(now)?,
                Err(StoreError::UserNotFound) => return Err(Error::NotFound(Resource::User)),
                Err(StoreError::HasRoles) => {
                    return Err(Error::PermissionDenied(Denied::TargetHoldsRoles));
                }
                Err(StoreError::LastGlobalAdministrator) => {
                    return Err(Error::LastGlobalAdministrator);
                }
                // The caller fills in the UPN it asked for.
                Err(StoreError::UpnTaken) => return Err(Error::UpnTaken(String::new())),
                Err(StoreError::OldUpnTaken(upn)) => return Err(Error::OldUpnTaken(upn)),
                Err(other) => return Err(internal(other)),
            }
        }
        Err(actor_unstable())
    }

    /// Whether the caller may do `action`, from their roles as stored now; with a `subject`,
    /// also whether that user is an active user of the caller's directory (read like
    /// GetUser: the same cache, the same answer for a deleted, foreign or unknown id).
    pub async fn authorize(
        &self,
        caller: User,
        action: Action,
        subject: Option<uuid::Uuid>,
    ) -> Result<Decision> {
        let subject_active = match subject {
            Some(id) => self
                .store
                .user(&id.to_string())
                .await
                .map_err(internal)?
                .is_some_and(|user| user.directory_id == caller.directory_id),
            None => false,
        };
        let needed: &[Role] = match action {
            Action::PurchaseSubscription | Action::ManageSubscriptions => {
                &[Role::GlobalAdministrator, Role::BillingAdministrator]
            }
            Action::ManageUsers => USER_MANAGERS,
            Action::ManageLicenses => &[
                Role::GlobalAdministrator,
                Role::UserAdministrator,
                Role::LicenseAdministrator,
            ],
            Action::ReadLicenses => &[
                Role::GlobalAdministrator,
                Role::UserAdministrator,
                Role::LicenseAdministrator,
                Role::BillingAdministrator,
            ],
            Action::ReadSubscriptions => &[],
        };
        let granted_by = needed.iter().find(|&&r| caller.roles.contains(r));
        let (allowed, reason) = match (needed.is_empty(), granted_by) {
            (true, _) => (true, "every user of the directory may".to_owned()),
            (false, Some(role)) => (true, format!("granted by the {} role", role_name(*role))),
            (false, None) => (
                false,
                format!(
                    "requires one of the roles: {}",
                    needed
                        .iter()
                        .map(|r| role_name(*r))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ),
        };
        Ok(Decision {
            allowed,
            user: caller,
            reason,
            subject_active,
        })
    }
}

/// The writes a user manager makes on one user (see `Service::as_user_manager`).
#[derive(Debug, Clone, Copy)]
enum Write<'a> {
    Delete { delete_time: i64, purge_time: i64 },
    Restore { new_upn: Option<&'a str>, now: i64 },
    Purge { now: i64 },
}

/// A UPN of a user of `directory` must be in its initial domain.
fn check_domain(upn: &Upn, directory: &Directory, field: &str) -> Result<()> {
    if upn.domain() == directory.initial_domain {
        return Ok(());
    }
    Err(Refusal::InvalidArgument(vec![Violation::new(
        field,
        format!(
            "the domain must be the directory's domain {}",
            directory.initial_domain
        ),
    )])
    .into())
}

/// A role's name as people read it.
pub fn role_name(role: Role) -> &'static str {
    match role {
        Role::GlobalAdministrator => "Global Administrator",
        Role::BillingAdministrator => "Billing Administrator",
        Role::UserAdministrator => "User Administrator",
        Role::PasswordAdministrator => "Password Administrator",
        Role::ServiceAdministrator => "Service Administrator",
        Role::LicenseAdministrator => "License Administrator",
    }
}
