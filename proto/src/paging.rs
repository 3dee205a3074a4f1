//! Opaque, tamper-evident page tokens.
//!
//! A token carries the list it belongs to, the scope it was issued in (the caller's directory,
//! and user where the list is per user), the filter of the request and the last key of the
//! page, signed with HMAC-SHA256 under a key the service keeps in its database. A token from
//! another list, scope or filter, or one whose bytes were changed, does not decode.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};

use crate::mac::TagKey;

/// Why a page token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PageTokenError {
    /// Not a token this service issued, or issued in another scope or for another list.
    #[error("page token is not valid for this list")]
    Invalid,
    /// A genuine token of this list and scope, but for another filter.
    #[error("page token was issued for a different filter")]
    FilterChanged,
}

#[derive(Serialize, Deserialize)]
struct Payload {
    /// The list (its RPC name).
    l: String,
    /// The scope the token was issued in.
    s: String,
    /// The filter of the request.
    f: String,
    /// The last key of the page the token follows.
    k: String,
}

/// Issues and checks page tokens under one secret.
#[derive(Clone)]
pub struct PageTokens {
    key: TagKey,
}

impl std::fmt::Debug for PageTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PageTokens { .. }")
    }
}

impl PageTokens {
    /// `secret` should be at least 32 random bytes kept by the service.
    pub fn new(secret: &[u8]) -> Self {
        Self {
            key: TagKey::new(secret, b"page-token:v1:"),
        }
    }

    /// A token for the page after `last_key`.
    pub fn issue(&self, list: &str, scope: &str, filter: &str, last_key: &str) -> String {
        let payload = Payload {
            l: list.to_owned(),
            s: scope.to_owned(),
            f: filter.to_owned(),
            k: last_key.to_owned(),
        };
        // Serializing a struct of strings to JSON cannot fail.
        let json = serde_json::to_vec(&payload).unwrap_or_default();
        let tag = self.key.tag(&json);
        let mut out = URL_SAFE_NO_PAD.encode(&json);
        out.push('.');
        out.push_str(&URL_SAFE_NO_PAD.encode(tag));
        out
    }

    /// The last key carried by `token`, if it was issued by this service for `list` in `scope`
    /// with `filter`.
    pub fn open(
        &self,
        token: &str,
        list: &str,
        scope: &str,
        filter: &str,
    ) -> Result<String, PageTokenError> {
        let (body, tag) = token.split_once('.').ok_or(PageTokenError::Invalid)?;
        let json = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| PageTokenError::Invalid)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| PageTokenError::Invalid)?;
        if !self.key.verify(&json, &tag) {
            return Err(PageTokenError::Invalid);
        }
        let payload: Payload =
            serde_json::from_slice(&json).map_err(|_| PageTokenError::Invalid)?;
        if payload.l != list || payload.s != scope {
            return Err(PageTokenError::Invalid);
        }
        if payload.f != filter {
            return Err(PageTokenError::FilterChanged);
        }
        Ok(payload.k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_binding() {
        let tokens = PageTokens::new(&[7; 32]);
        let t = tokens.issue("ListUsers", "dir-a", "role=1", "bob@x");
        assert_eq!(
            tokens.open(&t, "ListUsers", "dir-a", "role=1").as_deref(),
            Ok("bob@x")
        );
        assert_eq!(
            tokens.open(&t, "ListUsers", "dir-b", "role=1"),
            Err(PageTokenError::Invalid)
        );
        assert_eq!(
            tokens.open(&t, "ListSubs", "dir-a", "role=1"),
            Err(PageTokenError::Invalid)
        );
        assert_eq!(
            tokens.open(&t, "ListUsers", "dir-a", ""),
            Err(PageTokenError::FilterChanged)
        );
        let other = PageTokens::new(&[8; 32]);
        assert_eq!(
            other.open(&t, "ListUsers", "dir-a", "role=1"),
            Err(PageTokenError::Invalid)
        );
    }

    #[test]
    fn tampering_is_detected() {
        let tokens = PageTokens::new(&[7; 32]);
        let t = tokens.issue("ListUsers", "dir-a", "", "bob@x");
        for i in 0..t.len() {
            let mut bytes = t.clone().into_bytes();
            bytes[i] = if bytes[i] == b'A' { b'B' } else { b'A' };
            let Ok(changed) = String::from_utf8(bytes) else {
                continue;
            };
            if changed == t {
                continue;
            }
            assert!(
                tokens.open(&changed, "ListUsers", "dir-a", "").is_err(),
                "{changed}"
            );
        }
        assert!(tokens.open("", "ListUsers", "dir-a", "").is_err());
        assert!(tokens.open("garbage", "ListUsers", "dir-a", "").is_err());
        let (body, _) = t.split_once('.').unwrap_or_default();
        assert!(
            tokens
                .open(&format!("{body}."), "ListUsers", "dir-a", "")
                .is_err()
        );
    }
}

/// Property tests: the page-token decoder takes any input without panicking, accepts only what
/// it issued, and round-trips any key.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_tokens_are_refused(raw in any::<String>()) {
            let tokens = PageTokens::new(&[9; 32]);
            prop_assert!(tokens.open(&raw, "L", "s", "").is_err());
        }

        #[test]
        fn keys_round_trip_and_flipped_bytes_are_refused(key in any::<String>(), at in any::<usize>()) {
            let tokens = PageTokens::new(&[9; 32]);
            let token = tokens.issue("L", "s", "f", &key);
            prop_assert_eq!(tokens.open(&token, "L", "s", "f"), Ok(key));
            let mut bytes = token.clone().into_bytes();
            let i = at % bytes.len();
            bytes[i] = if bytes[i] == b'x' { b'y' } else { b'x' };
            if let Ok(changed) = String::from_utf8(bytes)
                && changed != token
            {
                prop_assert!(tokens.open(&changed, "L", "s", "f").is_err());
            }
        }
    }
}
