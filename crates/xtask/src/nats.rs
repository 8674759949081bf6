//! The NATS server the cluster tests run against: Debian's `nats-server` package, pinned by
//! version and sha256, unpacked (no installation, no root) into the development cache and
//! linked as `target/nats-server`.

use std::fs;
use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result};

use crate::layers::{debian_archive_url, download};
use crate::runtime::dev_cache_dir;
use crate::util::{run, target_dir};

const VERSION: &str = "2.9.10-1+b3";
const DEB: &str = "nats-server_2.9.10-1+b3_amd64.deb";
const SHA256: &str = "9f69ebb6f612e652382fde175622160dcd81fd97f2356f5da80bb5c3f48513dd";

/// Where the tests look for it.
pub fn link() -> PathBuf {
    target_dir().join("nats-server")
}

/// Downloads and unpacks the pinned `nats-server` unless the cache has it; links it.
pub fn ensure() -> Result<PathBuf> {
    let dir = dev_cache_dir().join(format!("nats-server-{VERSION}"));
    let binary = dir.join("usr/sbin/nats-server");
    if !binary.exists() {
        let deb = dev_cache_dir().join("downloads").join(DEB);
        if !deb.exists() {
            let url = format!("{}/pool/main/n/nats-server/{}", debian_archive_url()?, DEB.replace('+', "%2b"));
            download(&url, &deb, SHA256)?;
        }
        let unpacking = dev_cache_dir().join(format!("nats-server-{VERSION}.partial"));
        let _ = fs::remove_dir_all(&unpacking);
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacking))?;
        fs::rename(&unpacking, &dir).with_context(|| format!("moving {} into place", dir.display()))?;
    }
    let link = link();
    fs::create_dir_all(target_dir())?;
    if fs::read_link(&link).ok().as_deref() != Some(binary.as_path()) {
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(&binary, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(link)
}
