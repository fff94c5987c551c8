//! The demo's sample world: the login roles, a shared database with the verified tenant
//! context, a schema tenant, a dedicated tenant's database, and the configuration that serves
//! them.

use std::path::{Path, PathBuf};

use crate::auth::verifier::ScramVerifier;
use crate::localpg::{Cluster, LocalPgError};
use crate::tenant::context::{self, ContextKey};

/// A tenant of the sample world. Each has a read-write user (`user`) and a read-only user
/// `reader`, both with `password`.
#[derive(Debug, Clone)]
pub struct SampleTenant {
    pub name: &'static str,
    pub id: &'static str,
    pub kind: &'static str,
    pub user: &'static str,
    pub password: String,
    /// The row its `items` table shows it.
    pub sample_row: &'static str,
}

/// The sample world on two clusters.
pub struct Fixture {
    pub tenants: Vec<SampleTenant>,
    /// The shared database on cluster A.
    pub shared_db: String,
    /// The dedicated tenant's database on cluster B.
    pub dedicated_db: String,
    shards: String,
}

pub const ACME_ID: &str = "6f1c2b7e-1d0a-4c39-9d0e-6f3b2a1c9e01";
pub const GLOBEX_ID: &str = "8d2e4f60-3b1c-4a7d-8e9f-0a1b2c3d4e02";
pub const UMBRELLA_ID: &str = "0c9b8a7d-6e5f-4d3c-2b1a-0f9e8d7c6b03";
pub const INITECH_ID: &str = "5a4b3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c04";

/// The login role pgtenant uses on both clusters.
pub const APP_ROLE: &str = "pgtenant_app";
/// The schema tenant's own role (it uses `isolation = "role"`).
pub const UMBRELLA_ROLE: &str = "tenant_umbrella";
/// The read-only login roles `readonly` users reach the shards as.
pub const READONLY_ROLE: &str = "pgtenant_ro";
pub const UMBRELLA_READONLY_ROLE: &str = "tenant_umbrella_ro";

fn create_role(name: &str, password: &str) -> String {
    format!(
        "CREATE ROLE {name} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE \
         PASSWORD '{password}';"
    )
}

/// Creates the login roles (cluster-wide, once per pair of clusters). Each role's password is
/// its cluster's superuser password.
pub fn create_roles(a: &Cluster, b: &Cluster) -> Result<(), LocalPgError> {
    a.psql(
        "postgres",
        &format!(
            "{}{}{}{}",
            create_role(APP_ROLE, &a.password),
            create_role(UMBRELLA_ROLE, &a.password),
            create_role(READONLY_ROLE, &a.password),
            create_role(UMBRELLA_READONLY_ROLE, &a.password)
        ),
    )?;
    b.psql(
        "postgres",
        &format!(
            "{}{}",
            create_role(APP_ROLE, &b.password),
            create_role(READONLY_ROLE, &b.password)
        ),
    )?;
    Ok(())
}

/// Creates database `db` on `a` as a shared shard: the verified tenant context with a new
/// key written to `key_file` (what `pgtenant shard init` does), and an empty `items` table
/// whose policy reads the verified tenant (not the setting a client could write), with
/// pgtenant's read-write and read-only roles granted on it.
pub fn create_shared_database(a: &Cluster, db: &str, key_file: &Path) -> Result<(), LocalPgError> {
    a.psql("postgres", &format!("CREATE DATABASE {db}"))?;
    let _ = std::fs::remove_file(key_file);
    let key = ContextKey::generate();
    key.create(key_file)
        .map_err(|e| LocalPgError::Setup(e.to_string()))?;
    a.psql(
        db,
        &format!(
            "{}\n{};\n{}",
            context::install_sql(APP_ROLE),
            key.store_sql(),
            context::harden_sql()
        ),
    )?;
    a.psql(
        db,
        &format!(
            "CREATE TABLE public.items (
                id bigserial,
                tenant_id uuid NOT NULL DEFAULT pgtenant.tenant_id(),
                name text NOT NULL,
                PRIMARY KEY (tenant_id, id));
             ALTER TABLE public.items ENABLE ROW LEVEL SECURITY;
             ALTER TABLE public.items FORCE ROW LEVEL SECURITY;
             CREATE POLICY tenant_isolation ON public.items
                USING (tenant_id = (SELECT pgtenant.tenant_id()))
                WITH CHECK (tenant_id = (SELECT pgtenant.tenant_id()));
             GRANT SELECT, INSERT, UPDATE, DELETE ON public.items TO {APP_ROLE};
             GRANT SELECT ON public.items TO {READONLY_ROLE};
             GRANT USAGE ON SEQUENCE public.items_id_seq TO {APP_ROLE};"
        ),
    )?;
    Ok(())
}

