//! Tenant isolation as a property: three directories with users holding random roles run a
//! random sequence of directory and billing calls, made with ids, UPNs, subscriptions and page
//! tokens taken from all three directories. Whatever the sequence:
//!
//! - no answer (success or error, message or details) contains an id, UPN or subscription of
//!   another directory that the caller did not send itself;
//! - every id of another directory answers exactly like a random id that exists nowhere
//!   (same code, same message, same ErrorInfo and details);
//! - at the end each directory holds exactly what its own users did to it.
//!
//! The sequence is a deterministic function of a seed: `ISOLATION_SEED=<n>` replays one (a
//! failure names its seed and step).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::time::{Duration, Instant};

use integration_tests::contract::billing::v1 as bpb;
use integration_tests::contract::directory::v1 as dpb;
use integration_tests::*;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

type DirectoryClient = dpb::directory_service_client::DirectoryServiceClient<Channel>;
type Reply<T> = Result<tonic::Response<T>, Status>;

/// Seeds run per backend when `ISOLATION_SEED` is not set.
const SEEDS: [u64; 4] = [0x5EED_0001, 0x5EED_0002, 0x5EED_0003, 0x5EED_0004];
/// Operations per seed.
const STEPS: usize = 600;
/// Stop early (with a note) rather than run past this per backend.
const BUDGET: Duration = Duration::from_secs(25);
/// Users per directory besides its first Global Administrator.
const USERS_PER_DIRECTORY: usize = 4;

const ROLES: [dpb::Role; 6] = [
    dpb::Role::GlobalAdministrator,
    dpb::Role::BillingAdministrator,
    dpb::Role::UserAdministrator,
    dpb::Role::PasswordAdministrator,
    dpb::Role::ServiceAdministrator,
    dpb::Role::LicenseAdministrator,
];

/// Offer, and whether it is sold per seat.
const OFFERS: [(&str, bool); 6] = [
    ("azure-pay-as-you-go", false),
    ("azure-free-trial", false),
    ("office365-business-basic", true),
    ("office365-business-standard", true),
    ("office365-business-premium", true),
    ("office365-e3", true),
];

/// SplitMix64.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// True with probability `percent`%.
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    /// A random subset of the roles, in a random order.
    fn roles(&mut self, percent_each: u64) -> Vec<i32> {
        let mut roles: Vec<i32> = ROLES
            .iter()
            .filter(|_| self.chance(percent_each))
            .map(|r| *r as i32)
            .collect();
        if roles.len() > 1 && self.chance(50) {
            roles.reverse();
        }
        roles
    }

    /// A UUID drawn from the seed: ids that exist nowhere, reproducibly.
    fn uuid(&mut self) -> String {
        let bytes = (u128::from(self.next()) << 64) | u128::from(self.next());
        uuid::Builder::from_random_bytes(bytes.to_be_bytes())
            .into_uuid()
            .to_string()
    }
}

struct Directory {
    id: String,
    domain: String,
}

struct Person {
    id: String,
    upn: String,
    dir: usize,
    token: String,
    alive: bool,
    /// Deleted for good: neither active nor in the recycle bin.
    purged: bool,
    /// As the directory last answered them, sorted.
    roles: Vec<i32>,
}

struct Sub {
    id: String,
    dir: usize,
    cancelled: bool,
}

/// A page token, the directory of the caller it was issued to, and what it lists.
struct PageToken {
    dir: usize,
    list: List,
    token: String,
}

#[derive(Clone, Copy, Debug)]
enum List {
    Users { role: i32 },
    Subscriptions,
}

/// A purchase made with a request_id, to be retried by users of other directories.
struct Purchase {
    request: bpb::CreateSubscriptionRequest,
}

struct World {
    _ddb: TestDb,
    _bdb: TestDb,
    _directory: DirectoryServer,
    _billing: BillingServer,
    dir: DirectoryClient,
    bill: BillingServiceClient<Channel>,
    dirs: Vec<Directory>,
    people: Vec<Person>,
    subs: Vec<Sub>,
    page_tokens: Vec<PageToken>,
    purchases: Vec<Purchase>,
    rng: Rng,
    seed: u64,
    step: usize,
    /// How many calls of each kind ran, to show the sequence exercised everything.
    ran: BTreeMap<&'static str, usize>,
}

