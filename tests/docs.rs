//! The README must show the Envoy configuration the end-to-end tests actually use.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::repo;

#[test]
fn readme_shows_the_envoy_config_the_e2e_tests_use() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let readme_lines: Vec<&str> = readme.lines().map(str::trim).collect();
    let envoy = std::fs::read_to_string(repo().join("tests/e2e/envoy.yaml")).unwrap();
    // The ext_authz filter's settings in the test config.
    let filter: Vec<&str> = envoy
        .lines()
        .map(str::trim)
        .filter(|l| {
            [
                "transport_api_version",
                "failure_mode_allow",
                "include_peer_certificate",
                "status_on_error",
            ]
            .iter()
            .any(|k| l.starts_with(k))
        })
        .collect();
    assert_eq!(filter.len(), 4);
    let mut missing = Vec::new();
    for l in filter {
        if !readme_lines.contains(&l) {
            missing.push(format!("tests/e2e/envoy.yaml: {l}"));
        }
    }
    for file in ["authz-grpc.yaml", "authz-http.yaml", "meshauthz-tls.yaml"] {
        let text = std::fs::read_to_string(repo().join("tests/e2e").join(file)).unwrap();
        for l in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            if !readme_lines.contains(&l) {
                missing.push(format!("tests/e2e/{file}: {l}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "README lacks lines the e2e tests use:\n{}",
        missing.join("\n")
    );
}

#[test]
fn readme_deploy_section_matches_the_istio_files() {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let readme_lines: Vec<&str> = readme.lines().map(str::trim).collect();
    let mut missing = Vec::new();
    for file in ["extension-provider.yaml", "authorization-policy.yaml"] {
        let text = std::fs::read_to_string(repo().join("k8s/istio").join(file)).unwrap();
        for l in text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            if !readme_lines.contains(&l) {
                missing.push(format!("k8s/istio/{file}: {l}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "README lacks lines of the Istio files:\n{}",
        missing.join("\n")
    );
}