/// Creates the sample databases (named with `suffix`, so tests can have one each) and
/// returns what a configuration needs. The roles must exist ([`create_roles`]).
pub fn create_fixture(a: &Cluster, b: &Cluster, suffix: &str) -> Result<Fixture, LocalPgError> {
    let shared_db = format!("app{suffix}");
    let dedicated_db = format!("initech{suffix}");
    let key_file = key_dir(a)?.join(format!("shared{suffix}.key"));
    create_shared_database(a, &shared_db, &key_file)?;
    a.psql(
        &shared_db,
        &format!(
            "INSERT INTO public.items (tenant_id, name) VALUES
                ('{ACME_ID}', 'acme anvil'), ('{ACME_ID}', 'acme rocket skates'),
                ('{GLOBEX_ID}', 'globex doomsday device');
             CREATE SCHEMA t_umbrella AUTHORIZATION {UMBRELLA_ROLE};
             CREATE TABLE t_umbrella.items (id bigserial PRIMARY KEY, name text NOT NULL);
             INSERT INTO t_umbrella.items (name) VALUES ('umbrella t-virus');
             ALTER TABLE t_umbrella.items OWNER TO {UMBRELLA_ROLE};
             ALTER SEQUENCE t_umbrella.items_id_seq OWNER TO {UMBRELLA_ROLE};
             GRANT USAGE ON SCHEMA t_umbrella TO {UMBRELLA_READONLY_ROLE};
             GRANT SELECT ON t_umbrella.items TO {UMBRELLA_READONLY_ROLE};"
        ),
    )?;
    b.psql(
        "postgres",
        &format!("CREATE DATABASE {dedicated_db} OWNER {APP_ROLE}"),
    )?;
    b.psql(
        &dedicated_db,
        &format!(
            "SET ROLE {APP_ROLE};
             CREATE TABLE public.items (id bigserial PRIMARY KEY, name text NOT NULL);
             INSERT INTO public.items (name) VALUES ('initech TPS report');
             GRANT SELECT ON public.items TO {READONLY_ROLE};"
        ),
    )?;
    // What `pgtenant shard init` does on a shard without a context key: other databases'
    // sessions on the cluster stay out of sight.
    b.psql(&dedicated_db, &context::harden_sql())?;

    let password = || format!("{:016x}", rand::random::<u64>());
    let tenants = vec![
        SampleTenant {
            name: "acme",
            id: ACME_ID,
            kind: "shared",
            user: "app",
            password: password(),
            sample_row: "acme anvil",
        },
        SampleTenant {
            name: "globex",
            id: GLOBEX_ID,
            kind: "shared",
            user: "app",
            password: password(),
            sample_row: "globex doomsday device",
        },
        SampleTenant {
            name: "umbrella",
            id: UMBRELLA_ID,
            kind: "schema",
            user: "app",
            password: password(),
            sample_row: "umbrella t-virus",
        },
        SampleTenant {
            name: "initech",
            id: INITECH_ID,
            kind: "dedicated",
            user: "app",
            password: password(),
            sample_row: "initech TPS report",
        },
    ];
    let shards = format!(
        r#"[shards.shared-a]
host = "127.0.0.1"
port = {a_port}
database = "{shared_db}"
user = "{APP_ROLE}"
password = "{a_pw}"
max_connections = 60
tls = "disable"
context_key_file = "{key_file}"
readonly_user = "{READONLY_ROLE}"
readonly_password = "{a_pw}"

[shards.initech-db]
host = "127.0.0.1"
port = {b_port}
database = "{dedicated_db}"
user = "{APP_ROLE}"
password = "{b_pw}"
max_connections = 20
tls = "disable"
readonly_user = "{READONLY_ROLE}"
readonly_password = "{b_pw}"
"#,
        a_port = a.port,
        a_pw = a.password,
        b_port = b.port,
        b_pw = b.password,
        key_file = key_file.display(),
    );
    let mut fixture = Fixture {
        tenants,
        shared_db,
        dedicated_db,
        shards,
    };
    fixture.shards.push_str(&format!(
        "\n[plans.basic]\nmax_client_connections = 200\nstatement_timeout = \"60s\"\n\n{}",
        fixture.tenants_toml(&a.password)
    ));
    Ok(fixture)
}

