//! The error a QMP command answers with: a class and a description, as in
//! QEMU's `{"error": {"class": ..., "desc": ...}}`.

use thiserror::Error;

/// QEMU's error classes (`qapi/error.json`). Clients branch on the class;
/// the description is for humans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Everything that has no class of its own.
    GenericError,
    /// The command does not exist, or not in the connection's current state
    /// (before or after capabilities negotiation).
    CommandNotFound,
    /// The device exists but is not usable.
    #[cfg_attr(
        not(any(test, feature = "test-utils")),
        expect(
            dead_code,
            reason = "QEMU's vocabulary, kept whole: this VMM does not report it (yet)"
        )
    )]
    DeviceNotActive,
    /// No device or QOM object at the given path.
    DeviceNotFound,
}

impl ErrorClass {
    /// The class name as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotActive => "DeviceNotActive",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
        }
    }
}

/// A QMP error reply. `Display` is the description alone.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{desc}")]
pub struct QmpError {
    class: ErrorClass,
    desc: String,
}

impl QmpError {
    /// An error of `class` described by `desc`.
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        Self {
            class,
            desc: desc.into(),
        }
    }

    /// A `GenericError`: what [`VmOps`](super::VmOps) implementations return
    /// for a request the VM refuses or fails.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// A `CommandNotFound` error.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::CommandNotFound, desc)
    }

    /// A `DeviceNotFound` error.
    pub fn device_not_found(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::DeviceNotFound, desc)
    }

    /// The error's class.
    pub fn class(&self) -> ErrorClass {
        self.class
    }

    /// The error's description.
    pub fn desc(&self) -> &str {
        &self.desc
    }

    /// The same error with another description (QEMU rewrites some
    /// descriptions during capabilities negotiation).
    pub(crate) fn with_desc(self, desc: impl Into<String>) -> Self {
        Self::new(self.class, desc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_error_class_names_match_qemu() {
        assert_eq!(ErrorClass::GenericError.as_str(), "GenericError");
        assert_eq!(ErrorClass::CommandNotFound.as_str(), "CommandNotFound");
        assert_eq!(ErrorClass::DeviceNotActive.as_str(), "DeviceNotActive");
        assert_eq!(ErrorClass::DeviceNotFound.as_str(), "DeviceNotFound");
    }

    #[test]
    fn test_qmp_error_displays_its_description_only() {
        let e = QmpError::device_not_found("Device 'x' not found");
        assert_eq!(e.to_string(), "Device 'x' not found");
        assert_eq!(e.class(), ErrorClass::DeviceNotFound);
        assert_eq!(e.desc(), "Device 'x' not found");
    }

    #[test]
    fn test_with_desc_keeps_the_class() {
        let e = QmpError::command_not_found("a").with_desc("b");
        assert_eq!(e, QmpError::command_not_found("b"));
    }
}
