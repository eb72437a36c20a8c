//! Tiny guests written in assembly, assembled by rustc into the test binary.
//!
//! ```ignore
//! guest_code! {
//!     /// Writes 0x42 to port 0x80 and powers off.
//!     pub fn out_and_off(out_start, out_end) {
//!         ".code64",
//!         "mov al, 0x42",
//!         "out 0x80, al",
//!     }
//! }
//! let bytes: &[u8] = out_and_off();
//! ```
//!
//! The two identifiers name the start and end symbols of the blob (they
//! must be unique in the test binary). Code is position-independent unless
//! it is loaded where its absolute references expect; use relative jumps.
//! Blocks in `.code16`/`.code32` are fine; the macro restores `.code64`.

/// Defines `fn $name() -> &'static [u8]` returning the assembled bytes.
///
/// `fn name(start, end) in user mode { ... }` prefixes the lines with the
/// drop to CPL3 that the tiny guests share: entered at CPL0 in long mode
/// with the user stack in r13, it `iretq`s to the next instruction with SS
/// and CS set to the user selectors of `boot::cpu::gdt` (0x33, 0x3b), so
/// the given lines run at CPL3. rax is clobbered.
///
/// `fn name(start, end) then power off { ... }` appends the ACPI power-off
/// the tiny guests share (SLP_EN with S5's sleep type, 0x34, to the sleep
/// control port 0x600), then halts for good (label `2`). The tail is
/// assembled in the mode the lines leave in force.
#[macro_export]
macro_rules! guest_code {
    ($(#[$doc:meta])* $vis:vis fn $name:ident($start:ident, $end:ident) in user mode { $($line:literal),* $(,)? }) => {
        $crate::guest_code! {
            $(#[$doc])*
            $vis fn $name($start, $end) {
                ".code64",
                "push 0x33",
                "push r13",
                "pushfq",
                "push 0x3b",
                "lea rax, [rip + 1f]",
                "push rax",
                "iretq",
                "1:",
                $($line,)*
            }
        }
    };
    ($(#[$doc:meta])* $vis:vis fn $name:ident($start:ident, $end:ident) then power off { $($line:literal),* $(,)? }) => {
        $crate::guest_code! {
            $(#[$doc])*
            $vis fn $name($start, $end) {
                $($line,)*
                "mov dx, 0x600",
                "mov al, 0x34",
                "out dx, al",
                "2: hlt",
                "jmp 2b",
            }
        }
    };
    ($(#[$doc:meta])* $vis:vis fn $name:ident($start:ident, $end:ident) { $($line:literal),* $(,)? }) => {
        ::core::arch::global_asm!(
            concat!(".pushsection .rodata.guest_", stringify!($name), ",\"a\",@progbits"),
            concat!(".globl ", stringify!($start)),
            concat!(stringify!($start), ":"),
            $($line,)*
            ".code64",
            concat!(".globl ", stringify!($end)),
            concat!(stringify!($end), ":"),
            ".popsection",
        );
        $(#[$doc])*
        $vis fn $name() -> &'static [u8] {
            unsafe extern "C" {
                static $start: u8;
                static $end: u8;
            }
            let start = &raw const $start;
            let end = &raw const $end;
            let len = (end as usize).saturating_sub(start as usize);
            // SAFETY: both symbols are defined above around the blob, in one
            // read-only section of this binary, so `start..start + len` is
            // initialised, immutable memory for the whole program.
            unsafe { ::core::slice::from_raw_parts(start, len) }
        }
    };
}
