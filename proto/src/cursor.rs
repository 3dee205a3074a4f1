//! Change-feed cursors: where a change (or a bookmark) sits in its service's feed, opaque and
//! tamper-evident.
//!
//! A cursor carries the change's position (its number in the service's outbox) and its time
//! (for a bookmark, when the bookmark was sent), under an HMAC-SHA256 tag bound to the
//! service: 32 bytes, 43 characters of base64url. The same change has the same cursor on every
//! stream. A cursor of the other service, or one with any byte changed, does not open.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::mac::{TAG_LEN, TagKey};
use crate::refusal::Refusal;

const BODY_LEN: usize = 16;
const RAW_LEN: usize = BODY_LEN + TAG_LEN;
/// Characters of an encoded cursor.
pub const ENCODED_LEN: usize = 43;

/// A position in a change feed and the time it was read at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// The number of the last change delivered before this point (the outbox's `seq`).
    pub seq: i64,
    /// Microseconds since the Unix epoch: the change's time, or the bookmark's.
    pub time: i64,
}

/// Mints and opens cursors for one service.
#[derive(Clone)]
pub struct Cursors {
    key: TagKey,
}

impl std::fmt::Debug for Cursors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cursors { .. }")
    }
}

impl Cursors {
    /// `secret` is a key of at least 32 random bytes the service keeps; `service` its name
    /// (the gRPC service), bound into every tag.
    pub fn new(secret: &[u8], service: &str) -> Self {
        let mut domain = b"change-cursor:v1:".to_vec();
        domain.extend_from_slice(service.as_bytes());
        domain.push(b':');
        Self {
            key: TagKey::new(secret, &domain),
        }
    }

    /// The cursor of `position`.
    pub fn mint(&self, position: Position) -> String {
        let mut raw = [0u8; RAW_LEN];
        raw[..8].copy_from_slice(&position.seq.to_be_bytes());
        raw[8..16].copy_from_slice(&position.time.to_be_bytes());
        let tag = self.key.tag(&raw[..BODY_LEN]);
        raw[BODY_LEN..].copy_from_slice(&tag);
        URL_SAFE_NO_PAD.encode(raw)
    }

    /// The position `cursor` names, if this service minted it and it is intact.
    pub fn open(&self, cursor: &str) -> Option<Position> {
        if cursor.len() != ENCODED_LEN {
            return None;
        }
        let mut raw = [0u8; RAW_LEN];
        let written = URL_SAFE_NO_PAD
            .decode_slice(cursor.as_bytes(), &mut raw)
            .ok()?;
        if written != RAW_LEN || !self.key.verify(&raw[..BODY_LEN], &raw[BODY_LEN..]) {
            return None;
        }
        let seq = i64::from_be_bytes(raw[..8].try_into().ok()?);
        let time = i64::from_be_bytes(raw[8..16].try_into().ok()?);
        (seq >= 0).then_some(Position { seq, time })
    }
}

/// Where a WatchChanges request starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// At the oldest change still kept (`start_after` empty).
    Oldest,
    /// After the newest change, with a bookmark first (`start_at_now`).
    Now,
    /// After the change or bookmark of this cursor.
    After(Position),
}

impl Cursors {
    /// The start a WatchChanges request asks for: `start_after` and `start_at_now` together,
    /// or a cursor this service did not mint, are refused.
    pub fn start(&self, start_after: &str, start_at_now: bool) -> Result<StartAt, Refusal> {
        match (start_after.is_empty(), start_at_now) {
            (false, true) => Err(Refusal::InvalidCursor(
                "start_after and start_at_now cannot both be set",
            )),
            (true, true) => Ok(StartAt::Now),
            (true, false) => Ok(StartAt::Oldest),
            (false, false) => {
                self.open(start_after)
                    .map(StartAt::After)
                    .ok_or(Refusal::InvalidCursor(
                        "not a cursor of this service's change feed",
                    ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_opens_only_in_its_own_service() {
        let directory = Cursors::new(&[7; 32], "directory.v1.DirectoryService");
        let position = Position {
            seq: 12_345,
            time: 1_700_000_000_000_000,
        };
        let cursor = directory.mint(position);
        assert_eq!(cursor.len(), ENCODED_LEN);
        assert_eq!(directory.open(&cursor), Some(position));
        assert_eq!(directory.mint(position), cursor, "one position, one cursor");
        let billing = Cursors::new(&[7; 32], "billing.v1.BillingService");
        assert_eq!(billing.open(&cursor), None);
        let other_key = Cursors::new(&[8; 32], "directory.v1.DirectoryService");
        assert_eq!(other_key.open(&cursor), None);
    }

    #[test]
    fn any_changed_character_is_refused() {
        let cursors = Cursors::new(&[7; 32], "s");
        let cursor = cursors.mint(Position { seq: 1, time: 2 });
        for i in 0..cursor.len() {
            let mut bytes = cursor.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let changed = String::from_utf8(bytes).unwrap_or_default();
            assert_eq!(cursors.open(&changed), None, "changed at {i}");
        }
        for bad in ["", "x", &cursor[1..], &format!("{cursor}A")] {
            assert_eq!(cursors.open(bad), None);
        }
    }
}