async fn world(backend: Backend, seed: u64) -> Option<World> {
    let ddb = TestDb::new(backend).await?;
    let bdb = TestDb::new(backend).await?;
    let directory = DirectoryServer::start(&ddb).await;
    let billing = BillingServer::start(&bdb, &directory).await;
    let mut dir = directory.client().await;
    let bill = billing.client().await;
    let mut rng = Rng(seed);
    let mut dirs = Vec::new();
    let mut people = Vec::new();
    for (d, prefix) in ["alpha", "bravo", "charlie"].into_iter().enumerate() {
        let tenant = sign_up(&mut dir, prefix).await;
        people.push(Person {
            id: tenant.admin.id.clone(),
            upn: tenant.admin.user_principal_name.clone(),
            dir: d,
            token: tenant.token.clone(),
            alive: true,
            purged: false,
            roles: tenant.admin.roles.clone(),
        });
        for u in 0..USERS_PER_DIRECTORY {
            let roles: Vec<dpb::Role> = ROLES.iter().copied().filter(|_| rng.chance(30)).collect();
            let (user, token) = add_user(&mut dir, &tenant, &format!("user{u}"), &roles).await;
            people.push(Person {
                id: user.id,
                upn: user.user_principal_name,
                dir: d,
                token,
                alive: true,
                purged: false,
                roles: user.roles,
            });
        }
        dirs.push(Directory {
            id: tenant.directory.id,
            domain: tenant.domain,
        });
    }
    Some(World {
        _ddb: ddb,
        _bdb: bdb,
        _directory: directory,
        _billing: billing,
        dir,
        bill,
        dirs,
        people,
        subs: Vec::new(),
        page_tokens: Vec::new(),
        purchases: Vec::new(),
        rng,
        seed,
        step: 0,
        ran: BTreeMap::new(),
    })
}

/// Everything an answer shows: the message, or the error with its decoded details.
fn shown<T: Debug>(reply: &Reply<T>) -> String {
    match reply {
        Ok(answer) => format!("{:?}", answer.get_ref()),
        Err(status) => format!("{status:?} {:?}", status.get_error_details()),
    }
}

/// Which target an id-taking call uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Own,
    Foreign,
}

impl World {
    fn ctx(&self, op: &str, caller: usize) -> String {
        let p = &self.people[caller];
        format!(
            "seed {} step {} {op} by {} (directory {}, alive {}, roles {:?})",
            self.seed, self.step, p.upn, p.dir, p.alive, p.roles
        )
    }

    fn count(&mut self, op: &'static str) {
        *self.ran.entry(op).or_default() += 1;
    }

    /// Every id, UPN and subscription id of directories other than `dir`.
    fn foreign_values(&self, dir: usize) -> Vec<String> {
        let mut values = Vec::new();
        for (d, directory) in self.dirs.iter().enumerate() {
            if d != dir {
                values.push(directory.id.clone());
            }
        }
        for p in self.people.iter().filter(|p| p.dir != dir) {
            values.push(p.id.clone());
            values.push(p.upn.to_lowercase());
        }
        for s in self.subs.iter().filter(|s| s.dir != dir) {
            values.push(s.id.clone());
        }
        values
    }

    /// Asserts `text` names nothing of another directory but what the caller sent.
    fn assert_no_leak(&self, ctx: &str, dir: usize, text: &str, sent: &[&str]) {
        let text = text.to_lowercase();
        let sent: Vec<String> = sent.iter().map(|s| s.to_lowercase()).collect();
        for value in self.foreign_values(dir) {
            if sent.iter().any(|s| s.contains(&value)) {
                continue;
            }
            assert!(
                !text.contains(&value),
                "{ctx}: the answer names {value} of another directory: {text}"
            );
        }
    }

    fn own_person(&self, dir: usize, id: &str) -> bool {
        self.people.iter().any(|p| p.dir == dir && p.id == id)
    }

    /// A user in an answer to a caller of `dir` is one of `dir`'s.
    fn check_user(&self, ctx: &str, dir: usize, user: &dpb::User) {
        assert_eq!(user.directory_id, self.dirs[dir].id, "{ctx}: {user:?}");
        assert!(
            self.own_person(dir, &user.id),
            "{ctx}: a user not of the caller's directory: {user:?}"
        );
        assert!(
            user.user_principal_name
                .to_lowercase()
                .ends_with(&format!("@{}", self.dirs[dir].domain)),
            "{ctx}: {user:?}"
        );
    }

