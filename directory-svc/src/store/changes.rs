//! The directory's changes as its feed stores them: each write records what it changed in
//! its own transaction (`storage::feed::Outbox`), as JSON of the fields a `Change` shows:
//! never a password, a hash or a token. [`decode`] reads them back, once per change for every
//! stream.

use serde::{Deserialize, Serialize};
use storage::feed::NewChange;

use crate::domain::model::{
    ChangeKind, ChangeRecord, ChangeResource, DeletedUser, Directory, User,
};
use crate::domain::types::RoleSet;

/// A directory or a user as a change shows it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "resource", rename_all = "snake_case")]
enum Resource {
    Directory {
        id: String,
        display_name: String,
        initial_domain: String,
        create_time: i64,
    },
    User {
        id: String,
        directory_id: String,
        user_principal_name: String,
        display_name: String,
        /// The bit mask of roles, as stored.
        roles: i64,
        create_time: i64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        delete_time: Option<i64>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        purge_time: Option<i64>,
    },
}

pub fn directory(
    kind: ChangeKind,
    directory: &Directory,
    time: i64,
) -> Result<NewChange, sqlx::Error> {
    encode(
        kind,
        time,
        &directory.id,
        &Resource::Directory {
            id: directory.id.clone(),
            display_name: directory.display_name.clone(),
            initial_domain: directory.initial_domain.clone(),
            create_time: directory.create_time,
        },
    )
}

pub fn user(kind: ChangeKind, user: &User, time: i64) -> Result<NewChange, sqlx::Error> {
    encode(kind, time, &user.directory_id, &user_resource(user, None))
}

/// A change of a user in the recycle bin (its deletion, or its purge).
pub fn deleted_user(
    kind: ChangeKind,
    deleted: &DeletedUser,
    time: i64,
) -> Result<NewChange, sqlx::Error> {
    encode(
        kind,
        time,
        &deleted.user.directory_id,
        &user_resource(&deleted.user, Some(deleted)),
    )
}

fn encode(
    kind: ChangeKind,
    time: i64,
    directory_id: &str,
    resource: &Resource,
) -> Result<NewChange, sqlx::Error> {
    Ok(NewChange {
        time,
        kind: kind as i64,
        directory_id: directory_id.to_owned(),
        resource: serde_json::to_string(resource).map_err(|e| sqlx::Error::Encode(Box::new(e)))?,
    })
}

fn user_resource(user: &User, deleted: Option<&DeletedUser>) -> Resource {
    Resource::User {
        id: user.id.clone(),
        directory_id: user.directory_id.clone(),
        user_principal_name: user.upn.clone(),
        display_name: user.display_name.clone(),
        roles: user.roles.bits(),
        create_time: user.create_time,
        delete_time: deleted.map(|d| d.delete_time),
        purge_time: deleted.map(|d| d.purge_time),
    }
}

/// A stored change read back; `Err` names what did not decode (a stored row this version
/// cannot read ends the streams that reach it, rather than being skipped).
pub fn decode(kind: i64, resource: &str) -> Result<ChangeRecord, String> {
    let kind = ChangeKind::from_value(kind).ok_or_else(|| format!("unknown change kind {kind}"))?;
    let resource: Resource =
        serde_json::from_str(resource).map_err(|e| format!("change resource: {e}"))?;
    let resource = match resource {
        Resource::Directory {
            id,
            display_name,
            initial_domain,
            create_time,
        } => ChangeResource::Directory(Directory {
            id,
            display_name,
            domain_prefix: initial_domain
                .split_once('.')
                .map_or_else(|| initial_domain.clone(), |(prefix, _)| prefix.to_owned()),
            initial_domain,
            create_time,
        }),
        Resource::User {
            id,
            directory_id,
            user_principal_name,
            display_name,
            roles,
            create_time,
            delete_time,
            purge_time,
        } => {
            let user = User {
                id,
                directory_id,
                upn: user_principal_name,
                display_name,
                roles: RoleSet::from_bits(roles),
                create_time,
                token_generation: 0,
            };
            match (delete_time, purge_time) {
                (Some(delete_time), Some(purge_time)) => ChangeResource::DeletedUser(DeletedUser {
                    user,
                    delete_time,
                    purge_time,
                }),
                _ => ChangeResource::User(user),
            }
        }
    };
    Ok(ChangeRecord { kind, resource })
}
