//! Requests into validated domain values (every bad field becomes a violation naming it), and
//! domain values into messages. The only place besides the handlers that sees prost types.

use contract::directory::v1 as pb;
use contract::fields::{self, Violation, Violations};
use contract::refusal::Refusal;
use contract::time::timestamp;

use crate::domain::Error;
use crate::domain::model::{Decision, DeletedUser, Directory, User};
use crate::domain::types::{
    Action, DomainPrefix, ListUsersQuery, NewDirectory, NewUser, Page, Password, Role, RoleSet,
    Upn, UserLookup, UserName,
};

/// Finishes a conversion: the value if every field was good, else all violations at once.
fn done<T>(violations: Violations, value: impl FnOnce() -> Option<T>) -> Result<T, Error> {
    match violations.is_empty().then(value).flatten() {
        Some(value) => Ok(value),
        None => Err(Refusal::InvalidArgument(violations.into_vec()).into()),
    }
}

fn role(field: &str, raw: i32) -> Result<Option<Role>, Violation> {
    match pb::Role::try_from(raw) {
        Ok(pb::Role::Unspecified) => Ok(None),
        Ok(pb::Role::GlobalAdministrator) => Ok(Some(Role::GlobalAdministrator)),
        Ok(pb::Role::BillingAdministrator) => Ok(Some(Role::BillingAdministrator)),
        Ok(pb::Role::UserAdministrator) => Ok(Some(Role::UserAdministrator)),
        Ok(pb::Role::PasswordAdministrator) => Ok(Some(Role::PasswordAdministrator)),
        Ok(pb::Role::ServiceAdministrator) => Ok(Some(Role::ServiceAdministrator)),
        Ok(pb::Role::LicenseAdministrator) => Ok(Some(Role::LicenseAdministrator)),
        Err(_) => Err(Violation::new(field, format!("unknown role {raw}"))),
    }
}

/// More entries than this in a role list is not a mistake worth one violation each.
const MAX_ROLE_ENTRIES: usize = 16;

fn role_set(field: &str, raw: &[i32], violations: &mut Violations) -> RoleSet {
    if raw.len() > MAX_ROLE_ENTRIES {
        violations.push(Violation::new(
            field,
            format!("at most {MAX_ROLE_ENTRIES} entries, got {}", raw.len()),
        ));
        return RoleSet::EMPTY;
    }
    let mut roles = Vec::with_capacity(raw.len().min(Role::ALL.len()));
    for (i, &value) in raw.iter().enumerate() {
        let path = format!("{field}[{i}]");
        match role(&path, value) {
            Ok(Some(r)) => roles.push(r),
            Ok(None) => violations.push(Violation::new(path, "ROLE_UNSPECIFIED is not a role")),
            Err(v) => violations.push(v),
        }
    }
    RoleSet::of(roles)
}

fn role_to_pb(role: Role) -> pb::Role {
    match role {
        Role::GlobalAdministrator => pb::Role::GlobalAdministrator,
        Role::BillingAdministrator => pb::Role::BillingAdministrator,
        Role::UserAdministrator => pb::Role::UserAdministrator,
        Role::PasswordAdministrator => pb::Role::PasswordAdministrator,
        Role::ServiceAdministrator => pb::Role::ServiceAdministrator,
        Role::LicenseAdministrator => pb::Role::LicenseAdministrator,
    }
}

fn roles_to_pb(roles: RoleSet) -> Vec<i32> {
    roles.iter().map(|r| role_to_pb(r) as i32).collect()
}

