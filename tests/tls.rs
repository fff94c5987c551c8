//! TLS towards clients (rustls, certificates from an rcgen CA): SNI routing, a tenant's own
//! certificate, SCRAM-SHA-256-PLUS channel binding, `mode = "require"`, PostgreSQL 17 direct
//! TLS; and TLS towards a shard with `tls = "verify-full"`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::PathBuf;
use std::sync::Arc;

use bytes::BytesMut;
use common::tls::TestCa;
use common::{Env, code, start_with};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::config::{ChannelBinding, SslMode};

struct TlsEnv {
    env: Env,
    ca: TestCa,
    server_cert: PathBuf,
    acme_cert: PathBuf,
}

async fn start_tls(mode: &str) -> TlsEnv {
    let ca = TestCa::new();
    let (cert, key) = ca.issue(
        "server",
        &["*.db.example.com", "db.example.com", "localhost"],
    );
    let (acme_cert, acme_key) = ca.issue("acme", &["acme.db.example.com"]);
    let listen_tls = format!(
        "[listen.tls]\ncert = \"{}\"\nkey = \"{}\"\nmode = \"{mode}\"\nsni_suffix = \"db.example.com\"\n\n[pool]",
        cert.display(),
        key.display()
    );
    let acme_tls = format!(
        "name = \"acme\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        acme_cert.display(),
        acme_key.display()
    );
    let env = start_with("", move |t| {
        t.replacen("[pool]", &listen_tls, 1)
            .replacen("name = \"acme\"\n", &acme_tls, 1)
    })
    .await;
    TlsEnv {
        env,
        ca,
        server_cert: cert,
        acme_cert,
    }
}

impl TlsEnv {
    /// Config for `user` connecting with SNI `host`.
    fn config(&self, host: &str, user: &str, password: &str) -> tokio_postgres::Config {
        let mut c = tokio_postgres::Config::new();
        c.host(host)
            .hostaddr("127.0.0.1".parse().unwrap())
            .port(self.env.port())
            .user(user)
            .password(password)
            .ssl_mode(SslMode::Require);
        c
    }

    async fn connect(
        &self,
        config: tokio_postgres::Config,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = config.connect(self.ca.connector()).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// The certificate pgtenant serves for SNI `host`.
    async fn served_certificate(&self, host: &str) -> CertificateDer<'static> {
        let mut tcp = TcpStream::connect(self.env.addr()).await.unwrap();
        let mut req = BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut req);
        tcp.write_all(&req).await.unwrap();
        assert_eq!(tcp.read_u8().await.unwrap(), b'S');
        let connector = tokio_rustls::TlsConnector::from(Arc::clone(&self.ca.connector().0));
        let tls = connector
            .connect(ServerName::try_from(host.to_owned()).unwrap(), tcp)
            .await
            .unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0]
            .clone()
            .into_owned()
    }
}

fn pem_cert(path: &PathBuf) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(path).unwrap()
}

#[tokio::test]
async fn sni_names_the_tenant_and_picks_its_certificate() {
    let t = start_tls("prefer").await;
    let acme = t.env.tenant("acme").password.clone();
    let client = t
        .connect(t.config("acme.db.example.com", "app", &acme))
        .await
        .unwrap();
    let rows = client
        .query("SELECT name FROM items ORDER BY id", &[])
        .await
        .unwrap();
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(names, ["acme anvil", "acme rocket skates"]);

    assert_eq!(
        t.served_certificate("acme.db.example.com").await,
        pem_cert(&t.acme_cert),
        "acme's own certificate"
    );
    assert_eq!(
        t.served_certificate("globex.db.example.com").await,
        pem_cert(&t.server_cert),
        "the listener's certificate for tenants without one"
    );

    let globex = t.env.tenant("globex").password.clone();
    let client = t
        .connect(t.config("globex.db.example.com", "app", &globex))
        .await
        .unwrap();
    let row = client
        .query_one("SELECT current_setting('app.current_tenant_id')", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), pgtenant::demo::GLOBEX_ID);
}

