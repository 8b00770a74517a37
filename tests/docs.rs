//! The docs must show the Envoy configuration the end-to-end tests actually use, and every
//! page they link to must exist.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::repo;

#[test]
fn docs_show_the_envoy_config_the_e2e_tests_use() {
    let readme = std::fs::read_to_string(repo().join("docs/envoy-istio.md")).unwrap();
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
        "docs/envoy-istio.md lacks lines the e2e tests use:\n{}",
        missing.join("\n")
    );
}

#[test]
fn docs_istio_section_matches_the_istio_files() {
    let readme = std::fs::read_to_string(repo().join("docs/envoy-istio.md")).unwrap();
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
        "docs/envoy-istio.md lacks lines of the Istio files:\n{}",
        missing.join("\n")
    );
}

/// Relative links in the README and docs/ resolve to files that exist; the README stays short.
#[test]
fn every_linked_page_exists() {
    let mut pages = vec![repo().join("README.md")];
    for e in std::fs::read_dir(repo().join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            pages.push(p);
        }
    }
    let mut broken = Vec::new();
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        for target in text.split("](").skip(1).filter_map(|r| r.split(')').next()) {
            let path = target.split('#').next().unwrap();
            if path.is_empty() || path.contains("://") || path.starts_with("mailto:") {
                continue;
            }
            if !page.parent().unwrap().join(path).exists() {
                broken.push(format!("{}: {target}", page.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
    let size = std::fs::metadata(repo().join("README.md")).unwrap().len();
    assert!(
        size < 12 * 1024,
        "README.md is {size} bytes; move detail to docs/"
    );
}
