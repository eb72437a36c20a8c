//! The guest kit built by `tests/guest/build-kit.sh`.

use std::path::{Path, PathBuf};

/// Where the kit is: `$VMM_GUEST_KIT`, or `target/guest-kit` in the
/// workspace.
pub fn dir() -> PathBuf {
    std::env::var_os("VMM_GUEST_KIT").map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-kit"),
        PathBuf::from,
    )
}

/// A file of the kit; panics with the command that builds it if missing.
pub fn file(name: &str) -> PathBuf {
    let p = dir().join(name);
    assert!(
        p.exists(),
        "guest kit file {} is missing: build the kit with tests/guest/build-kit.sh \
         (scripts/test.sh does)",
        p.display()
    );
    p
}

/// `--kernel <kit image> --initrd <kit initrd>`: the `vmm` arguments that
/// boot the kit's minimal kernel `image` (`vmlinux`, entered through PVH, or
/// `bzImage`) on its initramfs `initrd` (`initramfs-idle.cpio` idles,
/// `initramfs-halt.cpio` ends the boot). Panics as [`file`] if one is missing.
pub fn boot_args(image: &str, initrd: &str) -> [String; 4] {
    let path = |name| file(name).to_str().expect("a UTF-8 kit path").to_string();
    [
        "--kernel".to_string(),
        path(image),
        "--initrd".to_string(),
        path(initrd),
    ]
}

/// The kernel arguments that work on emulation-only hosts (from the kit).
pub fn emulated_cmdline() -> String {
    std::fs::read_to_string(file("cmdline-emulated.txt"))
        .unwrap()
        .trim()
        .to_string()
}

/// The distribution kernel and its busybox initramfs, if built (`--distro`).
pub fn distro() -> Option<(PathBuf, PathBuf)> {
    let d = dir().join("distro");
    let k = d.join("vmlinuz");
    let i = d.join("initramfs.cpio.gz");
    (k.exists() && i.exists()).then_some((k, i))
}
