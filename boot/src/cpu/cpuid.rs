//! Per-vCPU CPUID: what KVM supports, with our topology written in.
//!
//! The VM is one package of `num_cpus` cores with one thread each; vCPU `i` has APIC ID
//! `i`. Starting from `KVM_GET_SUPPORTED_CPUID` (fetched once per VM), each vCPU's copy
//! gets:
//!
//! * leaf 1: initial APIC ID (EBX bits 31..24), addressable logical processors (EBX bits 23..16,
//!   the power of two covering `num_cpus`), CLFLUSH size, HTT when there is more than one
//!   vCPU, the hypervisor bit and the TSC-deadline timer (KVM's in-kernel LAPIC has it);
//! * leaves 0xB and (if KVM reports it) 0x1F: SMT level (1 thread) and core level
//!   (`num_cpus` cores), x2APIC ID in EDX of every subleaf;
//! * leaf 4 (Intel caches): L1/L2 private to a core, L3 shared by all, and the core count;
//! * AMD: core count in 0x8000_0008 ECX, CmpLegacy in 0x8000_0001 ECX, and the core and
//!   node IDs in 0x8000_001E when present.
//!
//! Everything else, including KVM's own leaves from 0x4000_0000, is kept as KVM reports it.

use kvm_bindings::{
    CpuId, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, KVM_MAX_CPUID_ENTRIES, kvm_cpuid_entry2,
};
use kvm_ioctls::{Kvm, VcpuFd};
use thiserror::Error;
use vmm_sys_util::fam::Error as FamError;

/// Most vCPUs the 8-bit APIC IDs of this topology describe (IDs 0..=254).
pub const MAX_VCPUS: u32 = 255;

const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;
const AMD_EXT1_ECX_CMP_LEGACY: u32 = 1 << 1;
/// Level types of leaves 0xB/0x1F (ECX[15:8]).
const LEVEL_INVALID: u32 = 0;
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Leaf whose EAX lists KVM's paravirtual features (`KVM_CPUID_FEATURES`).
pub const KVM_CPUID_FEATURES: u32 = 0x4000_0001;
/// KVM paravirtual feature bit: IPIs are sent with the `KVM_HC_SEND_IPI` hypercall.
pub const KVM_FEATURE_PV_SEND_IPI: u32 = 1 << 11;

