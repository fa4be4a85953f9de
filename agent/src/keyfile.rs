//! Key files on disk: `NAME.key` (PKCS#8 PEM, mode 0600) and `NAME.pub` (SPKI PEM).

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use flotilla_shared::{PublicKey, SecretKey};

/// Paths written by [`generate`].
#[derive(Debug, Clone)]
pub struct KeyPair {
    /// Secret key file.
    pub secret: PathBuf,
    /// Public key file.
    pub public: PathBuf,
    /// Key id of the new key.
    pub id: String,
}

/// Creates a fresh key pair as `DIR/NAME.key` and `DIR/NAME.pub`; never overwrites either.
pub fn generate(name: &str, dir: &Path) -> Result<KeyPair> {
    let valid_name = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !valid_name || name.starts_with('.') {
        bail!("key name {name:?} must be letters, digits, '-', '_' or '.'");
    }
    fs::create_dir_all(dir)
        .with_context(|| format!("cannot create key directory {}", dir.display()))?;

    write_pair(name, dir, &SecretKey::from_seed(random_seed()?))
}

/// Writes `key` as `DIR/NAME.key` (0600) and `DIR/NAME.pub`; never overwrites either.
pub fn write_pair(name: &str, dir: &Path, key: &SecretKey) -> Result<KeyPair> {
    let secret_path = dir.join(format!("{name}.key"));
    let public_path = dir.join(format!("{name}.pub"));
    for path in [&secret_path, &public_path] {
        if path.exists() {
            bail!(
                "{} already exists; refusing to overwrite a key",
                path.display()
            );
        }
    }

    write_new(&secret_path, key.to_pem()?.as_bytes(), 0o600)?;
    write_new(&public_path, key.public().to_pem()?.as_bytes(), 0o644)?;
    Ok(KeyPair {
        secret: secret_path,
        public: public_path,
        id: key.public().id().0.to_hex(),
    })
}

/// The secret key `DIR/NAME.key`, made with its `.pub` on first use (the pair is returned
/// then, for the caller to announce).
pub fn load_or_generate(name: &str, dir: &Path) -> Result<(SecretKey, Option<KeyPair>)> {
    let path = dir.join(format!("{name}.key"));
    let made = if path.exists() {
        None
    } else {
        Some(generate(name, dir)?)
    };
    Ok((load_secret(&path)?, made))
}

/// 32 bytes from the operating system's random source.
pub fn random_seed() -> Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed)
        .map_err(|e| anyhow::anyhow!("cannot read the system random source: {e}"))?;
    Ok(seed)
}

/// Writes a file that must not exist yet, with `mode` set at creation (never world-readable in
/// between, for secret keys).
pub fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(contents)
        .with_context(|| format!("cannot write {}", path.display()))?;
    file.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))?;
    Ok(())
}

/// Reads a secret key file.
pub fn load_secret(path: &Path) -> Result<SecretKey> {
    let pem = fs::read_to_string(path)
        .with_context(|| format!("cannot read secret key {}", path.display()))?;
    SecretKey::from_pem(&pem).with_context(|| format!("bad secret key {}", path.display()))
}

/// Reads a public key file.
pub fn load_public(path: &Path) -> Result<PublicKey> {
    let pem = fs::read_to_string(path)
        .with_context(|| format!("cannot read public key {}", path.display()))?;
    PublicKey::from_pem(&pem).with_context(|| format!("bad public key {}", path.display()))
}

/// Writes `contents` to `path` atomically: a temporary sibling, fsync, rename.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
    tmp.write_all(contents)
        .with_context(|| format!("cannot write {}", path.display()))?;
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))?;
    tmp.persist(path)
        .with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_load_back_and_secret_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let pair = generate("release", dir.path()).unwrap();
        let secret = load_secret(&pair.secret).unwrap();
        let public = load_public(&pair.public).unwrap();
        assert_eq!(secret.public(), public);
        assert_eq!(public.id().0.to_hex(), pair.id);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&pair.secret).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }

    #[test]
    fn keygen_refuses_to_overwrite_and_bad_names() {
        let dir = tempfile::tempdir().unwrap();
        generate("a", dir.path()).unwrap();
        let err = generate("a", dir.path()).unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        assert!(generate("../evil", dir.path()).is_err());
    }

    #[test]
    fn loading_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.pub");
        let err = format!("{:#}", load_public(&path).unwrap_err());
        assert!(err.contains("nope.pub"), "{err}");
        fs::write(&path, "not a key").unwrap();
        let err = format!("{:#}", load_public(&path).unwrap_err());
        assert!(
            err.contains("bad public key") && err.contains("nope.pub"),
            "{err}"
        );
    }
}
