//! A bus device for tests: records every write and answers reads with a
//! programmed value.

use devices::BusDevice;
use std::sync::Mutex;

/// One recorded access.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    /// `base + offset` of the access.
    pub addr: u64,
    /// The bytes written (empty for reads).
    pub data: Vec<u8>,
    /// Whether it was a write.
    pub write: bool,
}

/// Records accesses; reads return `read_value` little-endian.
#[derive(Debug, Default)]
pub struct Recorder {
    log: Mutex<Vec<Access>>,
    read_value: u64,
}

impl Recorder {
    /// A recorder whose reads return `read_value`.
    pub fn new(read_value: u64) -> Self {
        Self {
            log: Mutex::new(Vec::new()),
            read_value,
        }
    }
    /// The accesses so far.
    pub fn accesses(&self) -> Vec<Access> {
        self.log.lock().unwrap().clone()
    }
    /// The writes so far, as (address, value) with the value zero-extended.
    pub fn writes(&self) -> Vec<(u64, u64)> {
        self.accesses()
            .into_iter()
            .filter(|a| a.write)
            .map(|a| {
                let mut v = [0u8; 8];
                v[..a.data.len().min(8)].copy_from_slice(&a.data[..a.data.len().min(8)]);
                (a.addr, u64::from_le_bytes(v))
            })
            .collect()
    }
}

impl BusDevice for Recorder {
    fn read(&self, base: u64, offset: u64, data: &mut [u8]) {
        let v = self.read_value.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.get(i).copied().unwrap_or(0);
        }
        self.log.lock().unwrap().push(Access {
            addr: base + offset,
            data: Vec::new(),
            write: false,
        });
    }
    fn write(&self, base: u64, offset: u64, data: &[u8]) {
        self.log.lock().unwrap().push(Access {
            addr: base + offset,
            data: data.to_vec(),
            write: true,
        });
    }
}
