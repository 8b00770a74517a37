//! Decisions: what the policy's value means, with OPA-Envoy's semantics, and every way a request
//! can be denied before or around the policy.
//!
//! The decision rule's value is either a boolean or an object
//! `{allowed, headers, response_headers_to_add, request_headers_to_remove, http_status, body,
//! dynamic_metadata, query_parameters_to_set, query_parameters_to_remove}`. Anything else is a
//! policy bug and is denied (fail closed): undefined → 403, a badly typed value or an evaluation
//! error → 500, so a policy bug is visible as a server error and never as an allow.

use regorus::Value;

/// Status used when the policy denies without saying how.
pub const DEFAULT_DENY_STATUS: u16 = 403;
/// Status used when the policy itself is broken (runtime error, ill-typed decision).
pub const POLICY_ERROR_STATUS: u16 = 500;
/// The statuses a denial may carry: never one that Envoy or a client reads as success (2xx) or
/// as an interim response (1xx).
pub const DENIAL_STATUSES: std::ops::RangeInclusive<u64> = 300..=599;

/// Why a decision came out the way it did. `category` is a fixed label (metrics, log filters);
/// `detail` is a human explanation that never contains a token or secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reason {
    pub category: &'static str,
    pub detail: String,
}

impl Reason {
    pub fn new(category: &'static str, detail: impl Into<String>) -> Reason {
        Reason {
            category,
            detail: detail.into(),
        }
    }
}

/// A header to set. `append: false` overwrites any value the request already carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub value: String,
    pub append: bool,
}

/// The answer to one Check, independent of protobuf.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// HTTP status for a denial (ignored on allow).
    pub status: u16,
    /// On allow: headers added to the upstream request. On deny: headers sent to the client.
    pub headers: Vec<Header>,
    /// On allow: headers added to the response the client receives.
    pub response_headers_to_add: Vec<Header>,
    /// On allow: request headers removed before the upstream sees them.
    pub request_headers_to_remove: Vec<String>,
    pub query_parameters_to_set: Vec<(String, String)>,
    pub query_parameters_to_remove: Vec<String>,
    /// Response body for a denial.
    pub body: String,
    /// Passed to Envoy as dynamic metadata (an object).
    pub dynamic_metadata: Option<Value>,
    pub reason: Reason,
}

impl Decision {
    pub fn allow(reason: Reason) -> Decision {
        Decision {
            allowed: true,
            status: 200,
            headers: Vec::new(),
            response_headers_to_add: Vec::new(),
            request_headers_to_remove: Vec::new(),
            query_parameters_to_set: Vec::new(),
            query_parameters_to_remove: Vec::new(),
            body: String::new(),
            dynamic_metadata: None,
            reason,
        }
    }

    pub fn deny(status: u16, reason: Reason) -> Decision {
        Decision {
            allowed: false,
            status,
            ..Decision::allow(reason)
        }
    }

    /// A malformed request (400).
    pub fn bad_request(detail: impl Into<String>) -> Decision {
        Decision::deny(400, Reason::new("bad_request", detail))
    }

    /// Interprets the decision rule's value.
    pub fn from_policy(value: &Value) -> Decision {
        match value {
            Value::Undefined => Decision::deny(
                DEFAULT_DENY_STATUS,
                Reason::new("policy_undefined", "decision rule is undefined"),
            ),
            Value::Bool(true) => Decision::allow(Reason::new("policy_allowed", "allowed")),
            Value::Bool(false) => Decision::deny(
                DEFAULT_DENY_STATUS,
                Reason::new("policy_denied", "denied by policy"),
            ),
            Value::Object(_) => from_object(value).unwrap_or_else(invalid),
            other => invalid(format!(
                "decision must be a boolean or an object, got {}",
                type_name(other)
            )),
        }
    }