    /// A subscription in an answer to a caller of `dir` is one of `dir`'s (or, for a
    /// purchase, a new one there).
    fn check_sub(&self, ctx: &str, dir: usize, sub: &bpb::Subscription, new: bool) {
        assert_eq!(sub.directory_id, self.dirs[dir].id, "{ctx}: {sub:?}");
        let known = self.subs.iter().find(|s| s.id == sub.id);
        match known {
            Some(s) => assert_eq!(s.dir, dir, "{ctx}: a subscription of another directory"),
            None => assert!(new, "{ctx}: a subscription nobody bought: {sub:?}"),
        }
        assert!(
            sub.owner_user_id.is_empty() || self.own_person(dir, &sub.owner_user_id),
            "{ctx}: {sub:?}"
        );
        assert!(
            self.own_person(dir, &sub.created_by_user_id),
            "{ctx}: {sub:?}"
        );
    }

    /// Asserts a foreign id's answer is exactly a missing id's.
    fn assert_same<T: Debug>(&self, ctx: &str, foreign: &Reply<T>, missing: &Reply<T>) {
        match (foreign, missing) {
            (Err(f), Err(m)) => {
                assert_eq!(f.code(), m.code(), "{ctx}: foreign {f:?} / missing {m:?}");
                assert_eq!(
                    f.message(),
                    m.message(),
                    "{ctx}: foreign {f:?} / missing {m:?}"
                );
                assert_eq!(
                    details(f),
                    details(m),
                    "{ctx}: foreign {f:?} / missing {m:?}"
                );
                assert_eq!(
                    f.details(),
                    m.details(),
                    "{ctx}: the encoded details differ: foreign {f:?} / missing {m:?}"
                );
            }
            _ => panic!("{ctx}: a foreign id answered {foreign:?}, a missing one {missing:?}"),
        }
    }

    fn random_caller(&mut self) -> usize {
        let alive: Vec<usize> = (0..self.people.len())
            .filter(|&i| self.people[i].alive)
            .collect();
        if alive.is_empty() || self.rng.chance(8) {
            self.rng.below(self.people.len())
        } else {
            *self.rng.pick(&alive)
        }
    }

