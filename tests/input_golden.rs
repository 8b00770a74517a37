//! The policy input built from CheckRequests captured from a real Envoy 1.40 (protojson), compared
//! with golden files. Regenerate with `UPDATE_GOLDEN=1 cargo test --test input_golden` and review
//! the diff.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::repo;
use meshauthz::identity::SpiffeId;
use meshauthz::input::{self, Extras};
use meshauthz::request::CheckRequestJson;

#[test]
fn captured_envoy_requests_match_golden_inputs() {
    let fixture =
        std::fs::read_to_string(repo().join("tests/fixtures/envoy-1.40-checkrequests.jsonl"))
            .unwrap();
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    let mut count = 0;
    for (i, line) in fixture.lines().enumerate() {
        let req: CheckRequestJson = serde_json::from_str(line).unwrap();
        let attrs = req.attributes;
        let http = attrs.http().unwrap();
        let target = meshauthz::path::parse(&http.path).unwrap();
        let peer = attrs
            .source_principal()
            .and_then(|p| SpiffeId::parse(p).ok());
        let body = input::parsed_body(http, &meshauthz::limits::Limits::default());
        let doc = input::document(
            &attrs,
            Extras {
                target: Some(&target),
                peer: peer.as_ref(),
                jwt: None,
                parsed_body: body.parsed,
                truncated_body: body.truncated,
            },
        );
        let got: serde_json::Value = serde_json::from_str(&doc.to_json_str().unwrap()).unwrap();

        // The attributes pass through exactly as Envoy sent them.
        let sent: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            got["attributes"], sent["attributes"],
            "request {i}: attributes differ"
        );

        let golden = repo().join(format!("tests/golden/input-{i}.json"));
        let pretty = serde_json::to_string_pretty(&got).unwrap() + "\n";
        if update {
            std::fs::create_dir_all(golden.parent().unwrap()).unwrap();
            std::fs::write(&golden, &pretty).unwrap();
        }
        let want = std::fs::read_to_string(&golden)
            .unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", golden.display()));
        assert_eq!(
            pretty,
            want,
            "request {i} differs from {}",
            golden.display()
        );
        count += 1;
    }
    assert_eq!(count, 5);
}