    /// `headers` with the values of a repeated name folded into one (`a,b`; `a; b` for
    /// `cookie`), first-seen order kept. Envoy applies ext_authz header options in an order of
    /// its own: with one overwrite and several appends for a name, the upstream got only the
    /// last value. One overwriting header per name is applied exactly, and it is what a
    /// repeated request header means (RFC 9110 5.3).
    pub fn joined_headers(&self) -> Vec<Header> {
        let mut out: Vec<Header> = Vec::with_capacity(self.headers.len());
        for h in &self.headers {
            match out
                .iter_mut()
                .find(|o| o.name.eq_ignore_ascii_case(&h.name))
            {
                Some(o) => {
                    o.value.push_str(if h.name.eq_ignore_ascii_case("cookie") {
                        "; "
                    } else {
                        ","
                    });
                    o.value.push_str(&h.value);
                }
                None => out.push(Header {
                    name: h.name.clone(),
                    value: h.value.clone(),
                    append: false,
                }),
            }
        }
        out
    }

    /// A policy evaluation error (500).
    pub fn policy_error(detail: impl Into<String>) -> Decision {
        Decision::deny(POLICY_ERROR_STATUS, Reason::new("policy_error", detail))
    }
}

fn invalid(detail: String) -> Decision {
    Decision::deny(POLICY_ERROR_STATUS, Reason::new("invalid_decision", detail))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Set(_) => "set",
        Value::Object(_) => "object",
        Value::Undefined => "undefined",
    }
}

fn field<'a>(obj: &'a Value, key: &str) -> Option<&'a Value> {
    obj.as_object()
        .ok()
        .and_then(|m| m.get(&Value::from(key)))
        .filter(|v| !matches!(v, Value::Undefined))
}

fn from_object(obj: &Value) -> Result<Decision, String> {
    let allowed = match field(obj, "allowed") {
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(format!(
                "\"allowed\" must be a boolean, got {}",
                type_name(other)
            ));
        }
        None => return Err("decision object has no \"allowed\" key".into()),
    };
    let mut d = if allowed {
        Decision::allow(Reason::new("policy_allowed", "allowed"))
    } else {
        Decision::deny(
            DEFAULT_DENY_STATUS,
            Reason::new("policy_denied", "denied by policy"),
        )
    };
    if let Some(v) = field(obj, "headers") {
        d.headers = headers("headers", v)?;
    }
    if let Some(v) = field(obj, "response_headers_to_add") {
        d.response_headers_to_add = headers("response_headers_to_add", v)?;
    }
    if let Some(v) = field(obj, "request_headers_to_remove") {
        d.request_headers_to_remove = strings("request_headers_to_remove", v)?;
        if let Some(bad) = d
            .request_headers_to_remove
            .iter()
            .find(|n| !is_header_name(n))
        {
            return Err(format!(
                "request_headers_to_remove: {bad:?} is not a valid header name"
            ));
        }
    }
    if let Some(v) = field(obj, "query_parameters_to_remove") {
        d.query_parameters_to_remove = strings("query_parameters_to_remove", v)?;
    }
    if let Some(v) = field(obj, "query_parameters_to_set") {
        d.query_parameters_to_set = headers("query_parameters_to_set", v)?
            .into_iter()
            .map(|h| (h.name, h.value))
            .collect();
    }
    if let Some(v) = field(obj, "http_status") {
        let code = v
            .as_u64()
            .ok()
            .filter(|c| (100..=599).contains(c))
            .ok_or_else(|| "\"http_status\" must be an HTTP status code (100-599)".to_string())?;
        if !allowed {
            // Envoy's http_service reads 200 as an allow, and clients read 1xx as interim and
            // 2xx as success: a denial answered with either would not be a denial.
            if !DENIAL_STATUSES.contains(&code) {
                return Err(format!(
                    "a denial's \"http_status\" must be 300-599 (a redirect or an error), got {code}"
                ));
            }
            d.status = u16::try_from(code).unwrap_or(DEFAULT_DENY_STATUS);
        }
    }
    if let Some(v) = field(obj, "body") {
        match v {
            Value::String(s) => d.body = s.to_string(),
            other => {
                return Err(format!(
                    "\"body\" must be a string, got {}",
                    type_name(other)
                ));
            }
        }
    }
    if let Some(v) = field(obj, "dynamic_metadata") {
        match v {
            Value::Object(_) => d.dynamic_metadata = Some(v.clone()),
            other => {
                return Err(format!(
                    "\"dynamic_metadata\" must be an object, got {}",
                    type_name(other)
                ));
            }
        }
    }
    Ok(d)
}

