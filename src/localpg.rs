//! Throwaway PostgreSQL clusters for the demo and the tests: `initdb` into a fresh directory,
//! `postgres` on a free loopback port, password authentication (scram-sha-256) for TCP.
//!
//! PostgreSQL refuses to run as root, so when the effective user is root both run as the
//! `postgres` OS user: `initdb` through `runuser -u postgres --`, the server by switching uid/gid
//! itself so that it stays our direct child. Server binaries are found with
//! `pg_config --bindir`, then under `/usr/lib/postgresql/<version>/bin`. A watchdog shell
//! stops the cluster and removes its directory if the owning process dies without cleaning up.

use std::fs;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// Why a cluster could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum LocalPgError {
    #[error(
        "PostgreSQL server binaries (initdb, postgres) not found; install them, e.g. `apt-get install -y postgresql`"
    )]
    NoBinaries,
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("PostgreSQL did not start: {0}")]
    Start(String),
    #[error("setting up: {0}")]
    Setup(String),
}

/// A running throwaway cluster.
pub struct Cluster {
    pub port: u16,
    /// Superuser name (`postgres`).
    pub superuser: String,
    /// Superuser password (random per cluster).
    pub password: String,
    root: PathBuf,
    bindir: PathBuf,
    /// uid/gid of the `postgres` OS user when we run as root.
    as_postgres: Option<(u32, u32)>,
    child: Option<Child>,
    pid: Option<u32>,
    /// The `postgresql.conf` settings it runs with (again after [`Cluster::resume`]).
    settings: Vec<(String, String)>,
}

