//! Manifests and artifacts in the cluster's object store, named by their sha256: put once by
//! whoever submits a project, fetched, checked and cached by each worker that runs it.

use std::path::{Path, PathBuf};

use async_nats::jetstream::object_store::ObjectStore;
use manifest_schema::Manifest;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::message::is_sha256;
use crate::{ClusterError, nats};

/// The largest manifest a worker reads.
const MAX_MANIFEST_BYTES: u64 = 4 << 20;
/// The largest signature a worker reads.
const MAX_SIGNATURE_BYTES: u64 = 4 << 10;

/// The object holding the signature of the manifest `sha256`, when it was signed.
fn signature_object(sha256: &str) -> String {
    format!("{sha256}.sig")
}

/// The folder of a worker's cache holding each compiled file once, by name, whichever
/// projects name it: the runtime's code is the same file for every project on a runtime.
const SHARED_FILES: &str = "compiled";

/// A name beside `path` for writing before renaming into place, unique to this process and call.
fn partial(path: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    path.with_extension(format!("partial-{}-{n}", std::process::id()))
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ClusterError + '_ {
    move |source| ClusterError::Io { path: path.to_path_buf(), source }
}

/// Puts the manifest at `path`, its signature (`manifest.toml.sig`, when there is one) and its
/// compiled files in `store` unless they are there; returns the manifest's sha256.
pub async fn publish_project(store: &ObjectStore, path: &Path) -> Result<String, ClusterError> {
    let text = tokio::fs::read(path).await.map_err(io(path))?;
    let manifest_sha256 = hex::encode(Sha256::digest(&text));
    let manifest = Manifest::from_toml(&String::from_utf8_lossy(&text), &path.display().to_string())
        .map_err(|e| ClusterError::BadManifest { sha256: manifest_sha256.clone(), message: e.to_string() })?;
    // The compiled files first: a manifest in the store always has its files there too.
    let dir = path.parent().unwrap_or(Path::new("."));
    for (file, sha256) in compiled_files(&manifest) {
        if store.info(sha256).await.is_err() {
            let path = dir.join(file);
            let mut file = tokio::fs::File::open(&path).await.map_err(io(&path))?;
            store.put(sha256, &mut file).await.map_err(|e| nats("artifact upload")(&e))?;
        }
    }
    // The signature before the manifest: a worker that finds the manifest finds it too.
    let signature_path = capsule_exec::trust::signature_path(path);
    if let Ok(signature) = tokio::fs::read(&signature_path).await {
        let name = signature_object(&manifest_sha256);
        let stored = match store.get(&name).await {
            Ok(mut object) => {
                let mut bytes = Vec::new();
                object.read_to_end(&mut bytes).await.ok().map(|_| bytes)
            }
            Err(_) => None,
        };
        // A signature by another key (or a new one) replaces the stored one.
        if stored.as_deref() != Some(signature.as_slice()) {
            store.put(name.as_str(), &mut signature.as_slice()).await.map_err(|e| nats("signature upload")(&e))?;
        }
    }
    if store.info(&manifest_sha256).await.is_err() {
        store.put(manifest_sha256.as_str(), &mut text.as_slice()).await.map_err(|e| nats("manifest upload")(&e))?;
    }
    Ok(manifest_sha256)
}

