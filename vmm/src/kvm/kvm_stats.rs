//! KVM's binary statistics of a vCPU (`KVM_GET_STATS_FD`): the counters KVM
//! keeps itself, such as `exits` (every VM exit, including those handled
//! inside the kernel) and `irq_exits` (exits caused by host interrupts, for
//! example the IPIs `membarrier` sends).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use thiserror::Error;

/// `KVM_GET_STATS_FD`: `_IO(KVMIO, 0xce)`.
const KVM_GET_STATS_FD: libc::c_ulong = 0xae << 8 | 0xce;
/// Size of `struct kvm_stats_header`.
const HEADER_SIZE: usize = 24;
/// Size of `struct kvm_stats_desc` without its name.
const DESC_SIZE: usize = 16;

/// Errors reading KVM statistics.
#[derive(Debug, Error)]
pub enum KvmStatsError {
    /// The kernel does not offer binary statistics.
    #[error("KVM_GET_STATS_FD failed")]
    Open(#[source] std::io::Error),
    /// The stats file could not be read.
    #[error("cannot read KVM statistics")]
    Read(#[source] std::io::Error),
    /// The stats file is malformed.
    #[error("malformed KVM statistics header")]
    Malformed,
}

/// A handle on one vCPU's (or VM's) statistics.
#[derive(Debug)]
pub struct KvmStats {
    file: File,
    /// Name -> (offset in the data block, number of u64 values).
    fields: HashMap<String, (u64, usize)>,
    data_offset: u64,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

impl KvmStats {
    /// Opens the statistics of the KVM object behind `fd` (a vCPU or VM fd).
    pub fn open(fd: &impl AsRawFd) -> Result<Self, KvmStatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd.
        let raw = unsafe { libc::ioctl(fd.as_raw_fd(), KVM_GET_STATS_FD as _, 0) };
        if raw < 0 {
            return Err(KvmStatsError::Open(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a new descriptor we own.
        let file = unsafe { File::from_raw_fd(raw) };
        let mut header = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut header, 0)
            .map_err(KvmStatsError::Read)?;
        let name_size = u32_at(&header, 4).ok_or(KvmStatsError::Malformed)? as usize;
        let num_desc = u32_at(&header, 8).ok_or(KvmStatsError::Malformed)? as usize;
        let desc_offset = u32_at(&header, 16).ok_or(KvmStatsError::Malformed)?;
        let data_offset = u32_at(&header, 20).ok_or(KvmStatsError::Malformed)?;
        if name_size > 4096 || num_desc > 4096 {
            return Err(KvmStatsError::Malformed);
        }
        let stride = DESC_SIZE + name_size;
        let mut descs = vec![0u8; stride * num_desc];
        file.read_exact_at(&mut descs, u64::from(desc_offset))
            .map_err(KvmStatsError::Read)?;
        let mut fields = HashMap::new();
        for d in descs.chunks_exact(stride) {
            let size = u16_at(d, 6).ok_or(KvmStatsError::Malformed)?;
            let offset = u32_at(d, 8).ok_or(KvmStatsError::Malformed)?;
            let name = &d[DESC_SIZE..];
            let end = name.iter().position(|b| *b == 0).unwrap_or(name.len());
            let name = String::from_utf8_lossy(&name[..end]).into_owned();
            fields.insert(name, (u64::from(offset), usize::from(size)));
        }
        Ok(Self {
            file,
            fields,
            data_offset: u64::from(data_offset),
        })
    }

    /// The names of the statistics.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.fields.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// The current value of counter `name` (its first value), if KVM has it.
    pub fn get(&self, name: &str) -> Option<u64> {
        let &(offset, size) = self.fields.get(name)?;
        if size == 0 {
            return None;
        }
        let mut b = [0u8; 8];
        self.file
            .read_exact_at(&mut b, self.data_offset + offset)
            .ok()?;
        Some(u64::from_ne_bytes(b))
    }
}
