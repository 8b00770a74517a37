//! Finding policy files on disk and reading them into one consistent [`Sources`] set.
//!
//! Layout rules (the ones `opa run DIR` / `opa eval -d DIR` use for a directory, so an OPA-Envoy
//! policy directory loads unchanged; an OPA *bundle* reads only files named `data.json` /
//! `data.yaml`, which these rules also cover):
//! - every `*.rego` file is a module; `*_test.rego` files only when tests are requested;
//! - every `*.json`, `*.yaml` or `*.yml` file is a data document mounted at `data.<dir>`, where
//!   `<dir>` is the file's directory relative to the configured root, one key per component
//!   (`policies/shop/roles/data.json` under root `policies` lands at `data.shop.roles`);
//! - names starting with `.` are skipped: that covers editor droppings and the `..data` /
//!   `..2024_…` directories behind a Kubernetes ConfigMap volume, whose visible entries are
//!   symlinks into them.

use std::path::{Path, PathBuf};

use regorus::{Engine, Value};

use super::Error;

/// A module read from disk.
#[derive(Debug, Clone)]
pub struct Module {
    pub path: PathBuf,
    pub text: String,
}

/// A data document read from disk, with the `data` path it is mounted at.
#[derive(Debug, Clone)]
pub struct DataDoc {
    pub path: PathBuf,
    pub mount: Vec<String>,
    pub value: Value,
}

/// Everything a policy snapshot is compiled from.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub modules: Vec<Module>,
    pub data: Vec<DataDoc>,
    /// Short content hash over every file's path and bytes.
    pub revision: String,
}

impl Sources {
    /// Adds the modules and data to an engine (parsing the modules).
    pub fn add_to(&self, engine: &mut Engine) -> Result<(), Error> {
        for m in &self.modules {
            engine
                .add_policy(m.path.display().to_string(), m.text.clone())
                .map_err(|e| Error::Compile(super::compact(&e.to_string())))?;
        }
        for d in &self.data {
            let mut value = d.value.clone();
            for key in d.mount.iter().rev() {
                let mut obj = Value::new_object();
                if let Ok(map) = obj.as_object_mut() {
                    map.insert(Value::from(key.as_str()), value);
                }
                value = obj;
            }
            engine.add_data(value).map_err(|e| Error::Data {
                path: d.path.clone(),
                message: e.to_string(),
            })?;
        }
        Ok(())
    }
}

/// Reads every policy file under `roots`. With `include_tests`, `*_test.rego` modules too.
pub fn collect(roots: &[PathBuf], include_tests: bool) -> Result<Sources, Error> {
    let mut files = Vec::new();
    for root in roots {
        let meta = std::fs::metadata(root).map_err(|error| Error::Read {
            path: root.clone(),
            error,
        })?;
        if meta.is_dir() {
            walk(root, root, &mut files)?;
        } else {
            files.push((root.clone(), Vec::new()));
        }
    }
    files.sort();

    let mut sources = Sources::default();
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for (path, mount) in files {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let kind = if name.ends_with("_test.rego") {
            if !include_tests {
                continue;
            }
            Kind::Module
        } else if name.ends_with(".rego") {
            Kind::Module
        } else if name.ends_with(".json") {
            Kind::Json
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            Kind::Yaml
        } else {
            continue;
        };
        let text = std::fs::read_to_string(&path).map_err(|error| Error::Read {
            path: path.clone(),
            error,
        })?;
        digest.update(path.to_string_lossy().as_bytes());
        digest.update(&[0]);
        digest.update(text.as_bytes());
        digest.update(&[0]);
        let data_err = |message: String| Error::Data {
            path: path.clone(),
            message,
        };
        match kind {
            Kind::Module => sources.modules.push(Module { path, text }),
            Kind::Json => {
                let value = Value::from_json_str(&text).map_err(|e| data_err(e.to_string()))?;
                sources.data.push(DataDoc { path, mount, value });
            }
            Kind::Yaml => {
                let value = Value::from_yaml_str(&text).map_err(|e| data_err(e.to_string()))?;
                sources.data.push(DataDoc { path, mount, value });
            }
        }
    }
    sources.revision = digest
        .finish()
        .as_ref()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(sources)
}

enum Kind {
    Module,
    Json,
    Yaml,
}

/// Depth-first walk collecting `(file, mount components)`; follows symlinks, skips dot names.
fn walk(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, Vec<String>)>) -> Result<(), Error> {
    let read_err = |error| Error::Read {
        path: dir.to_path_buf(),
        error,
    };
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let entry = entry.map_err(read_err)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // metadata() follows symlinks, as ConfigMap volumes need.
        let meta = std::fs::metadata(&path).map_err(|error| Error::Read {
            path: path.clone(),
            error,
        })?;
        if meta.is_dir() {
            walk(root, &path, out)?;
        } else if meta.is_file() {
            let mount = path
                .parent()
                .and_then(|p| p.strip_prefix(root).ok())
                .map(|rel| {
                    rel.components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            out.push((path, mount));
        }
    }
    Ok(())
}
