//! Tags that make a token tamper-evident: HMAC-SHA256 under a service's secret, bound to a
//! domain (what kind of token it is), truncated to 128 bits. Page tokens and access tokens
//! both use it, each with its own secret and domain, so neither can pass for the other.

use hmac::{KeyInit, Mac};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Bytes of a tag: 128 bits (forging one is a 2^-128 guess per attempt).
pub const TAG_LEN: usize = 16;

/// A secret keyed once for one domain; each tag clones the keyed state.
#[derive(Clone)]
pub struct TagKey {
    keyed: HmacSha256,
}

impl std::fmt::Debug for TagKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TagKey { .. }")
    }
}

impl TagKey {
    /// `secret` should be at least 32 random bytes; `domain` names the kind of token (e.g.
    /// `b"page-token:v1:"`) and is absorbed before every body.
    pub fn new(secret: &[u8], domain: &[u8]) -> Self {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut keyed = <HmacSha256 as KeyInit>::new_from_slice(secret)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        keyed.update(domain);
        Self { keyed }
    }

    fn mac(&self, body: &[u8]) -> HmacSha256 {
        let mut mac = self.keyed.clone();
        mac.update(body);
        mac
    }

    /// The tag of `body`.
    pub fn tag(&self, body: &[u8]) -> [u8; TAG_LEN] {
        let full = self.mac(body).finalize().into_bytes();
        let mut tag = [0; TAG_LEN];
        tag.copy_from_slice(&full[..TAG_LEN]);
        tag
    }

    /// Whether `tag` is the tag of `body`, compared in constant time. A tag of any other
    /// length is refused.
    pub fn verify(&self, body: &[u8], tag: &[u8]) -> bool {
        tag.len() == TAG_LEN && self.mac(body).verify_truncated_left(tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_verify_only_for_their_body_key_and_domain() {
        let key = TagKey::new(&[7; 32], b"a:");
        let tag = key.tag(b"body");
        assert!(key.verify(b"body", &tag));
        assert!(!key.verify(b"bodY", &tag));
        assert!(!TagKey::new(&[8; 32], b"a:").verify(b"body", &tag));
        assert!(!TagKey::new(&[7; 32], b"b:").verify(b"body", &tag));
        let mut flipped = tag;
        flipped[TAG_LEN - 1] ^= 1;
        assert!(!key.verify(b"body", &flipped));
        assert!(!key.verify(b"body", &tag[..TAG_LEN - 1]));
        assert!(!key.verify(b"body", &[]));
    }

    #[test]
    fn the_domain_is_a_prefix_of_what_is_tagged() {
        // Keying once with the domain absorbed gives the MAC of domain || body: tokens issued
        // before the keyed state was kept still verify.
        let mut direct = <HmacSha256 as KeyInit>::new_from_slice(&[7; 32]).expect("key");
        direct.update(b"page-token:v1:body");
        let expected = direct.finalize().into_bytes();
        assert_eq!(
            TagKey::new(&[7; 32], b"page-token:v1:").tag(b"body")[..],
            expected[..TAG_LEN]
        );
    }
}