#[tokio::test]
async fn sni_and_user_name_must_agree() {
    let t = start_tls("prefer").await;
    let globex = t.env.tenant("globex").password.clone();
    let err = t
        .connect(t.config("acme.db.example.com", "app@globex", &globex))
        .await
        .unwrap_err();
    assert_eq!(code(&err), "28000");
}

#[tokio::test]
async fn channel_binding_works_with_tokio_postgres_and_psql() {
    let t = start_tls("prefer").await;
    let acme = t.env.tenant("acme").password.clone();
    let mut config = t.config("acme.db.example.com", "app", &acme);
    config.channel_binding(ChannelBinding::Require);
    let client = t.connect(config).await.expect("SCRAM-SHA-256-PLUS");
    client.simple_query("SELECT 1").await.unwrap();

    let conninfo = format!(
        "host=acme.db.example.com hostaddr=127.0.0.1 port={} user=app password={acme} dbname=acme \
         sslmode=verify-full sslrootcert={} channel_binding=require",
        t.env.port(),
        t.ca.ca_pem_path.display()
    );
    let out =
        tokio::task::spawn_blocking(move || common::psql(&conninfo, "SELECT count(*) FROM items"))
            .await
            .unwrap();
    assert!(out.0, "psql: {}", out.2);
    assert_eq!(out.1.trim(), "2");
}

#[tokio::test]
async fn require_mode_refuses_plaintext() {
    let t = start_tls("require").await;
    let err = common::connect_with(t.env.pg_config("acme"))
        .await
        .unwrap_err();
    assert_eq!(code(&err), "28000");
    let acme = t.env.tenant("acme").password.clone();
    t.connect(t.config("acme.db.example.com", "app", &acme))
        .await
        .expect("TLS is accepted");
}

#[tokio::test]
async fn direct_tls_needs_the_postgresql_alpn() {
    let t = start_tls("prefer").await;
    let mut config = (*t.ca.connector().0).clone();
    config.alpn_protocols = vec![b"postgresql".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(t.env.addr()).await.unwrap();
    let mut tls = connector
        .connect(ServerName::try_from("acme.db.example.com").unwrap(), tcp)
        .await
        .unwrap();
    let mut startup = BytesMut::new();
    postgres_protocol::message::frontend::startup_message([("user", "app")], &mut startup).unwrap();
    tls.write_all(&startup).await.unwrap();
    let mut head = [0u8; 9];
    tls.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], b'R');
    assert_eq!(&head[5..9], &10i32.to_be_bytes(), "AuthenticationSASL");

    // Without ALPN the handshake is refused.
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&t.ca.connector().0));
    let tcp = TcpStream::connect(t.env.addr()).await.unwrap();
    let outcome = async {
        let mut tls = connector
            .connect(ServerName::try_from("acme.db.example.com").unwrap(), tcp)
            .await?;
        tls.write_all(&startup).await?;
        let mut b = [0u8; 1];
        tls.read_exact(&mut b).await
    }
    .await;
    assert!(outcome.is_err());
}

