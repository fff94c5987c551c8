//! Reload on change: a watch on the configuration file's directory (not the file: editors
//! and Kubernetes ConfigMaps replace it by rename, or swap the `..data` link it points
//! through, and a watch on the old file would go quiet). Any event in the directory starts a
//! short quiet period; then, if the file's bytes differ from the ones last applied, it is
//! loaded and applied as by SIGHUP (an invalid file changes nothing; the error is logged and
//! counted).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// Events closer together than this are one change (an editor's write, rename, chmod).
const QUIET: Duration = Duration::from_millis(250);

fn digest(path: &std::path::Path) -> Option<[u8; 32]> {
    std::fs::read(path).ok().map(|b| Sha256::digest(b).into())
}

/// Watches `path` until `stop` fires. Errors starting the watch are returned (the caller
/// logs them and goes on with SIGHUP and RELOAD).
pub fn start(
    path: PathBuf,
    state: Arc<AppState>,
    stop: CancellationToken,
) -> notify::Result<tokio::task::JoinHandle<()>> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(16);
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok() {
            // Full: a change is queued already, which is all the loop needs to know.
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(tokio::spawn(async move {
        // The watcher lives as long as this task.
        let _watcher = watcher;
        let mut applied = digest(&path);
        loop {
            tokio::select! {
                got = rx.recv() => if got.is_none() { return },
                _ = stop.cancelled() => return,
            }
            // Let the burst of events settle.
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(QUIET) => break,
                    got = rx.recv() => if got.is_none() { return },
                }
            }
            let now = digest(&path);
            if now.is_none() || now == applied {
                continue;
            }
            applied = now;
            tracing::info!(path = %path.display(), "configuration file changed");
            let _ = state.reload_from_source().await;
        }
    }))
}