pub fn new_directory(req: pb::CreateDirectoryRequest) -> Result<NewDirectory, Error> {
    let pb::CreateDirectoryRequest {
        display_name,
        domain_prefix,
        admin_user_name,
        admin_display_name,
        admin_password,
    } = req;
    let mut v = Violations::new();
    let display_name = v.check(fields::display_name("display_name", &display_name));
    let domain_prefix = v.check(DomainPrefix::parse("domain_prefix", &domain_prefix));
    let admin_user_name = v.check(UserName::parse("admin_user_name", &admin_user_name));
    let admin_display_name = v.check(fields::display_name(
        "admin_display_name",
        &admin_display_name,
    ));
    let admin_password = v.check(Password::parse("admin_password", &admin_password));
    done(v, || {
        Some(NewDirectory {
            display_name: display_name?,
            domain_prefix: domain_prefix?,
            admin_user_name: admin_user_name?,
            admin_display_name: admin_display_name?,
            admin_password: admin_password?,
        })
    })
}

/// SignIn checks only the shape: a UPN, and a password of at most 256 characters.
pub fn sign_in(req: pb::SignInRequest) -> Result<(Upn, Password), Error> {
    let pb::SignInRequest {
        user_principal_name,
        password,
    } = req;
    let mut v = Violations::new();
    let upn = v.check(Upn::parse("user_principal_name", &user_principal_name));
    if password.is_empty() {
        v.push(Violation::new("password", "is required"));
    } else if password.chars().count() > 256 {
        v.push(Violation::new("password", "must be at most 256 characters"));
    }
    done(v, || Some((upn?, Password::unchecked(&password))))
}

pub fn get_directory(req: pb::GetDirectoryRequest) -> Result<uuid::Uuid, Error> {
    let pb::GetDirectoryRequest { directory_id } = req;
    let mut v = Violations::new();
    let id = v.check(fields::id("directory_id", &directory_id));
    done(v, || id)
}

pub fn new_user(req: pb::CreateUserRequest) -> Result<NewUser, Error> {
    let pb::CreateUserRequest {
        user_principal_name,
        display_name,
        password,
        roles,
    } = req;
    let mut v = Violations::new();
    let upn = v.check(Upn::parse("user_principal_name", &user_principal_name));
    let display_name = v.check(fields::display_name("display_name", &display_name));
    let password = v.check(Password::parse("password", &password));
    let roles = role_set("roles", &roles, &mut v);
    done(v, || {
        Some(NewUser {
            upn: upn?,
            display_name: display_name?,
            password: password?,
            roles,
        })
    })
}

pub fn get_user(req: pb::GetUserRequest) -> Result<UserLookup, Error> {
    let pb::GetUserRequest { lookup } = req;
    let mut v = Violations::new();
    let lookup = match lookup {
        Some(pb::get_user_request::Lookup::UserId(id)) => {
            v.check(fields::id("user_id", &id)).map(UserLookup::Id)
        }
        Some(pb::get_user_request::Lookup::UserPrincipalName(upn)) => v
            .check(Upn::parse("user_principal_name", &upn))
            .map(UserLookup::Upn),
        None => {
            v.push(Violation::new(
                "lookup",
                "set user_id or user_principal_name",
            ));
            None
        }
    };
    done(v, || lookup)
}

pub fn list_users(req: pb::ListUsersRequest) -> Result<ListUsersQuery, Error> {
    let pb::ListUsersRequest {
        page_size,
        page_token,
        role: role_filter,
    } = req;
    let mut v = Violations::new();
    let page_size = v.check(fields::page_size("page_size", page_size));
    let role_filter = v.check(role("role", role_filter));
    done(v, || {
        Some(ListUsersQuery {
            page_size: page_size?,
            page_token,
            role: role_filter?,
        })
    })
}

pub fn set_user_roles(req: pb::SetUserRolesRequest) -> Result<(uuid::Uuid, RoleSet), Error> {
    let pb::SetUserRolesRequest { user_id, roles } = req;
    let mut v = Violations::new();
    let id = v.check(fields::id("user_id", &user_id));
    let roles = role_set("roles", &roles, &mut v);
    done(v, || Some((id?, roles)))
}

pub fn delete_user(req: pb::DeleteUserRequest) -> Result<uuid::Uuid, Error> {
    let pb::DeleteUserRequest { user_id } = req;
    let mut v = Violations::new();
    let id = v.check(fields::id("user_id", &user_id));
    done(v, || id)
}