#[tokio::test]
async fn shards_can_require_verified_tls() {
    common::use_cluster_template();
    let ca = TestCa::new();
    let (cert, key) = ca.issue("pg", &["localhost"]);
    let (cert_pem, key_pem) = (
        std::fs::read_to_string(&cert).unwrap(),
        std::fs::read_to_string(&key).unwrap(),
    );
    let cluster = tokio::task::spawn_blocking(move || {
        let c = pgtenant::localpg::Cluster::start_with_tls(&[], &cert_pem, &key_pem).unwrap();
        c.psql(
            "postgres",
            &format!("CREATE ROLE pgtenant_app LOGIN PASSWORD '{}'", c.password),
        )
        .unwrap();
        c.psql("postgres", "CREATE DATABASE tlsdb OWNER pgtenant_app")
            .unwrap();
        c
    })
    .await
    .unwrap();
    let verifier = pgtenant::auth::verifier::ScramVerifier::from_password(b"pw");
    let config = |tls: &str| {
        format!(
            r#"[listen]
addr = "127.0.0.1:0"
[pool]
mode = "session"
[shards.secure]
host = "localhost"
port = {port}
database = "tlsdb"
user = "pgtenant_app"
password = "{password}"
tls = "{tls}"
ca = "{ca}"
[[tenants]]
id = "00000000-0000-0000-0000-0000000000aa"
name = "secure"
placement = {{ kind = "dedicated", shard = "secure" }}
[[tenants.users]]
name = "app"
scram = "{verifier}"
"#,
            port = cluster.port,
            password = cluster.password,
            ca = ca.ca_pem_path.display(),
        )
    };
    let snapshot =
        pgtenant::config::load_str(&config("verify-full"), std::path::Path::new("t.toml")).unwrap();
    let proxy = common::start_proxy(snapshot).await.unwrap();
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1")
        .port(proxy.addr.port())
        .user("app@secure")
        .password("pw");
    let client = common::connect_with(c).await.unwrap();
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the server connection is encrypted");
    drop(client);
    proxy.shutdown(std::time::Duration::from_secs(1)).await;

    // `require` towards a server without TLS fails to connect rather than falling back.
    let plain = &common::world().a;
    let text = config("require")
        .replace(
            &format!("port = {}", cluster.port),
            &format!("port = {}", plain.port),
        )
        .replace("host = \"localhost\"", "host = \"127.0.0.1\"");
    let snapshot = pgtenant::config::load_str(&text, std::path::Path::new("t.toml")).unwrap();
    let proxy = common::start_proxy(snapshot).await.unwrap();
    let mut c = tokio_postgres::Config::new();
    c.host("127.0.0.1")
        .port(proxy.addr.port())
        .user("app@secure")
        .password("pw");
    let err = common::connect_with(c).await.unwrap_err();
    assert_eq!(code(&err), "08001");
    drop(cluster);
}

/// Server logins other than SCRAM: md5 and trust, as a shard's pg_hba.conf may require.
#[tokio::test]
async fn shards_may_use_md5_or_trust_logins() {
    common::use_cluster_template();
    // Read by the server at start; kept until the test ends.
    let dir = common::TempDir::new("hba");
    let hba = dir.join("pg_hba.conf");
    let cluster = tokio::task::spawn_blocking(move || {
        std::fs::write(
            &hba,
            "host all md5user 127.0.0.1/32 md5\nhost all trustuser 127.0.0.1/32 trust\n\
             host all all 127.0.0.1/32 scram-sha-256\nlocal all all trust\n",
        )
        .unwrap();
        let _ = std::process::Command::new("chmod")
            .arg("644")
            .arg(&hba)
            .status();
        let c = pgtenant::localpg::Cluster::start(&[("hba_file", &hba.to_string_lossy())]).unwrap();
        c.psql(
            "postgres",
            "SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD 'md5-secret'; \
             CREATE ROLE trustuser LOGIN",
        )
        .unwrap();
        c.psql("postgres", "CREATE DATABASE legacy").unwrap();
        c
    })
    .await
    .unwrap();
    let verifier = pgtenant::auth::verifier::ScramVerifier::from_password(b"pw");
    for (user, password) in [("md5user", "password = \"md5-secret\""), ("trustuser", "")] {
        let text = format!(
            r#"[listen]
addr = "127.0.0.1:0"
[shards.legacy]
host = "127.0.0.1"
port = {port}
database = "legacy"
user = "{user}"
{password}
tls = "disable"
[[tenants]]
id = "00000000-0000-0000-0000-0000000000bb"
name = "legacy"
placement = {{ kind = "dedicated", shard = "legacy" }}
[[tenants.users]]
name = "app"
scram = "{verifier}"
"#,
            port = cluster.port
        );
        let snapshot = pgtenant::config::load_str(&text, std::path::Path::new("t.toml")).unwrap();
        let proxy = common::start_proxy(snapshot).await.unwrap();
        let mut c = tokio_postgres::Config::new();
        c.host("127.0.0.1")
            .port(proxy.addr.port())
            .user("app@legacy")
            .password("pw");
        let client = common::connect_with(c).await.unwrap();
        let who: String = client
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, user);
        drop(client);
        proxy.shutdown(std::time::Duration::from_secs(1)).await;
    }
    drop(cluster);
}
