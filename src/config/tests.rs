use std::path::Path;

use super::*;

const MINIMAL: &str = "policy:\n  paths: [policies]\n";

#[test]
fn minimal_config_gets_defaults_and_resolves_paths_against_the_file() {
    let c = Config::from_yaml(MINIMAL, Path::new("/etc/meshauthz/config.yaml")).unwrap();
    assert_eq!(c.server.grpc_addr.to_string(), "0.0.0.0:9191");
    assert_eq!(c.server.http_addr.to_string(), "0.0.0.0:8181");
    assert_eq!(
        c.policy.paths,
        vec![PathBuf::from("/etc/meshauthz/policies")]
    );
    assert_eq!(c.policy.decision, "data.envoy.authz.allow");
    assert!(c.jwt.providers.is_empty());
    assert!(c.decision_log.enabled);
}

#[test]
fn bundled_config_loads() {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(DEFAULT_CONFIG_PATH);
    let c = Config::load(&file).unwrap();
    assert_eq!(c.jwt.providers.len(), 1);
    assert!(c.policy.paths[0].ends_with("../policies"));
}

/// Each bad config names the key path and says what was expected.
#[test]
fn bad_configs_name_file_key_and_expectation() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "policy:\n  paths: [p]\n  decison: x\n",
            "policy.decison",
            "unknown field `decison`, expected one of `paths`, `decision`",
        ),
        ("polcy:\n  paths: [p]\n", "polcy", "unknown field `polcy`"),
        (
            "server:\n  grpc_addr: 9191\npolicy:\n  paths: [p]\n",
            "server.grpc_addr",
            "IP:port",
        ),
        (
            "server:\n  shutdown_grace: soon\npolicy:\n  paths: [p]\n",
            "server.shutdown_grace",
            "duration",
        ),
        (
            "server:\n  max_concurrent_streams: 0\npolicy:\n  paths: [p]\n",
            "server.max_concurrent_streams",
            "at least 1",
        ),
        ("policy:\n  paths: []\n", "policy.paths", "at least one"),
        (
            "policy:\n  paths: [p]\n  decision: envoy.authz.allow\n",
            "policy.decision",
            "rule path",
        ),
        (
            "policy:\n  paths: [p]\n  rego_version: v2\n",
            "policy.rego_version",
            "v1",
        ),
        ("policy:\n  paths: p\n", "policy.paths", "sequence"),
        (
            "policy:\n  paths: [p]\njwt:\n  providers:\n    - name: a\n      issuer: i\n",
            "jwt.providers[0].jwks",
            "uri, file or discovery",
        ),
        (
            "policy:\n  paths: [p]\njwt:\n  providers:\n    - name: a\n      issuer: i\n      jwks: {uri: 'https://x', file: k.json}\n",
            "jwt.providers[0].jwks",
            "exactly one of",
        ),
        (
            "policy:\n  paths: [p]\njwt:\n  providers:\n    - name: a\n      issuer: i\n      jwks: {uri: 'ftp://x'}\n",
            "jwt.providers[0].jwks.uri",
            "http(s) URL",
        ),
        (
            "policy:\n  paths: [p]\njwt:\n  providers:\n    - name: a\n      issuer: i\n      jwks: {uri: 'https://x'}\n      algorithms: [RS256, none]\n",
            "jwt.providers[0].algorithms[1]",
            "expected one of",
        ),
        (
            "policy:\n  paths: [p]\njwt:\n  providers:\n    - name: a\n      issuer: i\n      jwks: {uri: 'https://x'}\n      algorithms: [HS256]\n",
            "jwt.providers[0].algorithms",
            "hmac_secret_file",
        ),
        (
            "policy:\n  paths: [p]\njwt:\n  providers:\n    - {name: a, issuer: i, jwks: {uri: 'https://x'}}\n    - {name: b, issuer: i, jwks: {uri: 'https://y'}}\n",
            "jwt.providers[1].issuer",
            "already used",
        ),
        (
            "policy:\n  paths: [p]\njwt:\n  providers:\n    - {name: a, issuer: i, jwks: {uri: 'https://x', max_stale: forever}}\n",
            "jwt.providers[0].jwks.max_stale",
            "duration",
        ),
        (
            "policy:\n  paths: [p]\njwt:\n  providers:\n    - {name: a, issuer: i, jwks: {uri: 'https://x', max_waiters: 0}}\n",
            "jwt.providers[0].jwks.max_waiters",
            "at least 1",
        ),
        (
            "policy:\n  paths: [p]\ndecision_log:\n  sample_rate: 2\n",
            "decision_log.sample_rate",
            "between 0 and 1",
        ),
        (
            "policy:\n  paths: [p]\ndecision_log:\n  headers: [Authorization]\n",
            "decision_log.headers[0]",
            "never logged",
        ),
        (
            "policy:\n  paths: [p]\nlimits:\n  max_headers: 0\n",
            "limits.max_headers",
            "positive",
        ),
        (
            "policy:\n  paths: [p]\nlimits:\n  max_body_bytes: 0\n",
            "limits.max_body_bytes",
            "positive",
        ),
        (
            "policy:\n  paths: [p]\ndecision_log:\n  headers: [x-request-id, Cookie]\n",
            "decision_log.headers[1]",
            "never logged",
        ),
        (
            "policy:\n  paths: [p]\ndecision_log:\n  headers: [x-request-id, X_Token]\njwt:\n  providers:\n    - name: a\n      issuer: https://a\n      jwks: { uri: \"https://a/jwks\" }\n      from_headers: [{ name: x-token }]\n",
            "decision_log.headers[1]",
            "carries tokens (jwt.providers[0].from_headers)",
        ),
        (
            "policy:\n  paths: [p]\ndecision_log:\n  headers: [authorization]\njwt:\n  providers:\n    - name: a\n      issuer: https://a\n      jwks: { uri: \"https://a/jwks\" }\n",
            "decision_log.headers[0]",
            "never logged",
        ),
    ];
    for (yaml, key, expected) in cases {
        let err = Config::from_yaml(yaml, Path::new("conf/meshauthz.yaml")).unwrap_err();
        let Error::Invalid {
            file,
            key: got_key,
            message,
        } = &err
        else {
            panic!("{yaml}: unexpected error {err}");
        };
        assert_eq!(file, Path::new("conf/meshauthz.yaml"));
        assert_eq!(got_key, key, "{yaml}\n{err}");
        assert!(
            message.contains(expected),
            "{yaml}\nmessage: {message}\nwant: {expected}"
        );
        let rendered = err.to_string();
        assert!(rendered.starts_with("conf/meshauthz.yaml: "), "{rendered}");
    }
}

#[test]
fn yaml_syntax_errors_carry_the_line() {
    let err = Config::from_yaml("policy:\n  paths: [p\n", Path::new("c.yaml")).unwrap_err();
    assert!(err.to_string().contains("line"), "{err}");
}