/// Errors computing or setting CPUID.
#[derive(Debug, Error)]
pub enum CpuidError {
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed")]
    GetSupported(#[source] kvm_ioctls::Error),
    /// `KVM_SET_CPUID2` failed.
    #[error("KVM_SET_CPUID2 failed")]
    Set(#[source] kvm_ioctls::Error),
    /// The vCPU count or index is not describable.
    #[error("vCPU {index} of {num_cpus}: need 1..=255 vCPUs and index < count")]
    Topology {
        /// The vCPU's index.
        index: u32,
        /// The number of vCPUs.
        num_cpus: u32,
    },
    /// KVM's CPUID lacks a leaf we must patch.
    #[error("KVM's CPUID has no leaf {0:#x}")]
    MissingLeaf(u32),
    /// The patched CPUID does not fit KVM's entry list.
    #[error("CPUID has too many entries")]
    TooManyEntries(#[source] FamError),
}

/// The CPU vendor, as leaf 0 names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vendor {
    /// "GenuineIntel".
    Intel,
    /// "AuthenticAMD" or "HygonGenuine".
    Amd,
    /// Anything else.
    Other,
}

/// Fetches the CPUID KVM supports on this host; call once per VM.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuidError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(CpuidError::GetSupported)
}

/// The vendor named by leaf 0 of `entries`.
pub fn vendor(entries: &[kvm_cpuid_entry2]) -> Vendor {
    let Some(leaf0) = entries.iter().find(|e| e.function == 0) else {
        return Vendor::Other;
    };
    let mut name = [0u8; 12];
    name[..4].copy_from_slice(&leaf0.ebx.to_le_bytes());
    name[4..8].copy_from_slice(&leaf0.edx.to_le_bytes());
    name[8..].copy_from_slice(&leaf0.ecx.to_le_bytes());
    match &name {
        b"GenuineIntel" => Vendor::Intel,
        b"AuthenticAMD" | b"HygonGenuine" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

/// The guest-physical address width in bits that `entries` report: CPUID
/// 0x8000_0008 EAX\[7:0\] (Intel SDM vol. 2A, CPUID: "Physical Address Bits";
/// AMD APM vol. 3, "PhysAddrSize"), or `None` if the leaf is missing or says 0.
pub fn phys_addr_bits(entries: &[kvm_cpuid_entry2]) -> Option<u32> {
    entries
        .iter()
        .find(|e| e.function == 0x8000_0008 && e.index == 0)
        .map(|e| e.eax & 0xff)
        .filter(|bits| *bits != 0)
}

/// Number of APIC ID bits that enumerate `num_cpus` cores: ceil(log2(num_cpus)).
pub fn core_id_bits(num_cpus: u32) -> u32 {
    num_cpus.max(1).next_power_of_two().trailing_zeros()
}

/// Clears `features` (bits of [`KVM_CPUID_FEATURES`] EAX) in `cpuid`, so the guest does not
/// use them. Call on the supported CPUID before [`vcpu_cpuid`].
///
/// On hosts whose KVM emulates guest kernel code (PVM), a Linux guest that sends IPIs
/// through `KVM_HC_SEND_IPI` stalls at the hypercall as soon as a second vCPU is up (seen
/// with a 6.1 guest: the AP never leaves the hypercall, the BSP spins on a lock); clearing
/// [`KVM_FEATURE_PV_SEND_IPI`] makes it use the LAPIC instead, and SMP boots.
pub fn clear_kvm_features(cpuid: &mut CpuId, features: u32) {
    for e in cpuid
        .as_mut_slice()
        .iter_mut()
        .filter(|e| e.function == KVM_CPUID_FEATURES)
    {
        e.eax &= !features;
    }
}

/// `base` (KVM's supported CPUID) patched for vCPU `index` of `num_cpus`.
pub fn vcpu_cpuid(base: &CpuId, index: u32, num_cpus: u32) -> Result<CpuId, CpuidError> {
    let entries = patch_entries(base.as_slice(), index, num_cpus)?;
    CpuId::from_entries(&entries).map_err(CpuidError::TooManyEntries)
}

/// Sets `cpuid` on `vcpu` (before it first runs).
pub fn setup_cpuid(vcpu: &VcpuFd, cpuid: &CpuId) -> Result<(), CpuidError> {
    vcpu.set_cpuid2(cpuid).map_err(CpuidError::Set)
}

/// The patching of [`vcpu_cpuid`], on plain entries.
pub fn patch_entries(
    base: &[kvm_cpuid_entry2],
    index: u32,
    num_cpus: u32,
) -> Result<Vec<kvm_cpuid_entry2>, CpuidError> {
    if num_cpus == 0 || num_cpus > MAX_VCPUS || index >= num_cpus {
        return Err(CpuidError::Topology { index, num_cpus });
    }
    let apic_id = index;
    let bits = core_id_bits(num_cpus);
    let vendor = vendor(base);
    let max_basic = base.iter().find(|e| e.function == 0).map_or(0, |e| e.eax);
    let has_leaf_1f = base.iter().any(|e| e.function == 0x1f);

    // Leaves we rewrite whole are dropped here and added back below.
    let mut out: Vec<kvm_cpuid_entry2> = base
        .iter()
        .filter(|e| e.function != 0xb && e.function != 0x1f)
        .copied()
        .collect();

    let leaf1 = out
        .iter_mut()
        .find(|e| e.function == 1)
        .ok_or(CpuidError::MissingLeaf(1))?;
    leaf1.ebx = (apic_id << 24) | ((1u32 << bits).min(0xff) << 16) | (8 << 8) | (leaf1.ebx & 0xff);
    leaf1.ecx |= LEAF1_ECX_HYPERVISOR | LEAF1_ECX_TSC_DEADLINE;
    if num_cpus > 1 {
        leaf1.edx |= LEAF1_EDX_HTT;
    } else {
        leaf1.edx &= !LEAF1_EDX_HTT;
    }

    for e in out
        .iter_mut()
        .filter(|e| e.function == 4 && e.eax & 0x1f != 0)
    {
        let level = (e.eax >> 5) & 0x7;
        let sharing = if level >= 3 { num_cpus - 1 } else { 0 };
        let cores = (num_cpus - 1).min(0x3f);
        e.eax = (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (cores << 26);
    }

    if max_basic >= 0xb {
        out.extend(topology_leaf(0xb, apic_id, num_cpus, bits));
    }
    if has_leaf_1f && max_basic >= 0x1f {
        out.extend(topology_leaf(0x1f, apic_id, num_cpus, bits));
    }

    if vendor == Vendor::Amd {
        for e in out.iter_mut() {
            match e.function {
                0x8000_0001 => {
                    if num_cpus > 1 {
                        e.ecx |= AMD_EXT1_ECX_CMP_LEGACY;
                    } else {
                        e.ecx &= !AMD_EXT1_ECX_CMP_LEGACY;
                    }
                }
                // ECX: ApicIdSize [15:12], NC (cores - 1) [7:0].
                0x8000_0008 => e.ecx = (e.ecx & !0xf0ff) | (bits << 12) | (num_cpus - 1),
                // EAX: extended APIC ID; EBX: threads per core - 1 [15:8] (0), core ID
                // [7:0]; ECX: nodes per processor - 1 [10:8] (0), node ID [7:0] (0).
                0x8000_001e => {
                    e.eax = apic_id;
                    e.ebx = index & 0xff;
                    e.ecx = 0;
                }
                _ => {}
            }
        }
    }
    Ok(out)
}

/// Leaf 0xB or 0x1F: an SMT level of one thread, a core level of `num_cpus` cores, then
/// the invalid level that ends the enumeration.
fn topology_leaf(function: u32, apic_id: u32, num_cpus: u32, bits: u32) -> [kvm_cpuid_entry2; 3] {
    let sub = |index: u32, eax: u32, ebx: u32, level: u32| kvm_cpuid_entry2 {
        function,
        index,
        flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
        eax,
        ebx,
        ecx: (level << 8) | index,
        edx: apic_id,
        ..Default::default()
    };
    [
        sub(0, 0, 1, LEVEL_SMT),
        sub(1, bits, num_cpus, LEVEL_CORE),
        sub(2, 0, 0, LEVEL_INVALID),
    ]
}

#[allow(clippy::unwrap_used)]
#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    /// A plausible Intel CPUID: max basic leaf 0x1f, caches L1d/L1i/L2/L3 in leaf 4.
    fn intel() -> Vec<kvm_cpuid_entry2> {
        // "GenuineIntel" = EBX "Genu", EDX "ineI", ECX "ntel".
        let v = |s: &[u8; 4]| u32::from_le_bytes(*s);
        vec![
            leaf(0, 0, 0x1f, v(b"Genu"), v(b"ntel"), v(b"ineI")),
            leaf(1, 0, 0x000806f8, 0x0f10_0800, 0x7ffa_3223, 0x1f8b_fbff),
            leaf(4, 0, 0xfc00_4121, 0x02c0_003f, 0x3f, 0),
            leaf(4, 1, 0xfc00_4122, 0x01c0_003f, 0x3f, 0),
            leaf(4, 2, 0xfc01_c143, 0x03c0_003f, 0x7ff, 0),
            leaf(4, 3, 0xfc3f_c163, 0x03c0_003f, 0xbfff, 4),
            leaf(4, 4, 0, 0, 0, 0),
            leaf(0xb, 0, 1, 2, 0x100, 0x1f),
            leaf(0x1f, 0, 1, 2, 0x100, 0x1f),
            leaf(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
            leaf(0x4000_0001, 0, 0x01ff_ffff, 0, 0, 0),
        ]
    }

    fn amd() -> Vec<kvm_cpuid_entry2> {
        let v = |s: &[u8; 4]| u32::from_le_bytes(*s);
        vec![
            leaf(0, 0, 0x7, v(b"Auth"), v(b"cAMD"), v(b"enti")),
            leaf(1, 0, 0x00a0_0f11, 0x0010_0800, 0x7ef8_3203, 0x178b_fbff),
            leaf(0x8000_0001, 0, 0, 0, 0x0075_c3f3, 0x2fd3_fbff),
            leaf(0x8000_0008, 0, 0x3030, 0, 0x7007, 0),
            leaf(0x8000_001e, 0, 7, 0x107, 0x300, 0),
        ]
    }

    fn get(e: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *e.iter().find(|x| x.function == f && x.index == i).unwrap()
    }

    #[test]
    fn phys_addr_bits_is_eax_7_0_of_leaf_0x8000_0008() {
        // EAX: virtual bits 48 in [15:8], physical bits 46 in [7:0].
        let e = [leaf(0x8000_0008, 0, (48 << 8) | 46, 0, 0, 0)];
        assert_eq!(phys_addr_bits(&e), Some(46));
        assert_eq!(
            phys_addr_bits(&[leaf(0x8000_0008, 0, 48 << 8, 0, 0, 0)]),
            None
        );
        assert_eq!(phys_addr_bits(&[leaf(1, 0, 0x30, 0, 0, 0)]), None);
    }

    #[test]
    fn leaf1_carries_apic_id_count_and_flags() {
        let e = patch_entries(&intel(), 5, 6).unwrap();
        let l1 = get(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 5, "initial APIC ID");
        assert_eq!(
            (l1.ebx >> 16) & 0xff,
            8,
            "addressable IDs: power of two >= 6"
        );
        assert_eq!((l1.ebx >> 8) & 0xff, 8, "CLFLUSH line size / 8");
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor");
        assert_ne!(l1.ecx & (1 << 24), 0, "TSC deadline");
        assert_ne!(l1.edx & (1 << 28), 0, "HTT");
        let single = patch_entries(&intel(), 0, 1).unwrap();
        assert_eq!(
            get(&single, 1, 0).edx & (1 << 28),
            0,
            "no HTT with one vCPU"
        );
        assert_eq!((get(&single, 1, 0).ebx >> 16) & 0xff, 1);
    }

    #[test]
    fn extended_topology_describes_one_package_of_cores() {
        let e = patch_entries(&intel(), 3, 4).unwrap();
        for f in [0xb, 0x1f] {
            let smt = get(&e, f, 0);
            let core = get(&e, f, 1);
            let end = get(&e, f, 2);
            assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 3));
            assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 3));
            assert_eq!((end.eax, end.ebx, end.ecx & 0xff00, end.edx), (0, 0, 0, 3));
            assert_eq!(
                e.iter().filter(|x| x.function == f).count(),
                3,
                "old subleaves replaced"
            );
            assert!(
                e.iter()
                    .filter(|x| x.function == f)
                    .all(|x| x.flags == KVM_CPUID_FLAG_SIGNIFCANT_INDEX)
            );
        }
    }

