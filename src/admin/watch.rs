//! Reload on change: a watch on the configuration file's directory (not the file: editors
//! and Kubernetes ConfigMaps replace it by rename, or swap the `..data` link it points
//! through, and a watch on the old file would go quiet). Any event in the directory starts a
//! short quiet period; then, if the file's bytes differ from the ones last applied, it is
//! loaded and applied as by SIGHUP (an invalid file changes nothing; the error is logged and
//! counted). Reads are not changes: the watch's own read of the file (and every other reader's)
//! would otherwise start the next quiet period, and the check would run four times a second
//! forever.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use notify::event::{AccessKind, AccessMode, EventKind};
use notify::{RecursiveMode, Watcher};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// Events closer together than this are one change (an editor's write, rename, chmod).
const QUIET: Duration = Duration::from_millis(250);

fn digest(path: &std::path::Path) -> Option<[u8; 32]> {
    std::fs::read(path).ok().map(|b| Sha256::digest(b).into())
}

/// Whether an event of this kind may have changed a file: anything but opening, reading and
/// closing without writing.
fn may_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

/// A watch on `dir` that sends on `tx` for each event that may have changed a file in it.
fn watch_dir(
    dir: &std::path::Path,
    tx: tokio::sync::mpsc::Sender<()>,
) -> notify::Result<notify::RecommendedWatcher> {
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| may_change(&e.kind)) {
            // Full: a change is queued already, which is all the loop needs to know.
            let _ = tx.try_send(());
        }
    })?;
    watcher.watch(dir, RecursiveMode::NonRecursive)?;
    Ok(watcher)
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
    let watcher = watch_dir(&dir, tx)?;
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
                    _ = crate::timers::sleep(QUIET) => break,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reading_the_file_is_not_a_change_writing_it_is() {
        struct Dir(PathBuf);
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let dir = Dir(std::env::temp_dir().join(format!("pgtenant-watch-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let file = dir.0.join("pgtenant.toml");
        std::fs::write(&file, "a").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let _watcher = watch_dir(&dir.0, tx).unwrap();
        // What the watch itself does after each change: read the file.
        for _ in 0..3 {
            assert!(digest(&file).is_some());
        }
        let quiet = crate::timers::timeout(Duration::from_millis(300), rx.recv()).await;
        assert!(quiet.is_err(), "a read was taken for a change");
        std::fs::write(&file, "b").unwrap();
        let changed = crate::timers::timeout(Duration::from_secs(30), rx.recv()).await;
        assert!(matches!(changed, Ok(Some(()))), "a write was missed");
    }
}