/// The manifest `sha256` and its compiled files, in `cache/<sha256>/` (each file fetched and
/// checked once into the shared folder, unless already there, and linked), and its
/// signature (fetched again each time, when `signed`: it may have been signed since);
/// returns the manifest's path there, ready for `Engine::load`, which checks the signature
/// and the hashes before it uses anything.
pub async fn fetch_project(
    store: &ObjectStore,
    cache: &Path,
    sha256: &str,
    signed: bool,
) -> Result<PathBuf, ClusterError> {
    debug_assert!(is_sha256(sha256), "checked when the message was parsed");
    let dir = cache.join(sha256);
    let manifest_path = dir.join("manifest.toml");
    if tokio::fs::try_exists(&manifest_path).await.unwrap_or(false) {
        if signed {
            fetch_signature(store, sha256, &manifest_path).await?;
        }
        return Ok(manifest_path);
    }
    for folder in [dir.clone(), cache.join(SHARED_FILES)] {
        tokio::fs::create_dir_all(&folder).await.map_err(io(&folder))?;
    }
    let mut text = Vec::new();
    let object = store.get(sha256).await.map_err(|_| ClusterError::MissingArtifact(sha256.into()))?;
    object.take(MAX_MANIFEST_BYTES).read_to_end(&mut text).await.map_err(|e| nats("manifest download")(&e))?;
    let actual = hex::encode(Sha256::digest(&text));
    if actual != sha256 {
        return Err(ClusterError::Tampered { sha256: sha256.into(), actual });
    }
    let bad = |message: String| ClusterError::BadManifest { sha256: sha256.into(), message };
    let manifest =
        Manifest::from_toml(&String::from_utf8_lossy(&text), "manifest.toml").map_err(|e| bad(e.to_string()))?;
    for (file, sha256) in compiled_files(&manifest) {
        if !is_sha256(sha256) || file != format!("{sha256}.cwasm") {
            return Err(bad(format!("its compiled file `{file}` is not named by its sha256")));
        }
        let shared = cache.join(SHARED_FILES).join(file);
        fetch_checked(store, sha256, &shared).await?;
        link_or_copy(&shared, &dir.join(file)).await?;
    }
    if signed {
        fetch_signature(store, sha256, &manifest_path).await?;
    }
    // The manifest last: its presence says the folder is complete.
    write_atomically(&manifest_path, &text).await?;
    Ok(manifest_path)
}

/// The signature of the manifest `sha256` beside `manifest_path`, as the store has it now
/// (none when it has none; the engine then refuses the manifest as unsigned).
async fn fetch_signature(store: &ObjectStore, sha256: &str, manifest_path: &Path) -> Result<(), ClusterError> {
    let path = capsule_exec::trust::signature_path(manifest_path);
    let Ok(object) = store.get(&signature_object(sha256)).await else {
        let _ = tokio::fs::remove_file(&path).await;
        return Ok(());
    };
    let mut signature = Vec::new();
    object.take(MAX_SIGNATURE_BYTES).read_to_end(&mut signature).await.map_err(|e| nats("signature download")(&e))?;
    write_atomically(&path, &signature).await
}

/// The compiled files a manifest names (its build's state, the runtime's code), with their sha256.
fn compiled_files(manifest: &Manifest) -> [(&str, &str); 2] {
    let (artifact, code) = (&manifest.artifact, &manifest.artifact.code);
    [(&artifact.file, &artifact.sha256), (&code.file, &code.sha256)]
}

/// Downloads object `sha256` to `dest`, hashing as it goes; only a file with that hash
/// appears at `dest`.
async fn fetch_checked(store: &ObjectStore, sha256: &str, dest: &Path) -> Result<(), ClusterError> {
    if tokio::fs::try_exists(dest).await.unwrap_or(false) {
        return Ok(());
    }
    let mut object = store.get(sha256).await.map_err(|_| ClusterError::MissingArtifact(sha256.into()))?;
    let partial = partial(dest);
    let mut file = tokio::fs::File::create(&partial).await.map_err(io(&partial))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = object.read(&mut buffer).await.map_err(|e| nats("artifact download")(&e))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
        file.write_all(&buffer[..read]).await.map_err(io(&partial))?;
    }
    file.sync_all().await.map_err(io(&partial))?;
    drop(file);
    let actual = hex::encode(hasher.finalize());
    if actual != sha256 {
        let _ = tokio::fs::remove_file(&partial).await;
        return Err(ClusterError::Tampered { sha256: sha256.into(), actual });
    }
    tokio::fs::rename(&partial, dest).await.map_err(io(dest))
}

/// `target` at `link` too: a hard link, else a copy.
async fn link_or_copy(target: &Path, link: &Path) -> Result<(), ClusterError> {
    if tokio::fs::try_exists(link).await.unwrap_or(false) || tokio::fs::hard_link(target, link).await.is_ok() {
        return Ok(());
    }
    let partial = partial(link);
    tokio::fs::copy(target, &partial).await.map_err(io(&partial))?;
    tokio::fs::rename(&partial, link).await.map_err(io(link))
}

async fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), ClusterError> {
    let partial = partial(path);
    tokio::fs::write(&partial, bytes).await.map_err(io(&partial))?;
    tokio::fs::rename(&partial, path).await.map_err(io(path))
}
