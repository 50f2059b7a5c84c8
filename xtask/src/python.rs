//! The project's Python tools (schemathesis for `cargo xtask fuzz`, confluent-kafka for the
//! analyst tests, gql for the GraphQL subscription tests) in a venv of the project's own, `target/python-tools`, holding exactly the
//! packages and versions `xtask/python-tools.txt` lists. Not the user's site-packages: a
//! package another program upgraded there (a newer hypothesis crashed inside this machine's
//! Python) would change what the project runs without anyone seeing.

use std::path::PathBuf;

use anyhow::{Context, bail};
use tokio::process::Command;

use crate::dev::workspace_root;

/// The list of every package and version, transitive ones included.
fn requirements() -> PathBuf {
    workspace_root().join("xtask/python-tools.txt")
}

/// The venv's `bin` directory: its `python3`, `schemathesis`.
pub(crate) fn bin() -> PathBuf {
    workspace_root().join("target/python-tools/bin")
}

/// Makes the venv hold what `xtask/python-tools.txt` lists. It is built afresh whenever the
/// list changed since the venv was last built (a copy of the list inside it says which), so
/// nothing of an earlier list stays; otherwise this costs one file read.
pub(crate) async fn ensure_tools() -> anyhow::Result<()> {
    let wanted = std::fs::read(requirements()).context("reading xtask/python-tools.txt")?;
    let venv = workspace_root().join("target/python-tools");
    let installed = venv.join("python-tools.txt");
    if std::fs::read(&installed).is_ok_and(|have| have == wanted) {
        return Ok(());
    }
    println!(
        "installing the pinned Python tools (xtask/python-tools.txt) into target/python-tools..."
    );
    if venv.exists() {
        std::fs::remove_dir_all(&venv).context("removing the outdated target/python-tools")?;
    }
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv)).await?;
    // --no-deps: the list is the whole tool chain; pip must not resolve anything of its own.
    run(Command::new(bin().join("python3"))
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ])
        .args(["--no-deps", "--requirement"])
        .arg(requirements()))
    .await?;
    // A package the list forgot is missing now: name it rather than fail later.
    run(Command::new(bin().join("python3")).args([
        "-m",
        "pip",
        "check",
        "--disable-pip-version-check",
    ]))
    .await
    .context("xtask/python-tools.txt misses a dependency: regenerate it (see its header)")?;
    std::fs::write(&installed, wanted)?;
    Ok(())
}

async fn run(command: &mut Command) -> anyhow::Result<()> {
    let status = command
        .status()
        .await
        .with_context(|| format!("running {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed ({status})");
    }
    Ok(())
}