pub fn list_deleted_users(req: pb::ListDeletedUsersRequest) -> Result<Page, Error> {
    let pb::ListDeletedUsersRequest {
        page_size,
        page_token,
    } = req;
    let mut v = Violations::new();
    let page_size = v.check(fields::page_size("page_size", page_size));
    done(v, || {
        Some(Page {
            page_size: page_size?,
            page_token,
        })
    })
}

pub fn restore_user(req: pb::RestoreUserRequest) -> Result<(uuid::Uuid, Option<Upn>), Error> {
    let pb::RestoreUserRequest {
        user_id,
        new_user_principal_name,
    } = req;
    let mut v = Violations::new();
    let id = v.check(fields::id("user_id", &user_id));
    let upn = if new_user_principal_name.is_empty() {
        Some(None)
    } else {
        v.check(Upn::parse(
            "new_user_principal_name",
            &new_user_principal_name,
        ))
        .map(Some)
    };
    done(v, || Some((id?, upn?)))
}

pub fn purge_user(req: pb::PurgeUserRequest) -> Result<uuid::Uuid, Error> {
    let pb::PurgeUserRequest { user_id } = req;
    let mut v = Violations::new();
    let id = v.check(fields::id("user_id", &user_id));
    done(v, || id)
}

/// The action asked about, and the user it is asked for (if any).
pub fn authorize(req: pb::AuthorizeRequest) -> Result<(Action, Option<uuid::Uuid>), Error> {
    let pb::AuthorizeRequest {
        action,
        subject_user_id,
    } = req;
    let mut v = Violations::new();
    let action = match pb::Action::try_from(action) {
        Ok(pb::Action::PurchaseSubscription) => Some(Action::PurchaseSubscription),
        Ok(pb::Action::ManageSubscriptions) => Some(Action::ManageSubscriptions),
        Ok(pb::Action::ReadSubscriptions) => Some(Action::ReadSubscriptions),
        Ok(pb::Action::ManageUsers) => Some(Action::ManageUsers),
        Ok(pb::Action::ManageLicenses) => Some(Action::ManageLicenses),
        Ok(pb::Action::ReadLicenses) => Some(Action::ReadLicenses),
        Ok(pb::Action::Unspecified) => {
            v.push(Violation::new("action", "must be set to an action"));
            None
        }
        Err(_) => {
            v.push(Violation::new("action", format!("unknown action {action}")));
            None
        }
    };
    let subject = if subject_user_id.is_empty() {
        Some(None)
    } else {
        v.check(fields::id("subject_user_id", &subject_user_id))
            .map(Some)
    };
    done(v, || Some((action?, subject?)))
}

pub fn user(user: User) -> pb::User {
    pb::User {
        roles: roles_to_pb(user.roles),
        create_time: Some(timestamp(user.create_time)),
        id: user.id,
        directory_id: user.directory_id,
        user_principal_name: user.upn,
        display_name: user.display_name,
        delete_time: None,
        purge_time: None,
    }
}

pub fn deleted_user(deleted: DeletedUser) -> pb::User {
    pb::User {
        delete_time: Some(timestamp(deleted.delete_time)),
        purge_time: Some(timestamp(deleted.purge_time)),
        ..user(deleted.user)
    }
}

pub fn directory(directory: Directory) -> pb::Directory {
    pb::Directory {
        id: directory.id,
        display_name: directory.display_name,
        initial_domain: directory.initial_domain,
        create_time: Some(timestamp(directory.create_time)),
    }
}

pub fn decision(decision: Decision) -> pb::AuthorizeResponse {
    pb::AuthorizeResponse {
        allowed: decision.allowed,
        roles: roles_to_pb(decision.user.roles),
        user_id: decision.user.id,
        directory_id: decision.user.directory_id,
        reason: decision.reason,
        subject_active: decision.subject_active,
    }
}
