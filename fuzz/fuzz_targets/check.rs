//! The whole path: protojson CheckRequest bytes → attributes → input → the bundled policy →
//! decision. Never panics; every outcome is an allow or an explicit denial.
#![no_main]
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use meshauthz::app::App;
use meshauthz::config::Config;
use meshauthz::request::CheckRequestJson;

fn app() -> &'static (Arc<App>, tokio::runtime::Runtime) {
    static A: OnceLock<(Arc<App>, tokio::runtime::Runtime)> = OnceLock::new();
    A.get_or_init(|| {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut config = Config::load(root.join("config/meshauthz.yaml")).expect("bundled config");
        config.decision_log.enabled = false;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("rt");
        let app = App::build(config).expect("app");
        (app, rt)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<CheckRequestJson>(data) else { return };
    let (app, rt) = app();
    let checked = rt.block_on(app.authz.check(req.attributes));
    let d = checked.decision;
    assert!(d.allowed || (400..=599).contains(&d.status), "{d:?}");
});