static NEXT: AtomicUsize = AtomicUsize::new(0);
/// Where cluster templates are kept (see [`use_template_dir`]); unset, each cluster runs
/// `initdb`.
static TEMPLATE_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Makes new clusters copies of a template kept in `dir` (made by the first cluster that
/// needs it, once per set of server binaries) instead of each running `initdb`. Test
/// harnesses point it at cargo's `CARGO_TARGET_TMPDIR`, so a whole test suite runs `initdb`
/// once. The first call wins.
pub fn use_template_dir(dir: &Path) {
    let _ = fs::create_dir_all(dir);
    let _ = TEMPLATE_DIR.set(dir.to_owned());
}

/// The directory holding `initdb` and `postgres`.
pub fn bindir() -> Result<PathBuf, LocalPgError> {
    let has_server = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_server(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .into_iter()
        .rev()
        .find(|d| has_server(d))
        .ok_or(LocalPgError::NoBinaries)
}

fn id(args: &[&str]) -> Option<u32> {
    let out = Command::new("id").args(args).output().ok()?;
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// The `postgres` OS user's uid and gid, when running as root.
fn postgres_account() -> Result<Option<(u32, u32)>, LocalPgError> {
    if id(&["-u"]) != Some(0) {
        return Ok(None);
    }
    match (id(&["-u", "postgres"]), id(&["-g", "postgres"])) {
        (Some(uid), Some(gid)) => Ok(Some((uid, gid))),
        _ => Err(LocalPgError::Start(
            "running as root, but there is no `postgres` OS user to run PostgreSQL as".into(),
        )),
    }
}

/// A new directory for a cluster's files.
fn new_root() -> Result<PathBuf, LocalPgError> {
    let root = std::env::temp_dir().join(format!(
        "pgtenant-pg-{}-{}-{:08x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    ));
    fs::create_dir_all(&root)?;
    Ok(root)
}

fn free_port() -> Result<u16, LocalPgError> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn run(mut cmd: Command, what: &str) -> Result<String, LocalPgError> {
    let out = cmd.stdin(Stdio::null()).output()?;
    if !out.status.success() {
        return Err(LocalPgError::Command {
            what: what.to_owned(),
            detail: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Cluster {
    /// Creates and starts a cluster. `settings` are extra `postgresql.conf` settings.
    pub fn start(settings: &[(&str, &str)]) -> Result<Cluster, LocalPgError> {
        Self::start_inner(settings, None)
    }

    /// Like [`Cluster::start`], with `ssl = on` using the given PEM certificate and key.
    pub fn start_with_tls(
        settings: &[(&str, &str)],
        cert_pem: &str,
        key_pem: &str,
    ) -> Result<Cluster, LocalPgError> {
        Self::start_inner(settings, Some((cert_pem, key_pem)))
    }

    fn start_inner(
        settings: &[(&str, &str)],
        tls: Option<(&str, &str)>,
    ) -> Result<Cluster, LocalPgError> {
        let bindir = bindir()?;
        let as_postgres = postgres_account()?;
        let root = new_root()?;
        let password = format!("pw{:016x}", rand::random::<u64>());
        fs::write(root.join("pwfile"), format!("{password}\n"))?;
        let mut settings: Vec<(String, String)> = settings
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        if let Some((cert, key)) = tls {
            use std::os::unix::fs::PermissionsExt;
            let (cert_path, key_path) = (root.join("server.crt"), root.join("server.key"));
            fs::write(&cert_path, cert)?;
            fs::write(&key_path, key)?;
            // PostgreSQL refuses a key file others can read.
            fs::set_permissions(&key_path, fs::Permissions::from_mode(0o600))?;
            settings.push(("ssl".into(), "on".into()));
            settings.push((
                "ssl_cert_file".into(),
                cert_path.to_string_lossy().into_owned(),
            ));
            settings.push((
                "ssl_key_file".into(),
                key_path.to_string_lossy().into_owned(),
            ));
        }
        if as_postgres.is_some() {
            run(
                {
                    let mut c = Command::new("chown");
                    c.args(["-R", "postgres:", &root.to_string_lossy()]);
                    c
                },
                "chown",
            )?;
        }
        let mut cluster = Cluster {
            port: 0,
            superuser: "postgres".into(),
            password,
            root,
            bindir,
            as_postgres,
            child: None,
            pid: None,
            settings: Vec::new(),
        };
        // A copy of a finished initdb (about twice as fast as running it), with the template's
        // superuser password; initdb when there is no template or it cannot be used (the
        // `postgres` OS user may not reach the template directory).
        let copied = TEMPLATE_DIR.get().map(|dir| {
            let (template, password) = cluster.template(dir)?;
            let mut cp = Command::new("cp");
            cp.arg("-a")
                .arg(template.join("data"))
                .arg(cluster.data_dir());
            run(cp, "copying the cluster template")?;
            Ok::<_, LocalPgError>(password)
        });
        match copied {
            Some(Ok(password)) => cluster.password = password,
            _ => {
                let _ = fs::remove_dir_all(cluster.data_dir());
                cluster.initdb(&cluster.data_dir(), &cluster.root.join("pwfile"))?;
            }
        }

        let mut last_error = String::new();
        for _ in 0..5 {
            match cluster.launch(&settings, None) {
                Ok(()) => {
                    cluster.spawn_watchdog();
                    return Ok(cluster);
                }
                Err(e) => last_error = e.to_string(),
            }
        }
        Err(LocalPgError::Start(last_error))
    }

    fn data_dir(&self) -> PathBuf {
        self.root.join("data")
    }

    /// `initdb` into `data`, with the superuser password in `pwfile`.
    fn initdb(&self, data: &Path, pwfile: &Path) -> Result<(), LocalPgError> {
        let mut initdb = self.command("initdb");
        initdb.arg("-D").arg(data).args([
            "-U",
            "postgres",
            "--auth-host=scram-sha-256",
            "--auth-local=trust",
            "-E",
            "UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]);
        initdb.arg(format!("--pwfile={}", pwfile.display()));
        run(initdb, "initdb").map(drop)
    }

    /// The template under `dir` for these server binaries (their path and the server
    /// binary's size and time), made on first use: its directory
    /// and its superuser password. Built aside and renamed into place, so a concurrent test
    /// process sees either none or a whole one (the loser of a race discards its own).
    fn template(&self, dir: &Path) -> Result<(PathBuf, String), LocalPgError> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.bindir.hash(&mut h);
        self.as_postgres.is_some().hash(&mut h);
        // Another server binary at the same path (an upgrade) gets a template of its own.
        if let Ok(meta) = fs::metadata(self.bindir.join("postgres")) {
            meta.len().hash(&mut h);
            meta.modified().ok().hash(&mut h);
        }
        let path = dir.join(format!("pg-template-{:016x}", h.finish()));
        let read = |path: &Path| -> Option<(PathBuf, String)> {
            let password = fs::read_to_string(path.join("password")).ok()?;
            path.join("data/PG_VERSION")
                .is_file()
                .then(|| (path.to_owned(), password.trim().to_owned()))
        };
        if let Some(found) = read(&path) {
            return Ok(found);
        }
        let building = dir.join(format!(
            "pg-template-building-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        fs::create_dir_all(&building)?;
        let password = format!("pw{:016x}", rand::random::<u64>());
        fs::write(building.join("pwfile"), format!("{password}\n"))?;
        if self.as_postgres.is_some() {
            let mut chown = Command::new("chown");
            chown.args(["-R", "postgres:"]).arg(&building);
            run(chown, "chown")?;
        }
        let built = self.initdb(&building.join("data"), &building.join("pwfile"));
        let placed = built.and_then(|()| {
            // Written last: its presence marks a whole template.
            fs::write(building.join("password"), &password)?;
            Ok(fs::rename(&building, &path).is_ok())
        });
        if !matches!(placed, Ok(true)) {
            let _ = fs::remove_dir_all(&building);
        }
        placed?;
        read(&path).ok_or_else(|| LocalPgError::Setup("the cluster template is incomplete".into()))
    }

    /// A one-shot command (initdb) as the `postgres` OS user when root.
    fn command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        if self.as_postgres.is_some() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// The server itself. It must be our direct child, not runuser's: signals then reach it
    /// and its exit is reaped (runuser may leave it a zombie), so it switches user itself.
    fn server_command(&self) -> Command {
        let mut c = Command::new(self.bindir.join("postgres"));
        if let Some((uid, gid)) = self.as_postgres {
            use std::os::unix::process::CommandExt;
            c.uid(uid).gid(gid);
        }
        c
    }

    fn launch(
        &mut self,
        settings: &[(String, String)],
        port: Option<u16>,
    ) -> Result<(), LocalPgError> {
        self.port = match port {
            Some(p) => p,
            None => free_port()?,
        };
        self.settings = settings.to_vec();
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.join("postgres.log"))?;
        let mut cmd = self.server_command();
        cmd.arg("-D").arg(self.data_dir());
        let port = self.port.to_string();
        let sockets = self.root.to_string_lossy().into_owned();
        let mut conf: Vec<(&str, &str)> = vec![
            ("port", &port),
            ("listen_addresses", "127.0.0.1"),
            ("unix_socket_directories", &sockets),
            ("fsync", "off"),
            ("synchronous_commit", "off"),
            ("full_page_writes", "off"),
            ("max_connections", "400"),
            ("shared_buffers", "64MB"),
            ("password_encryption", "scram-sha-256"),
        ];
        conf.extend(settings.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        for (k, v) in conf {
            cmd.arg("-c").arg(format!("{k}={v}"));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        let pid_file = self.data_dir().join("postmaster.pid");
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(LocalPgError::Start(format!(
                    "postgres exited with {status}: {}",
                    self.log_tail()
                )));
            }
            if let Ok(text) = fs::read_to_string(&pid_file) {
                let lines: Vec<&str> = text.lines().collect();
                // A primary is "ready", a hot standby "standby" once it takes connections.
                if lines.len() >= 8 && matches!(lines[7].trim(), "ready" | "standby") {
                    self.pid = lines[0].trim().parse().ok();
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(LocalPgError::Start(format!(
            "not ready after 60 s: {}",
            self.log_tail()
        )))
    }

    fn spawn_watchdog(&self) {
        let root = &self.root;
        // The server's pid is read when it is needed: a cluster halted and resumed has
        // another one.
        let script = format!(
            "while kill -0 {owner} 2>/dev/null; do sleep 1; done; \
             if [ -d '{root}' ]; then kill -INT \"$(head -n 1 '{root}/data/postmaster.pid' 2>/dev/null)\" 2>/dev/null; \
             sleep 3; rm -rf '{root}'; fi",
            owner = std::process::id(),
            root = root.display(),
        );
        let _ = Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    /// A directory `name` of this process's own inside the cluster's directory, removed with
    /// the cluster (by [`Cluster::stop`], or by the watchdog if this process dies first).
    pub fn scratch_dir(&self, name: &str) -> Result<PathBuf, LocalPgError> {
        let dir = self.root.join(name);
        fs::create_dir_all(&dir)?;
        Ok(dir)
    }

    /// The last lines of the server log.
    pub fn log_tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = fs::File::open(self.root.join("postgres.log")) {
            let _ = f.read_to_string(&mut text);
        }
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// A libpq URL for `database` as the superuser.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgresql://{}:{}@127.0.0.1:{}/{}",
            self.superuser, self.password, self.port, database
        )
    }

    /// Runs SQL with psql as the superuser (stops at the first error) and returns its
    /// unaligned, tuples-only output.
    pub fn psql(&self, database: &str, sql: &str) -> Result<String, LocalPgError> {
        let mut cmd = Command::new(self.bindir.join("psql"));
        cmd.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(self.url(database))
            .args(["-c", sql]);
        run(
            cmd,
            &format!("psql ({})", sql.chars().take(60).collect::<String>()),
        )
    }

    /// Path of a binary from the same installation (psql, pgbench).
    pub fn binary(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }

    /// A hot standby of this cluster, streaming from it: a base backup (`pg_basebackup -R`)
    /// started on a port of its own.
    pub fn start_replica(&self) -> Result<Cluster, LocalPgError> {
        let root = new_root()?;
        if self.as_postgres.is_some() {
            let mut c = Command::new("chown");
            c.args(["-R", "postgres:", &root.to_string_lossy()]);
            run(c, "chown")?;
        }
        let mut replica = Cluster {
            port: 0,
            superuser: self.superuser.clone(),
            password: self.password.clone(),
            root,
            bindir: self.bindir.clone(),
            as_postgres: self.as_postgres,
            child: None,
            pid: None,
            settings: Vec::new(),
        };
        let mut backup = replica.command("pg_basebackup");
        backup
            .arg("-d")
            .arg(format!(
                "host=127.0.0.1 port={} user={} password={}",
                self.port, self.superuser, self.password
            ))
            .arg("-D")
            .arg(replica.data_dir())
            .args(["-R", "-X", "stream", "--no-sync", "-c", "fast"]);
        run(backup, "pg_basebackup")?;
        let settings = vec![("hot_standby".to_owned(), "on".to_owned())];
        replica.launch(&settings, None)?;
        replica.spawn_watchdog();
        Ok(replica)
    }

    /// Stops the server (fast shutdown) and keeps its files and port for [`Cluster::resume`].
    pub fn halt(&mut self) {
        self.shut_down();
    }

    /// Starts a halted server again, on the same port.
    pub fn resume(&mut self) -> Result<(), LocalPgError> {
        let settings = self.settings.clone();
        self.launch(&settings, Some(self.port))
    }

    /// The pid of the postmaster.
    pub fn postmaster_pid(&self) -> Option<u32> {
        self.pid
    }

    /// Stops the server (fast shutdown) and removes its files.
    pub fn stop(&mut self) {
        self.shut_down();
        let _ = fs::remove_dir_all(&self.root);
    }

    fn shut_down(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = Command::new("kill")
                .args(["-INT", &pid.to_string()])
                .stderr(Stdio::null())
                .status();
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
