//! Access tokens: HS256 JWTs signed with a key kept in the database (so every replica and
//! every restart accepts them), expiring after a configured time.
//!
//! A token only names the user and directory; roles are always read from the store.

use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

const ISSUER: &str = "directory-svc";

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    iss: String,
    /// User id.
    sub: String,
    /// Directory (tenant) id.
    tid: String,
    iat: i64,
    exp: i64,
    jti: String,
}

/// Who a valid token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSubject {
    pub user_id: String,
    pub directory_id: String,
}

/// Issues and verifies access tokens.
#[derive(Clone)]
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
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
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "iss", "sub"]);
        Self {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
            validation,
            ttl,
        }
    }

    /// A token for `subject`, and when it expires (seconds since the epoch).
    pub fn issue(&self, subject: &TokenSubject, now_secs: i64) -> anyhow::Result<(String, i64)> {
        let exp = now_secs.saturating_add(i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX));
        let claims = Claims {
            iss: ISSUER.to_owned(),
            sub: subject.user_id.clone(),
            tid: subject.directory_id.clone(),
            iat: now_secs,
            exp,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.encoding)?;
        Ok((token, exp))
    }

    /// The subject of `token`, if it is ours, intact and unexpired.
    pub fn verify(&self, token: &str) -> Option<TokenSubject> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).ok()?;
        Some(TokenSubject {
            user_id: data.claims.sub,
            directory_id: data.claims.tid,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subject() -> TokenSubject {
        TokenSubject {
            user_id: "u".into(),
            directory_id: "d".into(),
        }
    }

    fn now() -> i64 {
        contract::time::now_micros() / 1_000_000
    }

    #[test]
    fn issued_tokens_verify_and_foreign_ones_do_not() {
        let tokens = Tokens::new(&[1; 32], Duration::from_secs(60));
        let (token, _) = tokens.issue(&subject(), now()).expect("issue");
        assert_eq!(tokens.verify(&token), Some(subject()));
        let other = Tokens::new(&[2; 32], Duration::from_secs(60));
        assert_eq!(other.verify(&token), None);
        assert_eq!(tokens.verify("not.a.token"), None);
    }

    #[test]
    fn expired_tokens_are_refused() {
        let tokens = Tokens::new(&[1; 32], Duration::from_secs(60));
        let (token, _) = tokens.issue(&subject(), now() - 3600).expect("issue");
        assert_eq!(tokens.verify(&token), None);
    }

    #[test]
    fn unsigned_tokens_are_refused() {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header = b64.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64.encode(
            format!(
                r#"{{"iss":"directory-svc","sub":"u","tid":"d","iat":0,"exp":{}}}"#,
                now() + 600
            )
            .as_bytes(),
        );
        let tokens = Tokens::new(&[1; 32], Duration::from_secs(60));
        assert_eq!(tokens.verify(&format!("{header}.{body}.")), None);
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
        fn arbitrary_tokens_are_refused(raw in any::<String>(), parts in proptest::collection::vec("[A-Za-z0-9_-]{0,40}", 3)) {
            let tokens = Tokens::new(&[3; 32], Duration::from_secs(60));
            prop_assert_eq!(tokens.verify(&raw), None);
            prop_assert_eq!(tokens.verify(&parts.join(".")), None);
        }
    }
}
