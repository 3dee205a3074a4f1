//! Access tokens: compact, HMAC-SHA256-signed bearer tokens under a key kept in the database
//! (so every replica and every restart accepts them), expiring after a configured time.
//!
//! A token only names the user, its directory and the user's token generation; roles are
//! always read from the store. Restoring a deleted user moves its generation on, so a token
//! issued before the deletion never works again.
//!
//! Layout, before base64url (no padding) encoding, 61 bytes in all (82 characters):
//!
//! | bytes | content |
//! |---|---|
//! | 1 | format version, `2` |
//! | 16 | user id (UUID) |
//! | 16 | directory id (UUID) |
//! | 8 | expiry, seconds since the epoch, big-endian |
//! | 4 | the user's token generation, big-endian |
//! | 16 | HMAC-SHA256 over `access-token:v2:` and the 45 bytes above, first 128 bits |
//!
//! Why not a JWT: the token rides in the `authorization` header of every call, twice on the
//! billing path (client to billing, billing to directory), and HPACK never indexes it, so each
//! hop Huffman-codes and decodes it whole. A JWT of the same claims is about 340 characters;
//! this one is 82, and verifying it is one MAC over 61 bytes, with no JSON
//! (docs/decisions/compact-access-tokens.md).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use contract::mac::{TAG_LEN, TagKey};

const VERSION: u8 = 2;
const BODY_LEN: usize = 1 + 16 + 16 + 8 + 4;
const RAW_LEN: usize = BODY_LEN + TAG_LEN;
/// Characters of an encoded token (base64 without padding: 4 per 3 bytes, rounded up).
const ENCODED_LEN: usize = (RAW_LEN * 4).div_ceil(3);
/// Bound into every MAC, so no other token signed under the same key can pass for this one.
const DOMAIN: &[u8] = b"access-token:v2:";

/// Who a valid token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSubject {
    pub user_id: String,
    pub directory_id: String,
    /// The user's token generation when the token was issued (see `User::token_generation`).
    pub generation: u32,
}

/// Issues and verifies access tokens.
#[derive(Clone)]
pub struct Tokens {
    key: TagKey,
    ttl: Duration,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Tokens {
    pub fn new(secret: &[u8], ttl: Duration) -> Self {
        Self {
            key: TagKey::new(secret, DOMAIN),
            ttl,
        }
    }

    /// A token for `subject` issued at `now_micros`, and when it expires (seconds since the
    /// epoch): the TTL counted from the next whole second, so a token lives at least its TTL.
    /// Fails only if an id is not a UUID in its lowercase hyphenated form, which every id this
    /// service creates is (so the id a token carries reads back exactly as stored).
    pub fn issue(&self, subject: &TokenSubject, now_micros: i64) -> anyhow::Result<(String, i64)> {
        let user = canonical_uuid(&subject.user_id)?;
        let directory = canonical_uuid(&subject.directory_id)?;
        let from_secs =
            now_micros.div_euclid(1_000_000) + i64::from(now_micros.rem_euclid(1_000_000) > 0);
        let exp = from_secs.saturating_add(i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX));
        let mut raw = [0u8; RAW_LEN];
        raw[0] = VERSION;
        raw[1..17].copy_from_slice(user.as_bytes());
        raw[17..33].copy_from_slice(directory.as_bytes());
        raw[33..41].copy_from_slice(&exp.to_be_bytes());
        raw[41..45].copy_from_slice(&subject.generation.to_be_bytes());
        let tag = self.key.tag(&raw[..BODY_LEN]);
        raw[BODY_LEN..].copy_from_slice(&tag);
        Ok((URL_SAFE_NO_PAD.encode(raw), exp))
    }

    /// The subject of `token`, if it is ours, intact and unexpired at `now_micros`: a token is
    /// valid strictly before its expiry (the `expire_time` SignIn answered with).
    pub fn verify(&self, token: &str, now_micros: i64) -> Option<TokenSubject> {
        self.verify_with_expiry(token, now_micros)
            .map(|(subject, _)| subject)
    }