    /// A person of `dir` (Own) or of another directory (Foreign), alive or not.
    fn random_person(&mut self, dir: usize, target: Target) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.people.len())
            .filter(|&i| (self.people[i].dir == dir) == (target == Target::Own))
            .collect();
        (!candidates.is_empty()).then(|| *self.rng.pick(&candidates))
    }

    fn random_sub(&mut self, dir: usize, target: Target) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.subs.len())
            .filter(|&i| (self.subs[i].dir == dir) == (target == Target::Own))
            .collect();
        (!candidates.is_empty()).then(|| *self.rng.pick(&candidates))
    }

    fn random_target(&mut self, own_percent: u64) -> Target {
        if self.rng.chance(own_percent) {
            Target::Own
        } else {
            Target::Foreign
        }
    }

    // -----------------------------------------------------------------------------------
    // The operations.

    async fn get_user_by_id(&mut self, caller: usize) {
        self.count("GetUser(id)");
        let (token, dir) = (self.people[caller].token.clone(), self.people[caller].dir);
        let target = self.random_target(40);
        let Some(t) = self.random_person(dir, target) else {
            return;
        };
        let ctx = self.ctx(&format!("GetUser id {target:?}"), caller);
        let id = self.people[t].id.clone();
        let get = |id: String| dpb::GetUserRequest {
            lookup: Some(dpb::get_user_request::Lookup::UserId(id)),
        };
        let answer = self.dir.get_user(authed(get(id.clone()), &token)).await;
        self.assert_no_leak(&ctx, dir, &shown(&answer), &[&id]);
        match target {
            Target::Own => {
                if let Ok(user) = &answer {
                    self.check_user(&ctx, dir, user.get_ref());
                }
            }
            Target::Foreign => {
                let missing_id = self.rng.uuid();
                let missing = self.dir.get_user(authed(get(missing_id), &token)).await;
                self.assert_same(&ctx, &answer, &missing);
            }
        }
    }

    async fn get_user_by_upn(&mut self, caller: usize) {
        self.count("GetUser(upn)");
        let (token, dir) = (self.people[caller].token.clone(), self.people[caller].dir);
        let target = self.random_target(40);
        let Some(t) = self.random_person(dir, target) else {
            return;
        };
        let ctx = self.ctx(&format!("GetUser upn {target:?}"), caller);
        let mut upn = self.people[t].upn.clone();
        if self.rng.chance(30) {
            upn = upn.to_uppercase();
        }
        let get = |upn: String| dpb::GetUserRequest {
            lookup: Some(dpb::get_user_request::Lookup::UserPrincipalName(upn)),
        };
        let answer = self.dir.get_user(authed(get(upn.clone()), &token)).await;
        self.assert_no_leak(&ctx, dir, &shown(&answer), &[&upn]);
        match target {
            Target::Own => {
                if let Ok(user) = &answer {
                    self.check_user(&ctx, dir, user.get_ref());
                }
            }
            Target::Foreign => {
                // A name that exists nowhere, in the same foreign domain.
                let domain = &self.dirs[self.people[t].dir].domain;
                let missing_upn = format!("nobody{}@{domain}", self.rng.below(1_000_000));
                let missing = self
                    .dir
                    .get_user(authed(get(missing_upn.clone()), &token))
                    .await;
                self.assert_no_leak(&ctx, dir, &shown(&missing), &[&missing_upn]);
                self.assert_same(&ctx, &answer, &missing);
            }
        }
    }

    async fn list_users(&mut self, caller: usize) {
        self.count("ListUsers");
        let (token, dir) = (self.people[caller].token.clone(), self.people[caller].dir);
        let page_size = 1 + self.rng.below(6) as i32;
        let role = if self.rng.chance(50) {
            0
        } else {
            *self.rng.pick(&ROLES) as i32
        };
        let ctx = self.ctx(&format!("ListUsers size {page_size} role {role}"), caller);
        let mut page_token = String::new();
        for _ in 0..20 {
            let answer = self
                .dir
                .list_users(authed(
                    dpb::ListUsersRequest {
                        page_size,
                        page_token: page_token.clone(),
                        role,
                    },
                    &token,
                ))
                .await;
            self.assert_no_leak(&ctx, dir, &shown(&answer), &[]);
            let Ok(page) = answer else {
                return;
            };
            let page = page.into_inner();
            for user in &page.users {
                self.check_user(&ctx, dir, user);
                if role != 0 {
                    assert!(
                        user.roles.contains(&role),
                        "{ctx}: filter ignored: {user:?}"
                    );
                }
            }
            if page.next_page_token.is_empty() {
                return;
            }
            page_token = page.next_page_token;
            self.page_tokens.push(PageToken {
                dir,
                list: List::Users { role },
                token: page_token.clone(),
            });
        }
        panic!("{ctx}: never reached the last page");
    }

    async fn get_directory(&mut self, caller: usize) {
        self.count("GetDirectory");
        let (token, dir) = (self.people[caller].token.clone(), self.people[caller].dir);
        let target = self.random_target(30);
        let id = match target {
            Target::Own => self.dirs[dir].id.clone(),
            Target::Foreign => {
                let others: Vec<usize> = (0..self.dirs.len()).filter(|&d| d != dir).collect();
                let d = *self.rng.pick(&others);
                self.dirs[d].id.clone()
            }
        };
        let ctx = self.ctx(&format!("GetDirectory {target:?}"), caller);
        let get = |directory_id: String| dpb::GetDirectoryRequest { directory_id };
        let answer = self
            .dir
            .get_directory(authed(get(id.clone()), &token))
            .await;
        self.assert_no_leak(&ctx, dir, &shown(&answer), &[&id]);
        match target {
            Target::Own => {
                if let Ok(directory) = &answer {
                    assert_eq!(directory.get_ref().id, self.dirs[dir].id, "{ctx}");
                }
            }
            Target::Foreign => {
                let missing_id = self.rng.uuid();
                let missing = self
                    .dir
                    .get_directory(authed(get(missing_id), &token))
                    .await;
                self.assert_same(&ctx, &answer, &missing);
            }
        }
    }

    async fn who_am_i(&mut self, caller: usize) {
        self.count("WhoAmI+Authorize");
        let (token, dir) = (self.people[caller].token.clone(), self.people[caller].dir);
        let ctx = self.ctx("WhoAmI", caller);
        let answer = self
            .dir
            .who_am_i(authed(dpb::WhoAmIRequest {}, &token))
            .await;
        self.assert_no_leak(&ctx, dir, &shown(&answer), &[]);
        if let Ok(me) = &answer {
            let me = me.get_ref();
            self.check_user(&ctx, dir, me.user.as_ref().expect("user"));
            assert_eq!(
                me.directory.as_ref().expect("directory").id,
                self.dirs[dir].id,
                "{ctx}"
            );
        }
        let action = 1 + self.rng.below(4) as i32;
        let answer = self
            .dir
            .authorize(authed(
                dpb::AuthorizeRequest {
                    action,
                    ..Default::default()
                },
                &token,
            ))
            .await;
        self.assert_no_leak(&ctx, dir, &shown(&answer), &[]);
        if let Ok(decision) = &answer {
            let decision = decision.get_ref();
            assert_eq!(decision.directory_id, self.dirs[dir].id, "{ctx}");
            assert_eq!(decision.user_id, self.people[caller].id, "{ctx}");
        }
    }

    async fn set_user_roles(&mut self, caller: usize) {
        self.count("SetUserRoles");
        let (token, dir) = (self.people[caller].token.clone(), self.people[caller].dir);
        let target = self.random_target(40);
        let Some(t) = self.random_person(dir, target) else {
            return;
        };
        let roles = self.rng.roles(35);
        let ctx = self.ctx(&format!("SetUserRoles {target:?} {roles:?}"), caller);
        let id = self.people[t].id.clone();
        let set = |user_id: String| dpb::SetUserRolesRequest {
            user_id,
            roles: roles.clone(),
        };
        let answer = self
            .dir
            .set_user_roles(authed(set(id.clone()), &token))
            .await;
        self.assert_no_leak(&ctx, dir, &shown(&answer), &[&id]);
        match target {
            Target::Own => {
                if let Ok(user) = &answer {
                    let user = user.get_ref();
                    self.check_user(&ctx, dir, user);
                    assert_eq!(user.id, id, "{ctx}");
                    self.people[t].roles = user.roles.clone();
                }
            }
            Target::Foreign => {
                let missing_id = self.rng.uuid();
                let missing = self
                    .dir
                    .set_user_roles(authed(set(missing_id), &token))
                    .await;
                self.assert_same(&ctx, &answer, &missing);
            }
        }
    }

    async fn delete_user(&mut self, caller: usize) {
        self.count("DeleteUser");
        let (token, dir) = (self.people[caller].token.clone(), self.people[caller].dir);
        // Deleting one's own users is rare, so the directories do not empty out.
        let target = self.random_target(15);
        let Some(t) = self.random_person(dir, target) else {
            return;
        };
        let ctx = self.ctx(&format!("DeleteUser {target:?}"), caller);
        let id = self.people[t].id.clone();
        let delete = |user_id: String| dpb::DeleteUserRequest { user_id };
        let answer = self
            .dir
            .delete_user(authed(delete(id.clone()), &token))
            .await;
        self.assert_no_leak(&ctx, dir, &shown(&answer), &[&id]);
        match target {
            Target::Own => {
                if answer.is_ok() {
                    assert!(self.people[t].alive, "{ctx}: deleted twice");
                    self.people[t].alive = false;
                }
            }
            Target::Foreign => {
                let missing_id = self.rng.uuid();
                let missing = self
                    .dir
                    .delete_user(authed(delete(missing_id), &token))
                    .await;
                self.assert_same(&ctx, &answer, &missing);
            }
        }
    }

    async fn list_deleted_users(&mut self, caller: usize) {
        self.count("ListDeletedUsers");
        let (token, dir) = (self.people[caller].token.clone(), self.people[caller].dir);
        let ctx = self.ctx("ListDeletedUsers", caller);
        let answer = self
            .dir
            .list_deleted_users(authed(
                dpb::ListDeletedUsersRequest {
                    page_size: 1000,
                    page_token: String::new(),
                },
                &token,
            ))
            .await;
        self.assert_no_leak(&ctx, dir, &shown(&answer), &[]);
        if let Ok(page) = &answer {
            for user in &page.get_ref().users {
                self.check_user(&ctx, dir, user);
                let person = self.people.iter().find(|p| p.id == user.id);
                assert!(
                    person.is_some_and(|p| !p.alive && !p.purged),
                    "{ctx}: not in the bin: {user:?}"
                );
            }
        }
    }

    /// RestoreUser or PurgeUser of a user of the caller's directory (in the bin or not) or of
    /// another directory (answered like a random id).
    async fn restore_or_purge(&mut self, caller: usize, restore: bool) {
        self.count(if restore { "RestoreUser" } else { "PurgeUser" });
        let (token, dir) = (self.people[caller].token.clone(), self.people[caller].dir);
        let target = self.random_target(60);
        let Some(t) = self.random_person(dir, target) else {
            return;
        };
        let op = if restore { "RestoreUser" } else { "PurgeUser" };
        let ctx = self.ctx(&format!("{op} {target:?}"), caller);
        let id = self.people[t].id.clone();
        let call = |dir: &mut DirectoryClient, id: String| {
            let mut dir = dir.clone();
            let token = token.clone();
            async move {
                if restore {
                    dir.restore_user(authed(
                        dpb::RestoreUserRequest {
                            user_id: id,
                            new_user_principal_name: String::new(),
                        },
                        &token,
                    ))
                    .await
                    .map(|r| r.map(|u| format!("{u:?}")))
                } else {
                    dir.purge_user(authed(dpb::PurgeUserRequest { user_id: id }, &token))
                        .await
                        .map(|r| r.map(|()| String::new()))
                }
            }
        };
        let answer = call(&mut self.dir, id.clone()).await;
        self.assert_no_leak(&ctx, dir, &shown(&answer), &[&id]);
        match target {
            Target::Own => {
                if answer.is_ok() {
                    let person = &mut self.people[t];
                    assert!(!person.alive && !person.purged, "{ctx}: was not in the bin");
                    if restore {
                        person.alive = true;
                        // Its old token stays dead: it signs in again.
                        let upn = person.upn.clone();
                        self.people[t].token = sign_in(&mut self.dir, &upn, PASSWORD).await;
                    } else {
                        person.purged = true;
                    }
                }
            }
            Target::Foreign => {
                let missing_id = self.rng.uuid();
                let missing = call(&mut self.dir, missing_id).await;
                self.assert_same(&ctx, &answer, &missing);
            }
        }
    }

    async fn restore_user(&mut self, caller: usize) {
        self.restore_or_purge(caller, true).await;
    }

    async fn purge_user(&mut self, caller: usize) {
        self.restore_or_purge(caller, false).await;
    }

    async fn create_subscription(&mut self, caller: usize) {
        self.count("CreateSubscription");
        let (token, dir) = (self.people[caller].token.clone(), self.people[caller].dir);
        // Sometimes retry another caller's request (of any directory) with its request_id:
        // request ids belong to their user, so this is a purchase of this caller's own.
        let request = if !self.purchases.is_empty() && self.rng.chance(25) {
            let i = self.rng.below(self.purchases.len());
            self.purchases[i].request.clone()
        } else {
            let (offer, per_seat) = *self.rng.pick(&OFFERS);
            let request = bpb::CreateSubscriptionRequest {
                offer_id: offer.into(),
                display_name: format!("step {}", self.step),
                seats: if per_seat {
                    1 + self.rng.below(20) as i32
                } else {
                    0
                },
                request_id: if self.rng.chance(50) {
                    self.rng.uuid()
                } else {
                    String::new()
                },
            };
            if !request.request_id.is_empty() {
                self.purchases.push(Purchase {
                    request: request.clone(),
                });
            }
            request
        };
        let ctx = self.ctx(&format!("CreateSubscription {request:?}"), caller);
        let answer = self
            .bill
            .create_subscription(authed(request.clone(), &token))
            .await;
        self.assert_no_leak(&ctx, dir, &shown(&answer), &[]);
        if let Ok(sub) = &answer {
            let sub = sub.get_ref();
            self.check_sub(&ctx, dir, sub, true);
            assert_eq!(sub.created_by_user_id, self.people[caller].id, "{ctx}");
            if !self.subs.iter().any(|s| s.id == sub.id) {
                self.subs.push(Sub {
                    id: sub.id.clone(),
                    dir,
                    cancelled: false,
                });
            }
        }
    }

    async fn get_subscription(&mut self, caller: usize) {
        self.count("GetSubscription");
        let (token, dir) = (self.people[caller].token.clone(), self.people[caller].dir);
        let target = self.random_target(40);
        let Some(s) = self.random_sub(dir, target) else {
            return;
        };
        let ctx = self.ctx(&format!("GetSubscription {target:?}"), caller);
        let id = self.subs[s].id.clone();
        let get = |subscription_id: String| bpb::GetSubscriptionRequest { subscription_id };
        let answer = self
            .bill
            .get_subscription(authed(get(id.clone()), &token))
            .await;
        self.assert_no_leak(&ctx, dir, &shown(&answer), &[&id]);
        match target {
            Target::Own => {
                if let Ok(sub) = &answer {
                    self.check_sub(&ctx, dir, sub.get_ref(), false);
                }
            }
            Target::Foreign => {
                let missing_id = self.rng.uuid();
                let missing = self
                    .bill
                    .get_subscription(authed(get(missing_id), &token))
                    .await;
                self.assert_same(&ctx, &answer, &missing);
            }
        }
    }

    async fn list_subscriptions(&mut self, caller: usize) {
        self.count("ListSubscriptions");
        let (token, dir) = (self.people[caller].token.clone(), self.people[caller].dir);
        let page_size = 1 + self.rng.below(8) as i32;
        let ctx = self.ctx(&format!("ListSubscriptions size {page_size}"), caller);
        let mut page_token = String::new();
        for _ in 0..100 {
            let answer = self
                .bill
                .list_subscriptions(authed(
                    bpb::ListSubscriptionsRequest {
                        page_size,
                        page_token: page_token.clone(),
                    },
                    &token,
                ))
                .await;
            self.assert_no_leak(&ctx, dir, &shown(&answer), &[]);
            let Ok(page) = answer else {
                return;
            };
            let page = page.into_inner();
            for sub in &page.subscriptions {
                self.check_sub(&ctx, dir, sub, false);
            }
            if page.next_page_token.is_empty() {
                return;
            }
            page_token = page.next_page_token;
            self.page_tokens.push(PageToken {
                dir,
                list: List::Subscriptions,
                token: page_token.clone(),
            });
        }
        panic!("{ctx}: never reached the last page");
    }

    async fn cancel_subscription(&mut self, caller: usize) {
        self.count("CancelSubscription");
        let (token, dir) = (self.people[caller].token.clone(), self.people[caller].dir);
        let target = self.random_target(25);
        let Some(s) = self.random_sub(dir, target) else {
            return;
        };
        let ctx = self.ctx(&format!("CancelSubscription {target:?}"), caller);
        let id = self.subs[s].id.clone();
        let cancel = |subscription_id: String| bpb::CancelSubscriptionRequest { subscription_id };
        let answer = self
            .bill
            .cancel_subscription(authed(cancel(id.clone()), &token))
            .await;
        self.assert_no_leak(&ctx, dir, &shown(&answer), &[&id]);
        match target {
            Target::Own => {
                if let Ok(sub) = &answer {
                    let sub = sub.get_ref();
                    self.check_sub(&ctx, dir, sub, false);
                    assert_eq!(sub.state, bpb::SubscriptionState::Cancelled as i32, "{ctx}");
                    self.subs[s].cancelled = true;
                }
            }
            Target::Foreign => {
                let missing_id = self.rng.uuid();
                let missing = self
                    .bill
                    .cancel_subscription(authed(cancel(missing_id), &token))
                    .await;
                self.assert_same(&ctx, &answer, &missing);
            }
        }
    }

    /// A page token issued to a caller of another directory is refused, never followed.
    async fn foreign_page_token(&mut self, caller: usize) {
        let (token, dir) = (self.people[caller].token.clone(), self.people[caller].dir);
        let foreign: Vec<usize> = (0..self.page_tokens.len())
            .filter(|&i| self.page_tokens[i].dir != dir)
            .collect();
        if foreign.is_empty() {
            return;
        }
        self.count("foreign page token");
        let i = *self.rng.pick(&foreign);
        let (list, page_token) = (self.page_tokens[i].list, self.page_tokens[i].token.clone());
        let ctx = self.ctx(&format!("{list:?} with a foreign page token"), caller);
        let status = match list {
            List::Users { role } => {
                let answer = self
                    .dir
                    .list_users(authed(
                        dpb::ListUsersRequest {
                            page_size: 5,
                            page_token: page_token.clone(),
                            role,
                        },
                        &token,
                    ))
                    .await;
                self.assert_no_leak(&ctx, dir, &shown(&answer), &[&page_token]);
                answer.expect_err("a foreign page token is refused")
            }
            List::Subscriptions => {
                let answer = self
                    .bill
                    .list_subscriptions(authed(
                        bpb::ListSubscriptionsRequest {
                            page_size: 5,
                            page_token: page_token.clone(),
                        },
                        &token,
                    ))
                    .await;
                self.assert_no_leak(&ctx, dir, &shown(&answer), &[&page_token]);
                answer.expect_err("a foreign page token is refused")
            }
        };
        let expected = if self.people[caller].alive {
            Code::InvalidArgument
        } else {
            Code::Unauthenticated
        };
        assert_eq!(status.code(), expected, "{ctx}: {status:?}");
    }

    async fn step(&mut self) {
        let caller = self.random_caller();
        match self.rng.below(109) {
            0..=11 => self.get_user_by_id(caller).await,
            12..=21 => self.get_user_by_upn(caller).await,
            22..=29 => self.list_users(caller).await,
            30..=36 => self.get_directory(caller).await,
            37..=41 => self.who_am_i(caller).await,
            42..=50 => self.set_user_roles(caller).await,
            51..=56 => self.delete_user(caller).await,
            57..=69 => self.create_subscription(caller).await,
            70..=79 => self.get_subscription(caller).await,
            80..=86 => self.list_subscriptions(caller).await,
            87..=94 => self.cancel_subscription(caller).await,
            95..=99 => self.foreign_page_token(caller).await,
            100..=102 => self.list_deleted_users(caller).await,
            103..=106 => self.restore_user(caller).await,
            _ => self.purge_user(caller).await,
        }
    }

    /// Each directory holds exactly the users, roles and subscriptions its own users'
    /// successful calls left there: nothing a foreign call touched changed.
    async fn reconcile(&mut self) {
        for d in 0..self.dirs.len() {
            let ctx = format!(
                "seed {} after {} steps, directory {d}",
                self.seed, self.step
            );
            let admin = self
                .people
                .iter()
                .find(|p| {
                    p.dir == d
                        && p.alive
                        && p.roles.contains(&(dpb::Role::GlobalAdministrator as i32))
                })
                .unwrap_or_else(|| panic!("{ctx}: no Global Administrator left"));
            let token = admin.token.clone();
            let page = self
                .dir
                .list_users(authed(
                    dpb::ListUsersRequest {
                        page_size: 1000,
                        ..Default::default()
                    },
                    &token,
                ))
                .await
                .unwrap_or_else(|s| panic!("{ctx}: list users: {s:?}"))
                .into_inner();
            let stored: BTreeSet<(String, Vec<i32>)> = page
                .users
                .into_iter()
                .map(|u| {
                    let mut roles = u.roles;
                    roles.sort_unstable();
                    (u.id, roles)
                })
                .collect();
            let expected: BTreeSet<(String, Vec<i32>)> = self
                .people
                .iter()
                .filter(|p| p.dir == d && p.alive)
                .map(|p| {
                    let mut roles = p.roles.clone();
                    roles.sort_unstable();
                    (p.id.clone(), roles)
                })
                .collect();
            assert_eq!(stored, expected, "{ctx}: users and roles");

            let bin: BTreeSet<String> = self
                .dir
                .list_deleted_users(authed(
                    dpb::ListDeletedUsersRequest {
                        page_size: 1000,
                        page_token: String::new(),
                    },
                    &token,
                ))
                .await
                .unwrap_or_else(|s| panic!("{ctx}: list deleted users: {s:?}"))
                .into_inner()
                .users
                .into_iter()
                .map(|u| u.id)
                .collect();
            let expected: BTreeSet<String> = self
                .people
                .iter()
                .filter(|p| p.dir == d && !p.alive && !p.purged)
                .map(|p| p.id.clone())
                .collect();
            assert_eq!(bin, expected, "{ctx}: the recycle bin");

            let page = self
                .bill
                .list_subscriptions(authed(
                    bpb::ListSubscriptionsRequest {
                        page_size: 1000,
                        page_token: String::new(),
                    },
                    &token,
                ))
                .await
                .unwrap_or_else(|s| panic!("{ctx}: list subscriptions: {s:?}"))
                .into_inner();
            let stored: BTreeSet<(String, bool)> = page
                .subscriptions
                .into_iter()
                .map(|s| (s.id, s.state == bpb::SubscriptionState::Cancelled as i32))
                .collect();
            let expected: BTreeSet<(String, bool)> = self
                .subs
                .iter()
                .filter(|s| s.dir == d)
                .map(|s| (s.id.clone(), s.cancelled))
                .collect();
            assert_eq!(stored, expected, "{ctx}: subscriptions and their states");
        }
    }
}

