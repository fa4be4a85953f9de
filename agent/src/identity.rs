//! The agent's own key. It signs every report the agent publishes on its topics (presence,
//! heartbeats, events), so the control plane believes a report only from the key the agent
//! registered with, whoever else the broker lets publish there.
//!
//! The key is `DATA_DIR/identity.key` (0600, with `identity.pub` beside it), made on first
//! start and never replaced: a device whose data directory is wiped comes back with a new
//! key, which the control plane refuses until an admin accepts it (`flotilla agents accept`).

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use flotilla_shared::wire::SignedReport;
use flotilla_shared::{PublicKey, SecretKey};
use tracing::info;

use crate::keyfile;

/// File name (without `.key` / `.pub`) of the identity key in the data directory.
pub const IDENTITY_KEY_NAME: &str = "identity";

/// The agent's signing key; clones share it.
#[derive(Clone)]
pub struct Identity {
    key: Arc<SecretKey>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("key_id", &self.public().id())
            .finish()
    }
}

impl Identity {
    /// Wraps a key.
    pub fn new(key: SecretKey) -> Self {
        Self { key: Arc::new(key) }
    }

    /// The identity key in `data_dir`, made on first start.
    pub fn load_or_create(data_dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(data_dir)
            .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
        let (key, made) = keyfile::load_or_generate(IDENTITY_KEY_NAME, data_dir)?;
        if let Some(pair) = made {
            info!(
                public = %pair.public.display(),
                key_id = pair.id,
                "generated this agent's identity key; the control plane registers it on the first birth"
            );
        }
        Ok(Self::new(key))
    }

    /// The public half, announced in every birth.
    pub fn public(&self) -> PublicKey {
        self.key.public()
    }

    /// Wire bytes for an encoded envelope published on `topic`.
    pub fn seal(&self, topic: &str, envelope: Vec<u8>) -> Vec<u8> {
        SignedReport::seal(topic, envelope, &self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = Identity::load_or_create(dir.path()).unwrap();
        let again = Identity::load_or_create(dir.path()).unwrap();
        assert_eq!(first.public(), again.public());
        assert!(dir.path().join("identity.pub").exists());
    }
}
