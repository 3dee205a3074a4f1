//! The deployment files stay true to the binaries: docker-compose.yml's services, ports,
//! environment names and health checks, and the Dockerfile's stages. No Docker engine runs
//! here, so the files are parsed and checked against the binaries' own `--help`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use integration_tests::process::binary;
use serde_yaml_ng::Value;

fn repo_file(name: &str) -> String {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::read_to_string(root.join(name)).unwrap_or_else(|e| panic!("read {name}: {e}"))
}

/// The environment variables a binary's `--help` documents.
fn documented_env(binary_name: &str) -> BTreeSet<String> {
    let out = Command::new(binary(binary_name))
        .arg("--help")
        .output()
        .expect("--help runs");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    help.split("[env: ")
        .skip(1)
        .filter_map(|rest| rest.split(['=', ']']).next())
        .map(str::to_owned)
        .collect()
}

fn service<'a>(compose: &'a Value, name: &str) -> &'a Value {
    compose
        .get("services")
        .and_then(|s| s.get(name))
        .unwrap_or_else(|| panic!("service {name} missing from docker-compose.yml"))
}

fn env_of(service: &Value) -> Vec<(String, String)> {
    let env = service
        .get("environment")
        .and_then(Value::as_mapping)
        .expect("environment mapping");
    env.iter()
        .map(|(k, v)| {
            let value = match v {
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                other => panic!("unexpected env value {other:?}"),
            };
            (k.as_str().expect("env name").to_owned(), value)
        })
        .collect()
}

fn get<'a>(env: &'a [(String, String)], key: &str) -> &'a str {
    env.iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("{key} not set"))
}

fn port_of(addr: &str) -> &str {
    addr.rsplit_once(':').map(|(_, p)| p).expect("HOST:PORT")
}

