//! Signed manifests. A manifest names every compiled file by sha256, so a signature over the
//! manifest's bytes covers the whole build. Keys are ed25519: a secret key file (mode 0600)
//! and its public key file beside it (`<path>.pub`); the signature is `manifest.toml.sig`
//! beside the manifest. A runner given public keys runs only manifests one of them signed.

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

/// A colon-separated list of public key files a runner trusts, besides its `--trust` flags.
pub const TRUST_ENV: &str = "CAPSULE_TRUST";
/// What a signature file's name adds to its manifest's.
pub const SIGNATURE_SUFFIX: &str = ".sig";

const SECRET_TAG: &str = "capsule-secret-key ed25519";
const PUBLIC_TAG: &str = "capsule-public-key ed25519";
/// Signed before the manifest's bytes, so a signature made for anything else never passes.
const CONTEXT: &[u8] = b"capsule manifest signature v1\n";
const SIGNATURE_VERSION: u32 = 1;

#[derive(Debug, Error)]
pub enum TrustError {
    #[error("`{manifest}` is not signed: there is no `{}`", signature.display())]
    Unsigned { manifest: String, signature: PathBuf },
    #[error("`{manifest}` is signed by key {key}, which this runner does not trust")]
    UnknownKey { manifest: String, key: String },
    #[error(
        "the signature of `{manifest}` does not match it: the manifest was altered after signing, or the signature is forged"
    )]
    BadSignature { manifest: String },
    #[error("`{}` is not a Capsule signature: {why}", path.display())]
    MalformedSignature { path: PathBuf, why: String },
    #[error("key file `{}`: {why}", path.display())]
    Key { path: PathBuf, why: String },
}

impl manifest_schema::Explain for TrustError {
    fn category(&self) -> manifest_schema::Category {
        match self {
            Self::Key { .. } => manifest_schema::Category::Usage,
            _ => manifest_schema::Category::Load,
        }
    }

    fn hint(&self) -> Option<String> {
        match self {
            Self::Unsigned { .. } => {
                Some("sign it with `capsule build FILE --sign KEY`, and trust that key with <<trust>>".into())
            }
            Self::UnknownKey { .. } => Some(format!(
                "trust that key's `.pub` file with <<trust>> (or `{TRUST_ENV}`) if you trust who holds it"
            )),
            Self::BadSignature { .. } => {
                Some("rebuild and sign it again; never run a manifest whose signature fails".into())
            }
            Self::MalformedSignature { .. } => None,
            Self::Key { .. } => Some("make a key pair with `capsule keygen PATH`".into()),
        }
    }
}

fn key_error(path: &Path, why: impl Into<String>) -> TrustError {
    TrustError::Key { path: path.to_path_buf(), why: why.into() }
}

/// An ed25519 public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

impl PublicKey {
    /// A short name for the key: the first 16 hex digits of its sha256.
    pub fn id(&self) -> String {
        hex::encode(&Sha256::digest(self.0)[..8])
    }

    fn from_base64(text: &str) -> Option<Self> {
        BASE64.decode(text.trim()).ok()?.try_into().ok().map(Self)
    }

    /// The key in a public key file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or_default();
        let encoded = line
            .strip_prefix(PUBLIC_TAG)
            .and_then(|rest| rest.split_whitespace().next())
            .ok_or(format!("it does not start with `{PUBLIC_TAG}`"))?;
        Self::from_base64(encoded).ok_or_else(|| "its key is not 32 bytes of base64".to_string())
    }

    pub fn read(path: &Path) -> Result<Self, TrustError> {
        let text = std::fs::read_to_string(path).map_err(|e| key_error(path, e.to_string()))?;
        Self::parse(&text).map_err(|why| key_error(path, why))
    }

    /// The text of a public key file.
    pub fn to_text(&self) -> String {
        format!("{PUBLIC_TAG} {} {}\n", BASE64.encode(self.0), self.id())
    }

    fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, self.0).verify(message, signature).is_ok()
    }
}

/// An ed25519 key pair that signs manifests.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    pkcs8: Vec<u8>,
}