    /// [`Tokens::verify`], with the token's expiry in microseconds since the epoch.
    pub fn verify_with_expiry(&self, token: &str, now_micros: i64) -> Option<(TokenSubject, i64)> {
        if token.len() != ENCODED_LEN {
            return None;
        }
        let mut raw = [0u8; RAW_LEN];
        let written = URL_SAFE_NO_PAD
            .decode_slice(token.as_bytes(), &mut raw)
            .ok()?;
        if written != RAW_LEN || raw[0] != VERSION {
            return None;
        }
        if !self.key.verify(&raw[..BODY_LEN], &raw[BODY_LEN..]) {
            return None;
        }
        let exp = i64::from_be_bytes(raw[33..41].try_into().ok()?);
        if now_micros >= exp.saturating_mul(1_000_000) {
            return None;
        }
        let generation = u32::from_be_bytes(raw[41..45].try_into().ok()?);
        let user = uuid::Uuid::from_slice(&raw[1..17]).ok()?;
        let directory = uuid::Uuid::from_slice(&raw[17..33]).ok()?;
        Some((
            TokenSubject {
                user_id: user.to_string(),
                directory_id: directory.to_string(),
                generation,
            },
            exp.saturating_mul(1_000_000),
        ))
    }
}

fn canonical_uuid(id: &str) -> anyhow::Result<uuid::Uuid> {
    let parsed = uuid::Uuid::parse_str(id)?;
    anyhow::ensure!(
        parsed.hyphenated().to_string() == id,
        "not a lowercase hyphenated UUID"
    );
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> TokenSubject {
        TokenSubject {
            user_id: "6f1c2a9e-3b4d-4e5f-8a7b-0c1d2e3f4a5b".into(),
            directory_id: "0a1b2c3d-4e5f-4a6b-9c7d-8e9f0a1b2c3d".into(),
            generation: 7,
        }
    }

    /// A fixed "now" (2023-11-14): the tests need no clock.
    pub(super) fn now() -> i64 {
        1_700_000_000_000_000
    }

    #[test]
    fn issued_tokens_verify_and_foreign_ones_do_not() {
        let tokens = Tokens::new(&[1; 32], Duration::from_secs(60));
        let (token, _) = tokens.issue(&subject(), now()).expect("issue");
        assert_eq!(token.len(), ENCODED_LEN);
        assert_eq!(tokens.verify(&token, now()), Some(subject()));
        let other = Tokens::new(&[2; 32], Duration::from_secs(60));
        assert_eq!(other.verify(&token, now()), None);
        assert_eq!(tokens.verify("not.a.token", now()), None);
        assert_eq!(tokens.verify("", now()), None);
    }

    #[test]
    fn tokens_live_at_least_their_ttl_and_expire_at_their_expire_time() {
        let tokens = Tokens::new(&[1; 32], Duration::from_secs(60));
        // Issued on a whole second: exactly the TTL.
        let (token, exp) = tokens.issue(&subject(), 1_000_000_000).expect("issue");
        assert_eq!(exp, 1_060);
        assert_eq!(tokens.verify(&token, 1_059_999_999), Some(subject()));
        assert_eq!(tokens.verify(&token, 1_060_000_000), None);
        // Issued just before a second ends: counted from the next one, never less than the TTL.
        let (token, exp) = tokens.issue(&subject(), 999_999_999).expect("issue");
        assert_eq!(exp, 1_060);
        assert_eq!(tokens.verify(&token, 1_059_999_999), Some(subject()));
        let (token, exp) = tokens.issue(&subject(), 1_000_000_001).expect("issue");
        assert_eq!(exp, 1_061);
        assert_eq!(tokens.verify(&token, 1_060_000_001), Some(subject()));
        assert_eq!(tokens.verify(&token, 1_061_000_000), None);
        let (old, _) = tokens
            .issue(&subject(), now() - 3_600_000_000)
            .expect("issue");
        assert_eq!(tokens.verify(&old, now()), None);
    }

    #[test]
    fn tokens_carry_the_generation_they_were_issued_for() {
        let tokens = Tokens::new(&[1; 32], Duration::from_secs(60));
        let next = TokenSubject {
            generation: 8,
            ..subject()
        };
        let (old, _) = tokens.issue(&subject(), now()).expect("issue");
        let (new, _) = tokens.issue(&next, now()).expect("issue");
        assert_eq!(tokens.verify(&old, now()).map(|s| s.generation), Some(7));
        assert_eq!(tokens.verify(&new, now()).map(|s| s.generation), Some(8));
    }

    #[test]
    fn every_changed_byte_is_refused() {
        let tokens = Tokens::new(&[1; 32], Duration::from_secs(60));
        let (token, _) = tokens.issue(&subject(), now()).expect("issue");
        let mut raw = URL_SAFE_NO_PAD.decode(&token).expect("base64");
        for i in 0..raw.len() {
            for bit in [0x01, 0x80] {
                raw[i] ^= bit;
                let forged = URL_SAFE_NO_PAD.encode(&raw);
                assert_eq!(tokens.verify(&forged, now()), None, "byte {i} bit {bit:#x}");
                raw[i] ^= bit;
            }
        }
        // A longer expiry with the old tag: the MAC covers the expiry.
        raw[33..41].copy_from_slice(&i64::MAX.to_be_bytes());
        assert_eq!(tokens.verify(&URL_SAFE_NO_PAD.encode(&raw), now()), None);
        // Cut short or extended.
        assert_eq!(tokens.verify(&token[..ENCODED_LEN - 1], now()), None);
        assert_eq!(tokens.verify(&format!("{token}A"), now()), None);
    }

    #[test]
    fn jwts_are_refused_even_unsigned() {
        let b64 = URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(
            format!(
                r#"{{"iss":"directory-svc","sub":"u","tid":"d","iat":0,"exp":{}}}"#,
                now() / 1_000_000 + 600
            )
            .as_bytes(),
        );
        let tokens = Tokens::new(&[1; 32], Duration::from_secs(60));
        assert_eq!(tokens.verify(&format!("{header}.{body}."), now()), None);
    }

    #[test]
    fn ids_that_are_not_canonical_uuids_are_not_issued() {
        let tokens = Tokens::new(&[1; 32], Duration::from_secs(60));
        let good = subject();
        for (user_id, directory_id) in [
            ("u".to_owned(), good.directory_id.clone()),
            (good.user_id.clone(), "d".to_owned()),
            (good.user_id.to_uppercase(), good.directory_id.clone()),
            (good.user_id.replace('-', ""), good.directory_id.clone()),
            (format!("{{{}}}", good.user_id), good.directory_id.clone()),
        ] {
            let subject = TokenSubject {
                user_id,
                directory_id,
                generation: 0,
            };
            assert!(tokens.issue(&subject, now()).is_err(), "{subject:?}");
        }
    }

    /// Bodies the verifier must refuse even under a genuine tag of this key: it checks more
    /// than the MAC.
    #[test]
    fn only_version_2_is_accepted() {
        let tokens = Tokens::new(&[1; 32], Duration::from_secs(60));
        let (token, _) = tokens.issue(&subject(), now()).expect("issue");
        let mut raw = URL_SAFE_NO_PAD.decode(&token).expect("base64");
        raw[0] = 1;
        let tag = tokens.key.tag(&raw[..BODY_LEN]);
        raw[BODY_LEN..].copy_from_slice(&tag);
        assert_eq!(tokens.verify(&URL_SAFE_NO_PAD.encode(&raw), now()), None);
    }

    #[test]
    fn a_zero_tag_is_refused_whatever_the_expiry() {
        let tokens = Tokens::new(&[0; 32], Duration::from_secs(60));
        let mut raw = [0u8; RAW_LEN];
        raw[0] = VERSION;
        raw[33..41].copy_from_slice(&i64::MAX.to_be_bytes());
        assert_eq!(tokens.verify(&URL_SAFE_NO_PAD.encode(raw), now()), None);
    }
}

/// Property test: the token verifier takes any input without panicking and accepts nothing
/// it did not sign.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_tokens_are_refused(
            raw in any::<String>(),
            bytes in proptest::collection::vec(any::<u8>(), RAW_LEN),
            parts in proptest::collection::vec("[A-Za-z0-9_-]{0,40}", 3),
        ) {
            let tokens = Tokens::new(&[3; 32], Duration::from_secs(60));
            prop_assert_eq!(tokens.verify(&raw, tests::now()), None);
            prop_assert_eq!(tokens.verify(&parts.join("."), tests::now()), None);
            // Well-formed length and alphabet, random content (a version byte of 1 included
            // one time in 256): the tag still has to match.
            prop_assert_eq!(tokens.verify(&URL_SAFE_NO_PAD.encode(&bytes), tests::now()), None);
        }
    }
}