    #[test]
    fn leaf4_shares_l3_among_all_cores_and_keeps_l1_l2_private() {
        let e = patch_entries(&intel(), 0, 6).unwrap();
        for i in 0..4 {
            let l = get(&e, 4, i);
            let level = (l.eax >> 5) & 7;
            let sharing = (l.eax >> 14) & 0xfff;
            let cores = l.eax >> 26;
            assert_eq!(cores, 5, "cores per package - 1");
            assert_eq!(sharing, if level == 3 { 5 } else { 0 }, "level {level}");
            assert_eq!(
                l.eax & 0x3fff,
                intel()[2 + i as usize].eax & 0x3fff,
                "cache type/level kept"
            );
        }
        assert_eq!(get(&e, 4, 4).eax, 0, "terminator untouched");
    }

    #[test]
    fn kvm_leaves_are_kept() {
        let e = patch_entries(&intel(), 1, 2).unwrap();
        assert_eq!(get(&e, 0x4000_0000, 0), intel()[9]);
        assert_eq!(get(&e, 0x4000_0001, 0), intel()[10]);
        assert_eq!(vendor(&e), Vendor::Intel);
    }

    #[test]
    fn kvm_features_can_be_cleared() {
        let mut cpuid = CpuId::from_entries(&intel()).unwrap();
        clear_kvm_features(&mut cpuid, KVM_FEATURE_PV_SEND_IPI);
        let e = get(cpuid.as_slice(), KVM_CPUID_FEATURES, 0);
        assert_eq!(e.eax, 0x01ff_ffff & !(1 << 11));
        assert_eq!(
            get(cpuid.as_slice(), 1, 0),
            intel()[1],
            "other leaves untouched"
        );
    }