impl SigningKey {
    pub fn generate() -> Self {
        let random = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&random).expect("the system's random source works");
        let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).expect("a key ring just made");
        Self { pair, pkcs8: pkcs8.as_ref().to_vec() }
    }

    /// Reads a secret key file; refused when others may read it.
    pub fn read(path: &Path) -> Result<Self, TrustError> {
        let file = std::fs::File::open(path).map_err(|e| key_error(path, e.to_string()))?;
        let mode = file.metadata().map_err(|e| key_error(path, e.to_string()))?.mode();
        if mode & 0o077 != 0 {
            return Err(key_error(
                path,
                format!("its mode is {:o}: a secret key must be readable by its owner only (chmod 600)", mode & 0o777),
            ));
        }
        let text = std::io::read_to_string(file).map_err(|e| key_error(path, e.to_string()))?;
        let encoded = text
            .trim()
            .strip_prefix(SECRET_TAG)
            .ok_or_else(|| key_error(path, format!("it does not start with `{SECRET_TAG}`")))?;
        let pkcs8 = BASE64.decode(encoded.trim()).map_err(|e| key_error(path, format!("not base64: {e}")))?;
        let pair =
            Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| key_error(path, format!("not an ed25519 key: {e}")))?;
        Ok(Self { pair, pkcs8 })
    }

    /// Writes the secret key at `path` (mode 0600, never over an existing file) and the
    /// public key at `<path>.pub`.
    pub fn write(&self, path: &Path) -> Result<PathBuf, TrustError> {
        use std::io::Write;
        let public = public_key_path(path);
        let secret = format!("{SECRET_TAG} {}\n", BASE64.encode(&self.pkcs8));
        std::fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .and_then(|mut file| file.write_all(secret.as_bytes()))
            .map_err(|e| key_error(path, e.to_string()))?;
        std::fs::write(&public, self.public().to_text()).map_err(|e| key_error(&public, e.to_string()))?;
        Ok(public)
    }

    pub fn public(&self) -> PublicKey {
        PublicKey(self.pair.public_key().as_ref().try_into().expect("ed25519 public keys are 32 bytes"))
    }

    /// The signature file's text for the manifest `bytes`.
    pub fn sign(&self, manifest: &[u8]) -> String {
        let signature = self.pair.sign(&signed_message(manifest));
        let file = SignatureFile {
            schema_version: SIGNATURE_VERSION,
            algorithm: "ed25519".into(),
            key: BASE64.encode(self.public().0),
            signature: BASE64.encode(signature.as_ref()),
        };
        toml::to_string(&file).expect("signatures serialise")
    }
}

/// `<path>.pub`.
pub fn public_key_path(secret: &Path) -> PathBuf {
    let mut name = secret.as_os_str().to_owned();
    name.push(".pub");
    PathBuf::from(name)
}

/// `<manifest>.sig`.
pub fn signature_path(manifest: &Path) -> PathBuf {
    let mut name = manifest.as_os_str().to_owned();
    name.push(SIGNATURE_SUFFIX);
    PathBuf::from(name)
}

