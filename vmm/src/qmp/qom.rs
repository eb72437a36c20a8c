//! The small part of QEMU's object model (QOM) that `qom-get` and `qom-set`
//! reach: the virtio-mem devices at `/machine/peripheral/<id>` and their
//! size properties, plus the extension property `x-stall-timeout` (the
//! milliseconds without progress after which a resize counts as stalled;
//! QEMU's `x-` prefix for experimental names).
//!
//! Paths resolve as QEMU's `object_resolve_path()` does for this tree: an
//! absolute path (`/machine/peripheral/vmem0`, empty components ignored) or
//! a partial one that names the device from any ancestor (`vmem0`,
//! `peripheral/vmem0`, `machine/peripheral/vmem0`).

use super::args::expects;
use super::error::QmpError;
use super::vm_ops::MemoryDeviceInfo;
use serde_json::Value;

/// The QOM type name used in property errors (`Property 'virtio-mem.x' not
/// found`).
pub(crate) const DEVICE_TYPE: &str = "virtio-mem";

/// The writable property.
pub(crate) const REQUESTED_SIZE: &str = "requested-size";

/// The extension property: the stall timeout of resizes, in milliseconds.
pub(crate) const STALL_TIMEOUT: &str = "x-stall-timeout";

/// The accepted stall timeouts, in milliseconds (the device's limits).
pub(crate) const STALL_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = {
    use devices::virtio::mem_progress::{MAX_STALL_TIMEOUT, MIN_STALL_TIMEOUT};
    (MIN_STALL_TIMEOUT.as_millis() as u64)..=(MAX_STALL_TIMEOUT.as_millis() as u64)
};

/// What a checked `qom-set` changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QomSet {
    /// `requested-size`, in bytes.
    RequestedSize(u64),
    /// `x-stall-timeout`, in milliseconds.
    StallTimeout(u64),
}

/// Where device `id` sits in the QOM tree.
pub(crate) fn device_path(id: &str) -> String {
    format!("/machine/peripheral/{id}")
}

/// The device `path` names, or QEMU's `DeviceNotFound` error.
pub(crate) fn resolve<'a>(
    devices: &'a [MemoryDeviceInfo],
    path: &str,
) -> Result<&'a MemoryDeviceInfo, QmpError> {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    let found = devices.iter().find(|d| {
        let full = ["machine", "peripheral", d.id.as_str()];
        if path.starts_with('/') {
            parts == full
        } else {
            !parts.is_empty() && full.ends_with(&parts)
        }
    });
    found.ok_or_else(|| QmpError::device_not_found(format!("Device '{path}' not found")))
}

/// The value of a readable property.
pub(crate) fn get(device: &MemoryDeviceInfo, property: &str) -> Result<Value, QmpError> {
    let value = match property {
        REQUESTED_SIZE => Value::from(device.requested_size),
        "size" => Value::from(device.size),
        "max-size" => Value::from(device.max_size),
        "block-size" => Value::from(device.block_size),
        "memaddr" => Value::from(device.memaddr),
        "node" => Value::from(device.node),
        "memdev" => Value::from(device.memdev.as_str()),
        _ => return Err(not_found(property)),
    };
    Ok(value)
}

/// Checks a `qom-set` of `property` to `value` in QEMU's order (property
/// exists, is writable, value is an integer, then the device's rules) and
/// returns what to change.
///
/// As in QEMU, the value must be a JSON integer (a size string such as
/// `"1G"` is refused), and a negative integer is taken modulo 2^64 and then
/// refused as too large. `x-stall-timeout` must be within
/// [`STALL_TIMEOUT_RANGE`].
pub(crate) fn to_set(
    device: &MemoryDeviceInfo,
    property: &str,
    value: &Value,
) -> Result<QomSet, QmpError> {
    if property == STALL_TIMEOUT {
        let ms = value
            .as_u64()
            .or_else(|| value.as_i64().map(|v| v as u64))
            .ok_or_else(|| expects(property, "uint64"))?;
        if !STALL_TIMEOUT_RANGE.contains(&ms) {
            return Err(QmpError::generic(format!(
                "'{STALL_TIMEOUT}' must be between {} and {} (milliseconds)",
                STALL_TIMEOUT_RANGE.start(),
                STALL_TIMEOUT_RANGE.end()
            )));
        }
        return Ok(QomSet::StallTimeout(ms));
    }
    requested_size_to_set(device, property, value).map(QomSet::RequestedSize)
}

fn requested_size_to_set(
    device: &MemoryDeviceInfo,
    property: &str,
    value: &Value,
) -> Result<u64, QmpError> {
    if property != REQUESTED_SIZE {
        return Err(match get(device, property) {
            Ok(_) => QmpError::generic(format!(
                "Property '{DEVICE_TYPE}.{property}' is not writable"
            )),
            Err(e) => e,
        });
    }
    let size = value
        .as_u64()
        .or_else(|| value.as_i64().map(|v| v as u64))
        .ok_or_else(|| expects(property, "uint64"))?;
    if device.block_size == 0 || size % device.block_size != 0 {
        return Err(QmpError::generic(format!(
            "'{REQUESTED_SIZE}' has to be multiples of 'block-size' ({:#x})",
            device.block_size
        )));
    }
    if size > device.max_size {
        return Err(QmpError::generic(format!(
            "'{REQUESTED_SIZE}' cannot exceed the memory backend size({:#x})",
            device.max_size
        )));
    }
    Ok(size)
}

