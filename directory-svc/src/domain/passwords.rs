//! Password hashing with argon2id, off the async runtime.

use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
use argon2::{Algorithm, Argon2, Params, Version};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;

use super::error::{Error, Result};
use super::types::Password;

/// argon2id cost. The default is OWASP's recommendation (19 MiB, 2 iterations, 1 lane).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Cost {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for Argon2Cost {
    fn default() -> Self {
        Self {
            memory_kib: 19_456,
            iterations: 2,
            parallelism: 1,
        }
    }
}

/// How long a call waits for a hashing slot before it is refused as overloaded.
const SLOT_WAIT: Duration = Duration::from_secs(5);

/// Hashes new passwords and checks typed ones. At most one hash per CPU runs at a time, so a
/// flood of sign-ins queues (and is shed) instead of taking memory without bound.
#[derive(Clone)]
pub struct Passwords {
    argon: Argon2<'static>,
    slots: Arc<Semaphore>,
    /// A hash of nothing anyone knows, checked when the UPN is unknown so that an unknown user
    /// costs as much time as a wrong password.
    decoy: String,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Passwords { .. }")
    }
}

impl Passwords {
    pub fn new(cost: Argon2Cost) -> anyhow::Result<Self> {
        let params = Params::new(cost.memory_kib, cost.iterations, cost.parallelism, None)
            .map_err(|e| anyhow::anyhow!("invalid argon2 cost: {e}"))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let mut noise = [0u8; 32];
        getrandom::fill(&mut noise).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
        let decoy = argon
            .hash_password(&noise)
            .map_err(|e| anyhow::anyhow!("cannot hash: {e}"))?
            .to_string();
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        Ok(Self {
            argon,
            slots: Arc::new(Semaphore::new(cpus)),
            decoy,
        })
    }

    /// Runs one argon2 computation on the blocking pool, holding a hashing slot.
    async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(Argon2<'static>) -> T + Send + 'static,
    ) -> Result<T> {
        let permit = tokio::time::timeout(SLOT_WAIT, self.slots.clone().acquire_owned())
            .await
            .map_err(|_| Error::Overloaded)?
            .map_err(|e| Error::Internal(anyhow::Error::new(e).context("hashing slots closed")))?;
        let argon = self.argon.clone();
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            job(argon)
        })
        .await
        .map_err(|e| Error::Internal(anyhow::Error::new(e).context("hashing task")))
    }

    /// The PHC string of `password`.
    pub async fn hash(&self, password: Password) -> Result<String> {
        self.run(move |argon| {
            argon
                .hash_password(password.expose())
                .map(|h| h.to_string())
                .map_err(|e| Error::Internal(anyhow::anyhow!("argon2: {e}")))
        })
        .await?
    }

    /// Whether `password` matches `stored`; with no stored hash, spends the same time and
    /// answers false.
    pub async fn verify(&self, password: Password, stored: Option<String>) -> Result<bool> {
        let known = stored.is_some();
        let phc = stored.unwrap_or_else(|| self.decoy.clone());
        self.run(move |argon| {
            let Ok(hash) = PasswordHash::new(&phc) else {
                return false;
            };
            argon.verify_password(password.expose(), &hash).is_ok() && known
        })
        .await
    }
}
