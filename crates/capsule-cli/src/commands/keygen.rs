//! `capsule keygen PATH`: a key pair that signs builds (`capsule build --sign PATH`) for
//! runners that trust its public key (`--trust PATH.pub`).

use std::path::PathBuf;
use std::process::ExitCode;

use capsule_exec::trust::SigningKey;
use clap::Args;

use crate::exit::{Exit, Failure};

/// Make an ed25519 key pair for signing builds: the secret key at PATH (mode 0600), the
/// public key at PATH.pub.
#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  capsule keygen ~/.config/capsule/release\n  capsule build main.py --sign ~/.config/capsule/release\n  capsule-exec .capsule/build/main/manifest.toml --trust ~/.config/capsule/release.pub\n\nKeep the secret key where only the builder can read it (a CI secret); give the `.pub` file to every runner."
)]
pub struct KeygenCommand {
    /// Where to write the secret key; never over an existing file.
    path: PathBuf,
}

impl KeygenCommand {
    pub async fn execute(self) -> Result<ExitCode, Failure> {
        let key = SigningKey::generate();
        let public = key.write(&self.path).map_err(|e| Failure::of(&e))?;
        println!("secret key: {} (keep it private)", self.path.display());
        println!(
            "public key: {} (key {}; give it to runners: `--trust {}`)",
            public.display(),
            key.public().id(),
            public.display()
        );
        Ok(Exit::Success.into())
    }
}