fn signed_message(manifest: &[u8]) -> Vec<u8> {
    [CONTEXT, manifest].concat()
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SignatureFile {
    schema_version: u32,
    algorithm: String,
    /// The signer's public key, base64.
    key: String,
    /// base64 of the ed25519 signature of the context line followed by the manifest's bytes.
    signature: String,
}

/// The public keys a runner trusts.
#[derive(Debug, Clone, Default)]
pub struct Trust {
    keys: Vec<PublicKey>,
}

impl Trust {
    pub fn new(keys: Vec<PublicKey>) -> Self {
        Self { keys }
    }

    /// The keys of the public key files `paths` and of those `CAPSULE_TRUST` lists; `None`
    /// when there are none (the runner then requires no signature).
    pub fn from_files_and_env(paths: &[PathBuf]) -> Result<Option<Self>, TrustError> {
        let from_env = std::env::var_os(TRUST_ENV).unwrap_or_default();
        let listed = std::env::split_paths(&from_env).filter(|p| !p.as_os_str().is_empty());
        let keys =
            paths.iter().cloned().chain(listed).map(|path| PublicKey::read(&path)).collect::<Result<Vec<_>, _>>()?;
        Ok((!keys.is_empty()).then_some(Self { keys }))
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// Checks that `signature` (the text of the signature file at `signature_path`, `None`
    /// when there is none) is a trusted key's signature of the manifest `bytes`; gives the key.
    pub fn verify(
        &self,
        shown: &str,
        bytes: &[u8],
        signature: Option<&str>,
        signature_path: &Path,
    ) -> Result<&PublicKey, TrustError> {
        let Some(text) = signature else {
            return Err(TrustError::Unsigned { manifest: shown.into(), signature: signature_path.to_path_buf() });
        };
        let malformed = |why: String| TrustError::MalformedSignature { path: signature_path.to_path_buf(), why };
        let file: SignatureFile = toml::from_str(text).map_err(|e| malformed(e.to_string()))?;
        if file.schema_version != SIGNATURE_VERSION || file.algorithm != "ed25519" {
            return Err(malformed(format!(
                "version {} of algorithm `{}`; this runner reads version {SIGNATURE_VERSION} of `ed25519`",
                file.schema_version, file.algorithm
            )));
        }
        let key =
            PublicKey::from_base64(&file.key).ok_or_else(|| malformed("`key` is not 32 bytes of base64".into()))?;
        let signature = BASE64.decode(&file.signature).map_err(|e| malformed(format!("`signature`: {e}")))?;
        let trusted = self
            .keys
            .iter()
            .find(|k| **k == key)
            .ok_or_else(|| TrustError::UnknownKey { manifest: shown.into(), key: key.id() })?;
        if !trusted.verifies(&signed_message(bytes), &signature) {
            return Err(TrustError::BadSignature { manifest: shown.into() });
        }
        Ok(trusted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MANIFEST: &[u8] = b"schema_version = 3\n";

    fn check(trust: &Trust, bytes: &[u8], signature: Option<&str>) -> Result<String, TrustError> {
        trust.verify("manifest.toml", bytes, signature, Path::new("manifest.toml.sig")).map(PublicKey::id)
    }

    #[test]
    fn only_a_trusted_keys_signature_of_these_exact_bytes_passes() {
        let (key, other) = (SigningKey::generate(), SigningKey::generate());
        let trust = Trust::new(vec![key.public()]);
        let signature = key.sign(MANIFEST);
        assert_eq!(check(&trust, MANIFEST, Some(&signature)).unwrap(), key.public().id());
        assert!(matches!(check(&trust, MANIFEST, None), Err(TrustError::Unsigned { .. })));
        assert!(matches!(
            check(&trust, b"schema_version = 4\n", Some(&signature)),
            Err(TrustError::BadSignature { .. })
        ));
        let foreign = other.sign(MANIFEST);
        assert!(matches!(check(&trust, MANIFEST, Some(&foreign)), Err(TrustError::UnknownKey { .. })));
        // The other key's signature, relabelled with the trusted key, fails the check.
        let relabelled = foreign.replace(&BASE64.encode(other.public().0), &BASE64.encode(key.public().0));
        assert!(matches!(check(&trust, MANIFEST, Some(&relabelled)), Err(TrustError::BadSignature { .. })));
        for garbage in ["", "signature = 1", "schema_version = 2\nalgorithm = \"rsa\"\nkey = \"\"\nsignature = \"\""] {
            assert!(
                matches!(check(&trust, MANIFEST, Some(garbage)), Err(TrustError::MalformedSignature { .. })),
                "{garbage}"
            );
        }
    }

    #[test]
    fn keys_round_trip_through_their_files_and_secret_keys_stay_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("release");
        let key = SigningKey::generate();
        let public = key.write(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        assert_eq!(PublicKey::read(&public).unwrap(), key.public());
        assert_eq!(SigningKey::read(&path).unwrap().public(), key.public());
        assert!(key.write(&path).is_err(), "an existing key is never overwritten");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = SigningKey::read(&path).err().unwrap().to_string();
        assert!(error.contains("readable by its owner only"), "{error}");
        assert!(PublicKey::parse("ssh-ed25519 AAAA").unwrap_err().contains("capsule-public-key"));
    }

    /// Fuzz target: a damaged signature file is refused with an error, never a panic, and
    /// passes only when it still holds the same key and signature.
    #[test]
    fn fuzzed_signature_files_never_panic_and_pass_only_intact() {
        let key = SigningKey::generate();
        let trust = Trust::new(vec![key.public()]);
        let valid = key.sign(MANIFEST);
        let original: SignatureFile = toml::from_str(&valid).unwrap();
        bolero::check!().with_iterations(fixtures::fuzz_iterations()).for_each(|noise: &[u8]| {
            let damaged = fixtures::mutate(&valid, noise);
            if check(&trust, MANIFEST, Some(&damaged)).is_ok() {
                // Only another spelling of the same TOML may pass.
                let parsed: SignatureFile = toml::from_str(&damaged).unwrap();
                assert_eq!(BASE64.decode(parsed.signature).unwrap(), BASE64.decode(&original.signature).unwrap());
            }
        });
    }
}
