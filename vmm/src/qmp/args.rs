//! Command arguments checked the way QEMU's generated marshallers check
//! them (the QObject input visitor, `qapi/qobject-input-visitor.c`):
//! members are taken in schema order, a missing or mistyped member is
//! reported as it is reached, and members nobody took are reported last.

use super::error::QmpError;
use serde_json::{Map, Value};

/// `Parameter '<name>' is missing`.
pub(crate) fn missing(name: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' is missing"))
}

/// `Invalid parameter type for '<name>', expected: <expected>`.
pub(crate) fn invalid_type(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

/// `Parameter '<name>' expects <what>` (QEMU's wording for an integer that
/// does not fit, or a value of the wrong kind for a `size` property).
pub(crate) fn expects(name: &str, what: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' expects {what}"))
}

/// `Parameter '<name>' is unexpected`.
pub(crate) fn unexpected(name: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' is unexpected"))
}

/// The `arguments` of one command, consumed member by member.
#[derive(Debug)]
pub(crate) struct Args {
    members: Map<String, Value>,
}

impl Args {
    pub(crate) fn new(members: Map<String, Value>) -> Self {
        Self { members }
    }

    /// A required member of any type (QAPI `any`).
    pub(crate) fn any(&mut self, name: &str) -> Result<Value, QmpError> {
        self.members.remove(name).ok_or_else(|| missing(name))
    }

    /// A required string member.
    pub(crate) fn str(&mut self, name: &str) -> Result<String, QmpError> {
        match self.any(name)? {
            Value::String(s) => Ok(s),
            _ => Err(invalid_type(name, "string")),
        }
    }

    /// An optional array member.
    pub(crate) fn opt_array(&mut self, name: &str) -> Result<Option<Vec<Value>>, QmpError> {
        match self.members.remove(name) {
            None => Ok(None),
            Some(Value::Array(items)) => Ok(Some(items)),
            Some(_) => Err(invalid_type(name, "array")),
        }
    }

    /// Ends the visit: any member not taken is an error.
    pub(crate) fn finish(self) -> Result<(), QmpError> {
        match self.members.keys().next() {
            Some(name) => Err(unexpected(name)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn args(v: Value) -> Args {
        match v {
            Value::Object(m) => Args::new(m),
            _ => panic!("test arguments must be an object"),
        }
    }

    #[test]
    fn test_str_present_missing_and_mistyped() {
        let mut a = args(json!({"path": "vmem0", "property": 5}));
        assert_eq!(a.str("path").unwrap(), "vmem0");
        assert_eq!(
            a.str("property").unwrap_err().desc(),
            "Invalid parameter type for 'property', expected: string"
        );
        assert_eq!(
            a.str("value").unwrap_err().desc(),
            "Parameter 'value' is missing"
        );
    }

    #[test]
    fn test_any_accepts_every_type() {
        let mut a = args(json!({"a": null, "b": [1], "c": {"x": 1}}));
        assert_eq!(a.any("a").unwrap(), Value::Null);
        assert_eq!(a.any("b").unwrap(), json!([1]));
        assert_eq!(a.any("c").unwrap(), json!({"x": 1}));
        a.finish().unwrap();
    }

    #[test]
    fn test_opt_array_absent_present_mistyped() {
        assert_eq!(args(json!({})).opt_array("enable").unwrap(), None);
        assert_eq!(
            args(json!({"enable": ["oob"]}))
                .opt_array("enable")
                .unwrap(),
            Some(vec![json!("oob")])
        );
        assert_eq!(
            args(json!({"enable": "oob"}))
                .opt_array("enable")
                .unwrap_err()
                .desc(),
            "Invalid parameter type for 'enable', expected: array"
        );
    }

    #[test]
    fn test_finish_reports_leftover_member() {
        let mut a = args(json!({"path": "x", "bogus": 1}));
        a.str("path").unwrap();
        assert_eq!(
            a.finish().unwrap_err().desc(),
            "Parameter 'bogus' is unexpected"
        );
    }

    #[test]
    fn test_expects_wording() {
        assert_eq!(
            expects("requested-size", "uint64").desc(),
            "Parameter 'requested-size' expects uint64"
        );
    }
}