#[test]
fn compose_matches_the_binaries_and_the_dockerfile() {
    let compose: Value =
        serde_yaml_ng::from_str(&repo_file("docker-compose.yml")).expect("valid YAML");
    let dockerfile = repo_file("Dockerfile");
    let stages: BTreeSet<String> = dockerfile
        .lines()
        .filter(|l| l.starts_with("FROM "))
        .filter_map(|l| l.split(" AS ").nth(1))
        .map(|s| s.trim().to_owned())
        .collect();

    let names: BTreeSet<String> = compose
        .get("services")
        .and_then(Value::as_mapping)
        .expect("services")
        .keys()
        .map(|k| k.as_str().expect("name").to_owned())
        .collect();
    assert_eq!(
        names,
        ["billing-a", "billing-b", "directory", "postgres"]
            .map(String::from)
            .into(),
    );

    // PostgreSQL keeps its data in a named volume and has a health check.
    let postgres = service(&compose, "postgres");
    let volumes = postgres
        .get("volumes")
        .and_then(Value::as_sequence)
        .expect("volumes");
    let named: Vec<&str> = volumes
        .iter()
        .filter_map(Value::as_str)
        .filter_map(|v| v.split(':').next())
        .collect();
    for volume in &named {
        assert!(
            compose
                .get("volumes")
                .and_then(|v| v.get(*volume))
                .is_some(),
            "volume {volume} is declared at the top level"
        );
    }
    assert!(postgres.get("healthcheck").is_some());

    let mut databases = BTreeSet::new();
    let mut host_ports = BTreeSet::new();
    for (name, binary_name, prefix, container_port) in [
        ("directory", "directory-svc", "DIRECTORY_", "50051"),
        ("billing-a", "billing-svc", "BILLING_", "50052"),
        ("billing-b", "billing-svc", "BILLING_", "50052"),
    ] {
        let svc = service(&compose, name);
        let target = svc
            .get("build")
            .and_then(|b| b.get("target"))
            .and_then(Value::as_str)
            .expect("build target");
        assert_eq!(target, binary_name, "{name} builds its own binary");
        assert!(
            stages.contains(target),
            "Dockerfile has a stage {target}: {stages:?}"
        );

        // Every environment variable is one the binary reads.
        let env = env_of(svc);
        let documented = documented_env(binary_name);
        for (key, _) in &env {
            assert!(key.starts_with(prefix), "{name}: {key}");
            assert!(
                documented.contains(key),
                "{name}: {key} is not a flag of {binary_name}: {documented:?}"
            );
        }

        // It listens on all interfaces at the port it publishes.
        let listen = get(&env, &format!("{prefix}LISTEN"));
        assert!(
            listen.starts_with("0.0.0.0:"),
            "{name} listens on all interfaces"
        );
        assert_eq!(port_of(listen), container_port);
        let ports = svc
            .get("ports")
            .and_then(Value::as_sequence)
            .expect("ports");
        for port in ports.iter().filter_map(Value::as_str) {
            let (host, container) = port.split_once(':').expect("HOST:CONTAINER");
            assert_eq!(
                container, container_port,
                "{name} publishes its listen port"
            );
            assert!(
                host_ports.insert(host.to_owned()),
                "host port {host} used twice"
            );
        }

        // Its database is on the postgres service.
        let url = get(&env, &format!("{prefix}DATABASE_URL"));
        assert!(url.starts_with("postgres://"), "{name}: {url}");
        assert!(
            url.contains("@postgres:5432/"),
            "{name} uses the postgres service: {url}"
        );
        databases.insert((
            binary_name,
            url.rsplit('/').next().expect("db name").to_owned(),
        ));

        // The health check is the binary's own gRPC probe, at the path the image installs.
        let test: Vec<&str> = svc
            .get("healthcheck")
            .and_then(|h| h.get("test"))
            .and_then(Value::as_sequence)
            .expect("healthcheck.test")
            .iter()
            .filter_map(Value::as_str)
            .collect();
        let installed = format!("/usr/local/bin/{binary_name}");
        assert_eq!(test, vec!["CMD", installed.as_str(), "--health-probe"]);
        assert!(dockerfile.contains(&format!("ENTRYPOINT [\"{installed}\"]")));

        if binary_name == "billing-svc" {
            let directory_url = get(&env, "BILLING_DIRECTORY_URL");
            assert_eq!(
                directory_url, "http://directory:50051",
                "billing reaches the directory service"
            );
            let depends = svc
                .get("depends_on")
                .and_then(Value::as_mapping)
                .expect("depends_on");
            assert!(depends.contains_key("directory") && depends.contains_key("postgres"));
        }
    }
    // Each service owns its own database; billing replicas share theirs.
    let dbs: BTreeSet<&str> = databases.iter().map(|(_, db)| db.as_str()).collect();
    assert_eq!(dbs.len(), 2, "{databases:?}");
}

#[test]
fn help_documents_every_flag_with_its_environment_variable() {
    for (binary_name, expected) in [
        (
            "directory-svc",
            &["DIRECTORY_LISTEN", "DIRECTORY_DATABASE_URL"][..],
        ),
        (
            "billing-svc",
            &[
                "BILLING_LISTEN",
                "BILLING_DATABASE_URL",
                "BILLING_DIRECTORY_URL",
                "BILLING_DIRECTORY_TIMEOUT_MS",
            ][..],
        ),
    ] {
        let documented = documented_env(binary_name);
        for name in expected {
            assert!(
                documented.contains(*name),
                "{binary_name} --help lists {name}: {documented:?}"
            );
        }
        // Every flag but --help and --version names its environment variable.
        let out = Command::new(binary(binary_name))
            .arg("--help")
            .output()
            .expect("--help runs");
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut blocks = help.split("\n      --").skip(1).peekable();
        assert!(blocks.peek().is_some(), "{help}");
        for block in blocks {
            let flag = block.split_whitespace().next().unwrap_or_default();
            if flag == "help" || flag == "version" {
                continue;
            }
            assert!(
                block.contains("[env: "),
                "{binary_name} --{flag} has no environment variable"
            );
        }
    }
}
