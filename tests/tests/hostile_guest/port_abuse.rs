//! Register abuse over port I/O, at CPL0: pseudo-random accesses to COM1,
//! the i8042, the ACPI registers and unassigned ports, each run of them on a
//! fresh VM until an access that legitimately ends it.

use std::sync::Arc;

use devices::{BusRange, ExitRequest, Serial};
use tests::bare_vm::{BareVm, TEST_PORT};
use tests::guest_driver::{DriverError, Op, Privilege, runner, start_runner};
use vmm::test_utils::StopReason;

use crate::harness::{
    RAM_SIZE, Rng, assert_final_write, assert_no_panics, assert_ram_unchanged, final_checks,
    run_driven, snapshot,
};

/// Ports KVM's in-kernel PIC, PIT and ELCR answer: not the VMM's devices.
pub(crate) fn in_kernel_port(port: u16) -> bool {
    matches!(
        port,
        0x20 | 0x21 | 0x40..=0x43 | 0x61 | 0xa0 | 0xa1 | 0x4d0 | 0x4d1
    )
}

/// Ports that are not the VMM's device ports, its test recorder or KVM's.
pub(crate) fn unassigned_port(rng: &mut Rng) -> u16 {
    loop {
        let port = rng.next() as u16;
        let ours = (0x3f8..=0x3ff).contains(&port)
            || port == 0x60
            || port == 0x64
            || (0x600..=0x602).contains(&port)
            || (TEST_PORT..TEST_PORT + 8).contains(&port);
        if !ours && !in_kernel_port(port) {
            return port;
        }
    }
}

pub(crate) fn port_width(rng: &mut Rng) -> u8 {
    rng.pick(&[1, 1, 1, 2, 4])
}

/// `n` pseudo-random port accesses on COM1, the i8042, the ACPI registers
/// (and their neighbours) and unassigned ports.
pub(crate) fn port_abuse(rng: &mut Rng, n: usize) -> Vec<Op> {
    (0..n)
        .map(|_| {
            let roll = rng.below(100);
            let (port, value) = if roll < 35 {
                let v = rng.pick(&[0x80, 0x03, 0x10, 0x0f, 0x07, 0xc7, 0x00, 0xff]);
                (
                    0x3f8 + rng.below(8) as u16,
                    if rng.chance(50) { v } else { rng.next() as u32 },
                )
            } else if roll < 50 {
                let port = rng.pick(&[0x60, 0x64]);
                let v = rng.pick(&[0xd1, 0xad, 0xae, 0x20, 0x60, 0xaa, 0xfe, 0xff]);
                (port, if rng.chance(40) { v } else { rng.next() as u32 })
            } else if roll < 65 {
                let port = 0x5fc + rng.below(11) as u16;
                let v = rng.pick(&[0x20, 0x14, 0x3c, 0xff, 0x00, 0x01, 0x06, 0x34]);
                (port, if rng.chance(30) { v } else { rng.next() as u32 })
            } else {
                (unassigned_port(rng), rng.next() as u32)
            };
            let width = port_width(rng);
            if rng.chance(65) {
                Op::PortWrite { port, width, value }
            } else {
                Op::PortRead { port, width }
            }
        })
        .collect()
}

/// What a port write does to the VM, as the i8042 and the ACPI registers
/// define it; single-port devices take only single-byte accesses.
pub(crate) fn ends_vm(op: &Op) -> Option<ExitRequest> {
    let Op::PortWrite {
        port,
        width: 1,
        value,
    } = *op
    else {
        return None;
    };
    let v = value as u8;
    match port {
        0x64 if v == 0xfe => Some(ExitRequest::Reset),
        0x600 if v & 0x20 != 0 && (v >> 2) & 7 == 5 => Some(ExitRequest::PowerOff),
        0x602 if v == 1 => Some(ExitRequest::Reset),
        _ => None,
    }
}

/// Counts what the guest sends to COM1 instead of printing it.
#[derive(Clone, Default)]
pub(crate) struct CountingSink(pub(crate) Arc<std::sync::atomic::AtomicU64>);