/// `{name: value | [values]}` or an array of such objects. The first value of a name overwrites
/// what the request carries; further values of the same name are appended.
fn headers(key: &str, v: &Value) -> Result<Vec<Header>, String> {
    let mut out: Vec<Header> = Vec::new();
    let mut add = |name: &Value, value: &Value| -> Result<(), String> {
        let Value::String(name) = name else {
            return Err(format!("{key}: header names must be strings"));
        };
        if !is_header_name(name) {
            return Err(format!(
                "{key}: {name:?} is not a valid header name (lower-case letters, digits and !#$%&'*+-.^_`|~)"
            ));
        }
        let mut push = |val: &str| -> Result<(), String> {
            if !is_header_value(val) {
                return Err(format!(
                    "{key}: the value of {name:?} holds a control character (CR, LF, NUL, DEL…), which no header may carry"
                ));
            }
            let append = out
                .iter()
                .any(|h| h.name.eq_ignore_ascii_case(name.as_ref()));
            out.push(Header {
                name: name.to_string(),
                value: val.to_string(),
                append,
            });
            Ok(())
        };
        match value {
            Value::String(s) => push(s)?,
            Value::Array(items) => {
                for item in items.iter() {
                    let Value::String(s) = item else {
                        return Err(format!("{key}: values of {name:?} must be strings"));
                    };
                    push(s)?;
                }
            }
            other => {
                return Err(format!(
                    "{key}: value of {name:?} must be a string or an array of strings, got {}",
                    type_name(other)
                ));
            }
        }
        Ok(())
    };
    let mut add_object = |o: &Value| -> Result<(), String> {
        let Ok(map) = o.as_object() else {
            return Err(format!("{key} must be an object or an array of objects"));
        };
        for (name, value) in map.iter_sorted() {
            add(name, value)?;
        }
        Ok(())
    };
    match v {
        Value::Object(_) => add_object(v)?,
        Value::Array(items) => {
            for item in items.iter() {
                add_object(item)?;
            }
        }
        other => {
            return Err(format!(
                "{key} must be an object or an array of objects, got {}",
                type_name(other)
            ));
        }
    }
    Ok(out)
}

/// An HTTP field name (RFC 9110 token). Upper case is allowed: Envoy lower-cases names itself.
pub fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A value every hop accepts as a header value: visible ASCII, space, tab and non-ASCII UTF-8,
/// but no control character (CR and LF would split the header; NUL and DEL are refused by Envoy
/// and hyper alike) and no leading or trailing whitespace (trimmed by parsers, so what the
/// upstream reads would differ from what was decided).
pub fn is_header_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
        && !value.starts_with([' ', '\t'])
        && !value.ends_with([' ', '\t'])
}

fn strings(key: &str, v: &Value) -> Result<Vec<String>, String> {
    let items = match v {
        Value::Array(items) => items.iter().collect::<Vec<_>>(),
        Value::Set(items) => items.iter().collect::<Vec<_>>(),
        other => {
            return Err(format!(
                "{key} must be an array of strings, got {}",
                type_name(other)
            ));
        }
    };
    items
        .into_iter()
        .map(|item| match item {
            Value::String(s) => Ok(s.to_string()),
            other => Err(format!("{key} must hold strings, got {}", type_name(other))),
        })
        .collect()
}

#[cfg(test)]
mod tests;
