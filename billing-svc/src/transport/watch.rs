//! WatchChanges: the request's start, the stream's rule (the domain's checks of its watcher),
//! and each event as a `Change`.

use std::pin::Pin;
use std::sync::Arc;

use contract::billing::v1 as pb;
use contract::cursor::{Cursors, Position};
use contract::time::timestamp;
use futures::{Stream, StreamExt as _};
use storage::feed::{End, Entry, Event, OpenError, Start};
use tonic::Status;

use super::{convert, to_status};
use crate::domain::model::Changed;
use crate::domain::watch::Watcher;
use crate::domain::{Error, Service};
use crate::store::ChangeValue;

/// The stream WatchChanges answers with.
pub type ChangeStream = Pin<Box<dyn Stream<Item = Result<pb::Change, Status>> + Send>>;

/// Where a request starts, whether a bookmark comes first, and the time of its cursor (to
/// check against the retention).
pub fn begin(
    cursors: &Cursors,
    request: &pb::WatchChangesRequest,
) -> Result<(Start, bool, Option<i64>), Error> {
    let start = cursors.start(&request.start_after, request.start_at_now)?;
    Ok(storage::feed::begin(start))
}

/// The domain's checks of one stream's watcher.
pub struct Rule {
    pub service: Arc<Service>,
    pub watcher: Watcher,
}

impl storage::feed::Rule<ChangeValue> for Rule {
    type Error = Error;

    fn admit(&mut self, entry: &Entry<ChangeValue>) -> Result<(), Error> {
        self.service.admit(&entry.value)
    }

    fn tick(&mut self) -> Result<(), Error> {
        self.watcher.still_valid()
    }
}

/// The error a stream ends with.
pub fn ended(end: End<Error>) -> Error {
    end.into_error(database)
}

/// The error of a stream that could not open.
pub fn not_opened(err: OpenError) -> Error {
    err.into_error(database)
}

/// A failed statement of the feed, as the service's error.
pub fn database(err: sqlx::Error) -> Error {
    match storage::db::classify(err) {
        storage::db::Failure::Unavailable(err) => Error::Unavailable(err),
        storage::db::Failure::Internal(err) => Error::Internal(err),
    }
}

/// The events of a stream as `Change` messages.
pub fn changes(
    watch: storage::feed::Watch<ChangeValue, Error>,
    cursors: Cursors,
    service: Arc<Service>,
) -> ChangeStream {
    Box::pin(watch.map(move |event| match event {
        Ok(Event::Change(entry)) => Ok(change(&cursors, &entry)),
        Ok(Event::Bookmark(seq)) => {
            let time = service.now_micros();
            Ok(pb::Change {
                cursor: cursors.mint(Position { seq, time }),
                change_time: Some(timestamp(time)),
                r#type: pb::ChangeType::Bookmark.into(),
                ..pb::Change::default()
            })
        }
        Err(end) => Err(to_status(ended(end))),
    }))
}

fn change(cursors: &Cursors, entry: &Entry<ChangeValue>) -> pb::Change {
    let mut change = pb::Change {
        cursor: cursors.mint(Position {
            seq: entry.seq,
            time: entry.time,
        }),
        change_time: Some(timestamp(entry.time)),
        directory_id: entry.directory_id.clone(),
        ..pb::Change::default()
    };
    // A change that did not decode ended the stream before it got here (`Rule::admit`).
    if let Ok(record) = &entry.value {
        change.r#type = record.kind as i32;
        change.resource = Some(match &record.resource {
            Changed::Subscription(s) => {
                pb::change::Resource::Subscription(convert::subscription(s.clone()))
            }
            Changed::Assignment(a) => {
                pb::change::Resource::LicenseAssignment(convert::assignment(a.clone()))
            }
        });
    }
    change
}
