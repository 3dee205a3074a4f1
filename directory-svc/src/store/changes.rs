//! The change feed's outbox: each write records what it changed in its own transaction
//! (`migrations/0004_changes.sql` says how cursor numbers stay in commit order). The resource
//! is kept as JSON of the fields a `Change` shows: never a password, a hash or a token.

use serde::Serialize;

use crate::domain::model::{ChangeKind, DeletedUser, Directory, User};

/// A directory or a user as a change shows it.
#[derive(Debug, Serialize)]
#[serde(tag = "resource", rename_all = "snake_case")]
enum Resource<'a> {
    Directory {
        id: &'a str,
        display_name: &'a str,
        initial_domain: &'a str,
        create_time: i64,
    },
    User {
        id: &'a str,
        directory_id: &'a str,
        user_principal_name: &'a str,
        display_name: &'a str,
        /// The bit mask of roles, as stored.
        roles: i64,
        create_time: i64,
        #[serde(skip_serializing_if = "Option::is_none")]
        delete_time: Option<i64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        purge_time: Option<i64>,
    },
}

/// One change to record.
pub struct Change {
    kind: ChangeKind,
    directory_id: String,
    resource: String,
}

impl Change {
    pub fn directory(kind: ChangeKind, directory: &Directory) -> Result<Self, sqlx::Error> {
        Self::new(
            kind,
            &directory.id,
            &Resource::Directory {
                id: &directory.id,
                display_name: &directory.display_name,
                initial_domain: &directory.initial_domain,
                create_time: directory.create_time,
            },
        )
    }

    pub fn user(kind: ChangeKind, user: &User) -> Result<Self, sqlx::Error> {
        Self::new(kind, &user.directory_id, &user_resource(user, None))
    }

    /// A change of a user in the recycle bin (its deletion, or its purge).
    pub fn deleted_user(kind: ChangeKind, deleted: &DeletedUser) -> Result<Self, sqlx::Error> {
        Self::new(
            kind,
            &deleted.user.directory_id,
            &user_resource(&deleted.user, Some(deleted)),
        )
    }

    fn new(
        kind: ChangeKind,
        directory_id: &str,
        resource: &Resource<'_>,
    ) -> Result<Self, sqlx::Error> {
        Ok(Self {
            kind,
            directory_id: directory_id.to_owned(),
            resource: serde_json::to_string(resource)
                .map_err(|e| sqlx::Error::Encode(Box::new(e)))?,
        })
    }
}

fn user_resource<'a>(user: &'a User, deleted: Option<&DeletedUser>) -> Resource<'a> {
    Resource::User {
        id: &user.id,
        directory_id: &user.directory_id,
        user_principal_name: &user.upn,
        display_name: &user.display_name,
        roles: user.roles.bits(),
        create_time: user.create_time,
        delete_time: deleted.map(|d| d.delete_time),
        purge_time: deleted.map(|d| d.purge_time),
    }
}

/// Records `changes` at `time`, in this order, within `tx`: the transaction's last statements
/// before its commit, since taking the numbers holds `change_sequence`'s row until then.
pub async fn record(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    changes: &[Change],
    time: i64,
) -> Result<(), sqlx::Error> {
    let Ok(count) = i64::try_from(changes.len()) else {
        return Err(sqlx::Error::Protocol("too many changes".into()));
    };
    if count == 0 {
        return Ok(());
    }
    let last: i64 = sqlx::query_scalar(
        "UPDATE change_sequence SET last = last + $1 WHERE id = 1 RETURNING last",
    )
    .bind(count)
    .fetch_one(&mut **tx)
    .await?;
    for (seq, change) in (last - count + 1..).zip(changes) {
        sqlx::query(
            "INSERT INTO changes (seq, change_time, directory_id, kind, resource) \
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(seq)
        .bind(time)
        .bind(&change.directory_id)
        .bind(change.kind as i64)
        .bind(&change.resource)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}
