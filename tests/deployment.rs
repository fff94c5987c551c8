//! The deployment files in `docker/` cannot run here; this checks that they parse, that they
//! agree with each other (ports, probes, scrape targets) and that the configurations they
//! carry validate. That the Grafana dashboard's metric names exist is checked against a live
//! scrape in `tests/operator.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use yaml_rust2::{Yaml, YamlLoader};

fn docker(file: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docker")
            .join(file),
    )
    .unwrap_or_else(|e| panic!("docker/{file}: {e}"))
}

fn yaml(file: &str) -> Vec<Yaml> {
    YamlLoader::load_from_str(&docker(file)).unwrap_or_else(|e| panic!("docker/{file}: {e}"))
}

/// The strings of a YAML list.
fn strings(list: &Yaml) -> Vec<&str> {
    list.as_vec()
        .map(|v| v.iter().filter_map(Yaml::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn compose_runs_prometheus_and_grafana_on_pgtenant() {
    let compose = &yaml("compose.yaml")[0];
    let services = &compose["services"];
    for s in ["pgtenant", "prometheus", "grafana", "shard-a", "shard-b"] {
        assert!(!services[s].is_badvalue(), "service {s} in compose.yaml");
    }
    let config =
        pgtenant::config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("docker/pgtenant.toml"))
            .unwrap();
    let http = config
        .admin
        .http
        .expect("admin.http in docker/pgtenant.toml");
    let ports = strings(&services["pgtenant"]["ports"]);
    assert!(
        ports.contains(&format!("{0}:{0}", http.port()).as_str()),
        "{ports:?}"
    );

    let prometheus = &yaml("prometheus.yml")[0];
    let job = &prometheus["scrape_configs"][0];
    assert_eq!(job["metrics_path"].as_str(), Some("/metrics"));
    assert_eq!(
        job["static_configs"][0]["targets"][0].as_str(),
        Some(format!("pgtenant:{}", http.port()).as_str())
    );
    let mounted = strings(&services["prometheus"]["volumes"]);
    assert!(
        mounted.iter().any(|v| v.starts_with("./prometheus.yml:")),
        "{mounted:?}"
    );

    // Grafana: the data source and the dashboard provider it mounts exist and parse.
    for v in services["grafana"]["volumes"].as_vec().unwrap() {
        let file = v
            .as_str()
            .unwrap()
            .split(':')
            .next()
            .unwrap()
            .trim_start_matches("./");
        let text = docker(file);
        if file.ends_with(".json") {
            serde_json::from_str::<serde_json::Value>(&text).unwrap();
        } else {
            YamlLoader::load_from_str(&text).unwrap();
        }
    }
    assert_eq!(
        yaml("grafana/datasource.yaml")[0]["datasources"][0]["url"].as_str(),
        Some("http://prometheus:9090")
    );
}

#[test]
fn kubernetes_runs_two_replicas_on_one_catalog_with_readiness_on_readyz() {
    let docs = yaml("k8s/pgtenant.yaml");
    let kind = |k: &str| {
        docs.iter()
            .find(|d| d["kind"].as_str() == Some(k))
            .unwrap_or_else(|| panic!("a {k} in k8s/pgtenant.yaml"))
    };
    let deployment = kind("Deployment");
    assert_eq!(deployment["spec"]["replicas"].as_i64(), Some(2));
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let readiness = &container["readinessProbe"]["httpGet"];
    assert_eq!(readiness["path"].as_str(), Some("/readyz"));
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    let port_of = |name: &str| {
        container["ports"]
            .as_vec()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_i64())
            .unwrap_or_else(|| panic!("container port {name}"))
    };
    let metrics_port = port_of(readiness["port"].as_str().unwrap());
    let postgres_port = port_of("postgres");

    // The ConfigMap's configuration validates (the values the environment gives in the pod
    // filled in), and agrees with the ports and the catalog Secret.
    let text = kind("ConfigMap")["data"]["pgtenant.toml"].as_str().unwrap();
    let env: Vec<&str> = container["env"]
        .as_vec()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert!(
        env.contains(&"PGTENANT_CATALOG_DSN") && env.contains(&"PGTENANT_ADVERTISE"),
        "{env:?}"
    );
    let resolved = text
        .replace(
            "dsn_env = \"PGTENANT_CATALOG_DSN\"",
            "dsn = \"postgresql://pgtenant_catalog@catalog-db/pgtenant\"",
        )
        .replace(
            "advertise_env = \"PGTENANT_ADVERTISE\"",
            "advertise = \"10.0.0.7:6432\"",
        );
    let config = pgtenant::config::load_str(&resolved, Path::new("pgtenant.toml")).unwrap();
    assert_eq!(
        config.catalog.source,
        pgtenant::config::CatalogSource::Postgres
    );
    assert!(config.peering.is_some());
    assert_eq!(i64::from(config.listen.addr.port()), postgres_port);
    assert_eq!(i64::from(config.admin.http.unwrap().port()), metrics_port);
    // Pods get longer to stop than pgtenant's grace period.
    let grace = pod["terminationGracePeriodSeconds"].as_i64().unwrap();
    assert!(config.listen.shutdown_grace.as_secs() as i64 + 3 < grace);

    let service = kind("Service");
    assert_eq!(
        service["spec"]["selector"]["app"].as_str(),
        deployment["spec"]["selector"]["matchLabels"]["app"].as_str()
    );
    assert!(
        kind("Secret")["stringData"]["dsn"]
            .as_str()
            .unwrap()
            .starts_with("postgresql://")
    );
}