impl std::io::Write for CountingSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .fetch_add(buf.len() as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Puts a COM1 whose output is counted (random bytes must not reach the
/// test's stdout) in place of the VM's; its interrupt line goes nowhere.
pub(crate) fn quiet_serial(vm: &BareVm, sink: &CountingSink) {
    let irq: Arc<dyn devices::Interrupt> =
        Arc::new(vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap());
    let serial = Arc::new(Serial::new(irq, Box::new(sink.clone()), None));
    let pio = &vm.machine.devices.pio;
    let g = rcu::read_lock();
    let (bus, _) = pio.read(&g).without_range(0x3f8).unwrap();
    let bus = bus
        .with_device(BusRange::new(0x3f8, 8).unwrap(), serial)
        .unwrap();
    drop(g);
    pio.replace(bus);
}

/// How one VM of the port test ended.
#[derive(Debug)]
pub(crate) enum SegmentEnd {
    /// Ran its ops and the final checks; the test powered it off.
    Done,
    /// The terminating op at this index ended it.
    Ended(usize),
}

/// Runs `ops[start..]` on a fresh VM until the first op that legitimately
/// ends the VM (which must then end it, with its request) or the end of the
/// list (then the final checks run).
pub(crate) fn port_segment(
    ops: &Arc<Vec<Op>>,
    start: usize,
    seed: u64,
    sink: &CountingSink,
    panics: usize,
) -> SegmentEnd {
    let mut vm = BareVm::new(2, RAM_SIZE, runner(), 0x1234_5678);
    quiet_serial(&vm, sink);
    start_runner(&vm, Privilege::Kernel, true);
    let before = snapshot(&vm);
    let end = ops[start..]
        .iter()
        .position(|op| ends_vm(op).is_some())
        .map(|i| start + i);
    let exit = Arc::clone(&vm.machine.devices.exit);
    let ops2 = Arc::clone(ops);
    let (reason, outcome) = run_driven(&mut vm, move |mut driver| {
        let upto = end.unwrap_or(ops2.len());
        for (b, batch) in ops2[start..upto].chunks(1024).enumerate() {
            if let Err(e) = driver.run(batch) {
                panic!("seed {seed:#x}: ops from {}: {e:?}", start + b * 1024);
            }
            assert_eq!(
                exit.first(),
                None,
                "seed {seed:#x}: a port write in ops {}..{} ended the VM",
                start + b * 1024,
                start + b * 1024 + batch.len()
            );
        }
        if let Some(k) = end {
            match driver.run(&ops2[k..=k]) {
                Ok(_) | Err(DriverError::VmEnded { .. }) => {}
                Err(e) => panic!("seed {seed:#x}: op {k}: {e:?}"),
            }
            return SegmentEnd::Ended(k);
        }
        // The devices still work: COM1's scratch register and line status,
        // the i8042 and ACPI registers, the test recorder on port I/O.
        let res = driver
            .run(&[
                Op::PortWrite {
                    port: 0x3fb,
                    width: 1,
                    value: 0x03,
                },
                Op::PortWrite {
                    port: 0x3ff,
                    width: 1,
                    value: 0x5a,
                },
                Op::PortRead {
                    port: 0x3ff,
                    width: 1,
                },
                Op::PortRead {
                    port: 0x3fd,
                    width: 1,
                },
                Op::PortRead {
                    port: 0x64,
                    width: 1,
                },
                Op::PortRead {
                    port: 0x600,
                    width: 1,
                },
                Op::PortWrite {
                    port: TEST_PORT,
                    width: 4,
                    value: 0x600d_0001,
                },
                Op::PortRead {
                    port: TEST_PORT,
                    width: 4,
                },
            ])
            .expect("the runner still answers");
        assert_eq!(res[2].value, 0x5a, "COM1 scratch register");
        assert_ne!(res[3].value & 0x20, 0, "COM1 transmitter not empty");
        assert_eq!((res[4].value, res[5].value), (0, 0));
        assert_eq!(res[7].value, 0x1234_5678, "test recorder read");
        final_checks(&mut driver);
        SegmentEnd::Done
    });
    assert_no_panics(panics, seed);
    assert_eq!(vm.machine.fatal_errors().first(), None, "seed {seed:#x}");
    assert_ram_unchanged(&vm, &before, seed);
    match outcome {
        SegmentEnd::Ended(k) => {
            assert_eq!(
                reason,
                StopReason::Guest(ends_vm(&ops[k]).unwrap()),
                "seed {seed:#x}: op {k} {:?}",
                ops[k]
            );
        }
        SegmentEnd::Done => {
            assert_eq!(reason, StopReason::Guest(ExitRequest::PowerOff));
            assert_final_write(&vm);
            assert_eq!(
                vm.pio.writes().last(),
                Some(&(u64::from(TEST_PORT), 0x600d_0001))
            );
        }
    }
    outcome
}