/// QEMU's error for a property the device does not have.
pub(crate) fn not_found(property: &str) -> QmpError {
    QmpError::generic(format!("Property '{DEVICE_TYPE}.{property}' not found"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::error::ErrorClass;
    use serde_json::json;

    fn vmem(id: &str) -> MemoryDeviceInfo {
        MemoryDeviceInfo {
            id: id.into(),
            memaddr: 0x1_0000_0000,
            requested_size: 0x4000_0000,
            size: 0x2000_0000,
            max_size: 0x1_0000_0000,
            block_size: 0x20_0000,
            node: 0,
            memdev: "/objects/mem0".into(),
        }
    }

    #[test]
    fn test_resolve_accepts_qemu_path_forms() {
        let devs = [vmem("vmem0"), vmem("vmem1")];
        for p in [
            "vmem1",
            "peripheral/vmem1",
            "machine/peripheral/vmem1",
            "/machine/peripheral/vmem1",
            "//machine//peripheral/vmem1/",
        ] {
            assert_eq!(resolve(&devs, p).unwrap().id, "vmem1", "{p}");
        }
    }

    #[test]
    fn test_resolve_unknown_paths_are_device_not_found() {
        let devs = [vmem("vmem0")];
        for p in [
            "vmem",
            "",
            "/",
            "/vmem0",
            "/peripheral/vmem0",
            "other/vmem0",
            "/machine/peripheral/vmem0/x",
        ] {
            let e = resolve(&devs, p).unwrap_err();
            assert_eq!(e.class(), ErrorClass::DeviceNotFound, "{p}");
            assert_eq!(e.desc(), format!("Device '{p}' not found"));
        }
    }

    #[test]
    fn test_get_every_property() {
        let d = vmem("vmem0");
        assert_eq!(get(&d, "requested-size").unwrap(), json!(0x4000_0000));
        assert_eq!(get(&d, "size").unwrap(), json!(0x2000_0000));
        assert_eq!(get(&d, "max-size").unwrap(), json!(0x1_0000_0000u64));
        assert_eq!(get(&d, "block-size").unwrap(), json!(0x20_0000));
        assert_eq!(get(&d, "memaddr").unwrap(), json!(0x1_0000_0000u64));
        assert_eq!(get(&d, "node").unwrap(), json!(0));
        assert_eq!(get(&d, "memdev").unwrap(), json!("/objects/mem0"));
        let e = get(&d, "colour").unwrap_err();
        assert_eq!(e.class(), ErrorClass::GenericError);
        assert_eq!(e.desc(), "Property 'virtio-mem.colour' not found");
    }

    #[test]
    fn test_set_accepts_aligned_size_within_max() {
        let d = vmem("vmem0");
        assert_eq!(
            requested_size_to_set(&d, "requested-size", &json!(0)).unwrap(),
            0
        );
        assert_eq!(
            requested_size_to_set(&d, "requested-size", &json!(0x1_0000_0000u64)).unwrap(),
            0x1_0000_0000
        );
    }

    #[test]
    fn test_set_stall_timeout_within_range() {
        let d = vmem("vmem0");
        assert_eq!(
            to_set(&d, STALL_TIMEOUT, &json!(2500)).unwrap(),
            QomSet::StallTimeout(2500)
        );
        assert_eq!(
            to_set(&d, "requested-size", &json!(0x20_0000)).unwrap(),
            QomSet::RequestedSize(0x20_0000)
        );
        for bad in [json!(99), json!(86_400_001u64), json!(-1)] {
            let e = to_set(&d, STALL_TIMEOUT, &bad).unwrap_err();
            assert_eq!(
                e.desc(),
                "'x-stall-timeout' must be between 100 and 86400000 (milliseconds)",
                "{bad}"
            );
        }
        let e = to_set(&d, STALL_TIMEOUT, &json!("1s")).unwrap_err();
        assert_eq!(e.desc(), "Parameter 'x-stall-timeout' expects uint64");
    }

    #[test]
    fn test_set_rejections_use_qemu_messages() {
        let d = vmem("vmem0");
        let cases = [
            (
                "size",
                json!(0),
                "Property 'virtio-mem.size' is not writable",
            ),
            ("nope", json!(0), "Property 'virtio-mem.nope' not found"),
            (
                "requested-size",
                json!("1G"),
                "Parameter 'requested-size' expects uint64",
            ),
            (
                "requested-size",
                json!(1.5),
                "Parameter 'requested-size' expects uint64",
            ),
            (
                "requested-size",
                json!(0x1000),
                "'requested-size' has to be multiples of 'block-size' (0x200000)",
            ),
            (
                "requested-size",
                json!(0x1_0020_0000u64),
                "'requested-size' cannot exceed the memory backend size(0x100000000)",
            ),
            (
                "requested-size",
                json!(-0x20_0000),
                "'requested-size' cannot exceed the memory backend size(0x100000000)",
            ),
        ];
        for (prop, value, desc) in cases {
            let e = requested_size_to_set(&d, prop, &value).unwrap_err();
            assert_eq!(e.class(), ErrorClass::GenericError);
            assert_eq!(e.desc(), desc, "{prop} = {value}");
        }
    }
}
