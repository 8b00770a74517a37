use super::*;

fn v(json: &str) -> Value {
    Value::from_json_str(json).unwrap()
}

#[test]
fn decision_values_table() {
    // (policy value as JSON, allowed, status, reason)
    let cases: &[(&str, bool, u16, &str)] = &[
        ("true", true, 200, "policy_allowed"),
        ("false", false, 403, "policy_denied"),
        (r#"{"allowed": true}"#, true, 200, "policy_allowed"),
        (r#"{"allowed": false}"#, false, 403, "policy_denied"),
        (
            r#"{"allowed": false, "http_status": 401}"#,
            false,
            401,
            "policy_denied",
        ),
        (
            r#"{"allowed": true, "http_status": 401}"#,
            true,
            200,
            "policy_allowed",
        ),
        (
            r#"{"allowed": false, "http_status": 42}"#,
            false,
            500,
            "invalid_decision",
        ),
        (
            r#"{"allowed": false, "http_status": "403"}"#,
            false,
            500,
            "invalid_decision",
        ),
        (r#"{"allowed": "true"}"#, false, 500, "invalid_decision"),
        // A denial never carries a status read as success or as interim.
        (
            r#"{"allowed": false, "http_status": 200}"#,
            false,
            500,
            "invalid_decision",
        ),
        (
            r#"{"allowed": false, "http_status": 204}"#,
            false,
            500,
            "invalid_decision",
        ),
        (
            r#"{"allowed": false, "http_status": 100}"#,
            false,
            500,
            "invalid_decision",
        ),
        (
            r#"{"allowed": false, "http_status": 101}"#,
            false,
            500,
            "invalid_decision",
        ),
        (
            r#"{"allowed": false, "http_status": 299}"#,
            false,
            500,
            "invalid_decision",
        ),
        (
            r#"{"allowed": false, "http_status": 302}"#,
            false,
            302,
            "policy_denied",
        ),
        (
            r#"{"allowed": false, "http_status": 599}"#,
            false,
            599,
            "policy_denied",
        ),
        // Header values no hop could carry are the policy's bug, not a silent drop.
        (
            r#"{"allowed": true, "headers": {"x-a": "a\r\nx-b: c"}}"#,
            false,
            500,
            "invalid_decision",
        ),
        (
            r#"{"allowed": true, "headers": {"x-a": "a\u0000"}}"#,
            false,
            500,
            "invalid_decision",
        ),
        (
            r#"{"allowed": true, "headers": {"x-a": "\u007f"}}"#,
            false,
            500,
            "invalid_decision",
        ),
        (
            r#"{"allowed": true, "headers": {"x-a": ["ok", "b\n"]}}"#,
            false,
            500,
            "invalid_decision",
        ),
        (
            r#"{"allowed": true, "headers": {"x a": "v"}}"#,
            false,
            500,
            "invalid_decision",
        ),
        (
            r#"{"allowed": true, "headers": {"": "v"}}"#,
            false,
            500,
            "invalid_decision",
        ),
        (
            r#"{"allowed": true, "request_headers_to_remove": ["x:y"]}"#,
            false,
            500,
            "invalid_decision",
        ),
        (
            r#"{"allowed": true, "headers": {"x-a": "caf\u00e9 \t ok"}}"#,
            true,
            200,
            "policy_allowed",
        ),
        (r#"{"headers": {}}"#, false, 500, "invalid_decision"),
        (
            r#"{"allowed": true, "headers": "x"}"#,
            false,
            500,
            "invalid_decision",
        ),
        (
            r#"{"allowed": true, "headers": {"x": 1}}"#,
            false,
            500,
            "invalid_decision",
        ),
        (
            r#"{"allowed": true, "headers": {"x": ["a", 1]}}"#,
            false,
            500,
            "invalid_decision",
        ),
        (
            r#"{"allowed": false, "body": 1}"#,
            false,
            500,
            "invalid_decision",
        ),
        (
            r#"{"allowed": true, "dynamic_metadata": []}"#,
            false,
            500,
            "invalid_decision",
        ),
        (
            r#"{"allowed": true, "request_headers_to_remove": "x"}"#,
            false,
            500,
            "invalid_decision",
        ),
        ("1", false, 500, "invalid_decision"),
        (r#""allow""#, false, 500, "invalid_decision"),
        ("null", false, 500, "invalid_decision"),
        ("[]", false, 500, "invalid_decision"),
    ];
    for (json, allowed, status, reason) in cases {
        let d = Decision::from_policy(&v(json));
        assert_eq!(
            (
                d.allowed,
                if d.allowed { 200 } else { d.status },
                d.reason.category
            ),
            (*allowed, *status, *reason),
            "{json}: {}",
            d.reason.detail
        );
    }
    let undefined = Decision::from_policy(&Value::Undefined);
    assert_eq!((undefined.allowed, undefined.status), (false, 403));
    assert_eq!(undefined.reason.category, "policy_undefined");
}

#[test]
fn headers_accept_objects_arrays_and_multi_values() {
    let d = Decision::from_policy(&v(
        r#"{"allowed": true, "headers": [{"x-a": "1"}, {"x-b": ["2", "3"]}, {"x-a": "4"}]}"#,
    ));
    let got: Vec<(&str, &str, bool)> = d
        .headers
        .iter()
        .map(|h| (h.name.as_str(), h.value.as_str(), h.append))
        .collect();
    assert_eq!(
        got,
        vec![
            ("x-a", "1", false),
            ("x-b", "2", false),
            ("x-b", "3", true),
            ("x-a", "4", true)
        ]
    );
}

#[test]
fn full_object_decision() {
    let d = Decision::from_policy(&v(r#"{
        "allowed": false, "http_status": 429, "body": "slow down",
        "headers": {"retry-after": "5"},
        "dynamic_metadata": {"k": "v"}
    }"#));
    assert!(!d.allowed);
    assert_eq!(d.status, 429);
    assert_eq!(d.body, "slow down");
    assert_eq!(d.headers.len(), 1);
    assert!(d.dynamic_metadata.is_some());
}