impl Fixture {
    fn tenants_toml(&self, umbrella_password: &str) -> String {
        let mut out = String::new();
        for t in &self.tenants {
            let placement = match t.kind {
                "shared" => r#"{ kind = "shared", shard = "shared-a" }"#.to_owned(),
                "schema" => {
                    r#"{ kind = "schema", shard = "shared-a", schema = "t_umbrella" }"#.to_owned()
                }
                _ => r#"{ kind = "dedicated", shard = "initech-db" }"#.to_owned(),
            };
            let role = if t.kind == "schema" {
                format!(
                    "isolation = \"role\"\nserver_user = \"{UMBRELLA_ROLE}\"\nserver_password = \"{umbrella_password}\"\n\
                     server_readonly_user = \"{UMBRELLA_READONLY_ROLE}\"\nserver_readonly_password = \"{umbrella_password}\"\n"
                )
            } else {
                String::new()
            };
            let verifier = ScramVerifier::from_password(t.password.as_bytes());
            out.push_str(&format!(
                "[[tenants]]\nid = \"{}\"\nname = \"{}\"\nplan = \"basic\"\nplacement = {placement}\n{role}\
                 [[tenants.users]]\nname = \"{}\"\nscram = \"{verifier}\"\n\n\
                 [[tenants.users]]\nname = \"reader\"\nrole = \"readonly\"\nscram = \"{verifier}\"\n\n",
                t.id, t.name, t.user,
            ));
        }
        out
    }

    /// A complete configuration listening on `addr`; `extra` is appended verbatim.
    pub fn config(&self, addr: &str, extra: &str) -> String {
        format!(
            "[listen]\naddr = \"{addr}\"\n\n[pool]\nmode = \"transaction\"\n\n{}\n{extra}",
            self.shards
        )
    }

    /// The tenant called `name`.
    #[cfg(feature = "fixtures")]
    pub fn tenant(&self, name: &str) -> Option<&SampleTenant> {
        self.tenants.iter().find(|t| t.name == name)
    }
}

/// Where the sample shards' context keys live: private to this process's user, inside cluster
/// `a`'s directory, so they go when the cluster goes.
fn key_dir(a: &Cluster) -> Result<PathBuf, LocalPgError> {
    let dir = a.scratch_dir("keys")?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| LocalPgError::Setup(e.to_string()))?;
    }
    Ok(dir)
}

/// A libpq URL for `tenant` through pgtenant at `port`.
pub fn tenant_url(tenant: &SampleTenant, port: u16) -> String {
    format!(
        "postgresql://{}.{}:{}@127.0.0.1:{port}/{}",
        tenant.user, tenant.name, tenant.password, tenant.name
    )
}
