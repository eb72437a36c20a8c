//! Local APIC LINT pins: LINT0 delivers ExtINT (the 8259 path), LINT1 delivers NMI, as
//! on a PC where the BIOS programmed the virtual-wire mode. Needs KVM's in-kernel
//! irqchip (`KVM_CREATE_IRQCHIP` before the vCPU is created).

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;
use thiserror::Error;

/// Offset of the LVT LINT0 register in the APIC register page.
pub const APIC_LVT0: usize = 0x350;
/// Offset of the LVT LINT1 register.
pub const APIC_LVT1: usize = 0x360;
/// Delivery mode NMI (bits 10..8).
pub const APIC_MODE_NMI: u32 = 0b100;
/// Delivery mode ExtINT (bits 10..8).
pub const APIC_MODE_EXTINT: u32 = 0b111;
const DELIVERY_MODE_MASK: u32 = 0x700;

/// Errors setting up the LAPIC.
#[derive(Debug, Error)]
pub enum LapicError {
    /// `KVM_GET_LAPIC` failed (no in-kernel irqchip?).
    #[error("KVM_GET_LAPIC failed")]
    Get(#[source] kvm_ioctls::Error),
    /// `KVM_SET_LAPIC` failed.
    #[error("KVM_SET_LAPIC failed")]
    Set(#[source] kvm_ioctls::Error),
}

/// Reads the 32-bit APIC register at `offset` (0 outside the page).
pub fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let mut bytes = [0u8; 4];
    if let Some(src) = state.regs.get(offset..offset + 4) {
        for (d, s) in bytes.iter_mut().zip(src) {
            *d = *s as u8;
        }
    }
    u32::from_le_bytes(bytes)
}

/// Writes the 32-bit APIC register at `offset` (ignored outside the page).
pub fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    if let Some(dst) = state.regs.get_mut(offset..offset + 4) {
        for (d, s) in dst.iter_mut().zip(value.to_le_bytes()) {
            *d = s as std::os::raw::c_char;
        }
    }
}

/// Returns `reg` with its delivery mode replaced by `mode`.
pub fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !DELIVERY_MODE_MASK) | ((mode << 8) & DELIVERY_MODE_MASK)
}

/// LVT mask bit.
pub const APIC_LVT_MASKED: u32 = 1 << 16;

/// Programs LINT0 as *masked* ExtINT and LINT1 as NMI on `vcpu`'s in-kernel
/// LAPIC.
///
/// LINT0 is masked because the platform is ACPI hardware-reduced: Linux then
/// never programs the 8259 PIC (it assumes none), while KVM's reset state
/// (quirk `LINT0_REENABLED`) leaves the boot CPU's LINT0 unmasked, so a PIC
/// interrupt would arrive as an exception with the PIC's default vector
/// base. A guest that wants virtual-wire mode unmasks LINT0 itself.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), LapicError> {
    let mut state = vcpu.get_lapic().map_err(LapicError::Get)?;
    let lint0 = lapic_reg(&state, APIC_LVT0);
    set_lapic_reg(
        &mut state,
        APIC_LVT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT) | APIC_LVT_MASKED,
    );
    let lint1 = lapic_reg(&state, APIC_LVT1);
    set_lapic_reg(
        &mut state,
        APIC_LVT1,
        with_delivery_mode(lint1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&state).map_err(LapicError::Set)
}

#[allow(clippy::unwrap_used)]
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_replaces_only_bits_8_to_10() {
        // Masked (bit 16) fixed-mode vector 0x30 becomes masked ExtINT.
        assert_eq!(
            with_delivery_mode(0x0001_0030, APIC_MODE_EXTINT),
            0x0001_0730
        );
        assert_eq!(with_delivery_mode(0x0000_0700, APIC_MODE_NMI), 0x0000_0400);
    }

    #[test]
    fn registers_round_trip_little_endian() {
        let mut s = kvm_lapic_state::default();
        set_lapic_reg(&mut s, APIC_LVT1, 0x8765_4321);
        assert_eq!(s.regs[APIC_LVT1] as u8, 0x21);
        assert_eq!(s.regs[APIC_LVT1 + 3] as u8, 0x87);
        assert_eq!(lapic_reg(&s, APIC_LVT1), 0x8765_4321);
        // Out-of-page offsets are ignored rather than panicking.
        set_lapic_reg(&mut s, 1022, 1);
        assert_eq!(lapic_reg(&s, 1022), 0);
    }
}