    #[test]
    fn amd_topology_leaves_are_patched() {
        let e = patch_entries(&amd(), 2, 3).unwrap();
        assert_eq!(vendor(&e), Vendor::Amd);
        assert_eq!(get(&e, 0x8000_0008, 0).ecx, (2 << 12) | 2);
        assert_eq!(get(&e, 0x8000_001e, 0).eax, 2);
        assert_eq!(get(&e, 0x8000_001e, 0).ebx, 2);
        assert_ne!(get(&e, 0x8000_0001, 0).ecx & 2, 0, "CmpLegacy");
        // Max basic leaf 7: no leaf 0xB added, leaf 4 absent.
        assert!(e.iter().all(|x| x.function != 0xb && x.function != 4));
    }

    #[test]
    fn bad_topologies_and_missing_leaf1_are_errors() {
        assert!(matches!(
            patch_entries(&intel(), 0, 0),
            Err(CpuidError::Topology { .. })
        ));
        assert!(matches!(
            patch_entries(&intel(), 4, 4),
            Err(CpuidError::Topology { .. })
        ));
        assert!(matches!(
            patch_entries(&intel(), 0, 256),
            Err(CpuidError::Topology { .. })
        ));
        let no_leaf1: Vec<_> = intel().into_iter().filter(|e| e.function != 1).collect();
        assert!(matches!(
            patch_entries(&no_leaf1, 0, 1),
            Err(CpuidError::MissingLeaf(1))
        ));
    }

    #[test]
    fn core_id_bits_cover_the_count() {
        assert_eq!(
            [1, 2, 3, 4, 5, 8, 9, 255].map(core_id_bits),
            [0, 1, 2, 2, 3, 3, 4, 8]
        );
    }
}
