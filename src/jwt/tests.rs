use super::*;

#[test]
fn bracket_depth_counts_nesting_outside_strings() {
    let cases: &[(&str, usize)] = &[
        ("{}", 1),
        (r#"{"a":1}"#, 1),
        (r#"{"a":[1,{"b":[]}]}"#, 4),
        (r#"{"a":"[[[[{{{{"}"#, 1),
        (r#"{"a":"\\\"[[["}"#, 1),
        (r#"{"a":"\\","b":[[]]}"#, 3),
        (r#"{"a":[],"b":[],"c":[]}"#, 2),
        ("", 0),
    ];
    for (json, want) in cases {
        assert_eq!(bracket_depth(json.as_bytes()), *want, "{json}");
    }
}

#[test]
fn deep_segments_are_refused_before_parsing() {
    use base64::Engine as _;
    let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let deep = format!("{{\"a\":{}1{}}}", "[".repeat(20), "]".repeat(20));
    assert!(matches!(
        decode_json_segment(&enc(&deep), 16),
        Err(Failure::TooDeep(16))
    ));
    assert!(decode_json_segment(&enc(&deep), 21).is_ok());
    // 10,000 levels: serde_json would refuse at 128, we refuse at the limit without recursing.
    let abyss = format!("{{\"a\":{}", "[".repeat(10_000));
    assert!(matches!(
        decode_json_segment(&enc(&abyss), 16),
        Err(Failure::TooDeep(16))
    ));
}