async fn no_answer_ever_crosses_a_directory(backend: Backend) {
    let started = Instant::now();
    let seeds: Vec<u64> = match std::env::var("ISOLATION_SEED") {
        Ok(seed) => vec![seed.parse().expect("ISOLATION_SEED is a number")],
        Err(_) => SEEDS.to_vec(),
    };
    for seed in seeds {
        let Some(mut w) = world(backend, seed).await else {
            return;
        };
        for step in 0..STEPS {
            if started.elapsed() > BUDGET {
                eprintln!("isolation ({backend:?}): seed {seed} stopped at step {step}: budget");
                break;
            }
            w.step = step;
            w.step().await;
        }
        w.reconcile().await;
        eprintln!(
            "isolation ({backend:?}) seed {seed}: {} subscriptions, {} users deleted, {:?}; {:?} so far",
            w.subs.len(),
            w.people.iter().filter(|p| !p.alive).count(),
            w.ran,
            started.elapsed()
        );
        let foreign_checks = ["GetUser(id)", "GetSubscription", "SetUserRoles"];
        for op in foreign_checks {
            assert!(
                w.ran.get(op).copied().unwrap_or(0) > 0,
                "seed {seed}: the sequence never ran {op}"
            );
        }
    }
}

on_both_backends!(no_answer_ever_crosses_a_directory);
