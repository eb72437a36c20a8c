//! COM1: a 16550A UART on the port-I/O bus, built on `vm_superio::Serial`.
//!
//! Guest output goes byte by byte to a sink (the VMM passes a bounded buffer that its
//! control thread drains to stdout, so a guest access never waits on I/O); host input is queued
//! with [`Serial::queue_input`] into the UART's 64-byte receive FIFO; interrupts go out
//! through an [`Interrupt`] (a KVM irqfd in the VMM).

use std::fmt;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use thiserror::Error;
use vm_superio::serial::{Error as UartError, SerialEvents};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{BusDevice, BusRange};
use crate::interrupt::{Interrupt, InterruptError, SuperioTrigger};

/// First I/O port of COM1.
pub const COM1_PORT: u16 = 0x3f8;
/// ISA interrupt line of COM1.
pub const COM1_IRQ: u32 = 4;
/// Number of I/O ports (registers) of a 16550A.
pub const SERIAL_PORT_COUNT: u64 = 8;
/// The port-I/O range COM1 occupies: `[0x3f8, 0x400)`.
pub const COM1_RANGE: BusRange = match BusRange::new(COM1_PORT as u64, SERIAL_PORT_COUNT) {
    Ok(r) => r,
    Err(_) => panic!("COM1 range is valid"),
};

/// Errors of the serial device.
#[derive(Debug, Error)]
pub enum SerialError {
    /// Raising the serial interrupt failed.
    #[error("cannot raise the serial interrupt")]
    Interrupt(#[source] InterruptError),
}

/// Counters and the optional input-drained notifier, called back by the UART.
struct UartEvents {
    bytes_out: AtomicU64,
    bytes_lost: AtomicU64,
    input_drained: Option<EventFd>,
}

impl SerialEvents for UartEvents {
    fn buffer_read(&self) {}

    fn out_byte(&self) {
        self.bytes_out.fetch_add(1, Ordering::Relaxed);
    }

    fn tx_lost_byte(&self) {
        self.bytes_lost.fetch_add(1, Ordering::Relaxed);
    }

    fn in_buffer_empty(&self) {
        if let Some(evt) = &self.input_drained
            && let Err(e) = evt.write(1)
        {
            log::debug!("cannot signal serial input drained: {e}");
        }
    }
}

type Uart = vm_superio::Serial<SuperioTrigger, Arc<UartEvents>, Box<dyn Write + Send>>;

/// Output statistics of a [`Serial`] (see [`Serial::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SerialStats {
    /// Bytes the guest transmitted that reached the sink.
    pub bytes_out: u64,
    /// Bytes the guest transmitted that the sink refused (they are dropped).
    pub bytes_lost: u64,
}

/// A 16550A UART (COM1) on the port-I/O bus.
///
/// Register it at [`COM1_RANGE`]: `offset` selects the register (0..=7); `base` is
/// ignored. Each byte of a wider access goes to the next register, as an ISA bus splits
/// it. Bytes at offsets 8 and above (only reachable by calling the device directly) read
/// as `0xff` and are ignored on write.
///
/// The UART state sits behind this device's own mutex; a guest access holds it for the
/// whole access, including the write to the output sink. The sink is flushed after every
/// byte, so it must not block: the access runs on a vCPU thread, inside an RCU read
/// section (the VMM's sink only copies into a bounded buffer). A failing sink (for
/// example `EPIPE` once stdout's reader is gone) never panics: the byte is dropped,
/// counted in [`SerialStats::bytes_lost`], the first failure is logged at warn level and
/// later ones at debug. The transmitter-empty interrupt is raised either way, so the
/// guest never waits on a dead sink.
pub struct Serial {
    uart: Mutex<Uart>,
    events: Arc<UartEvents>,
    output_failed: AtomicBool,
}

impl Serial {
    /// Creates a UART that writes guest output to `out` and raises `interrupt`.
    ///
    /// If `input_drained` is given, it is signalled each time the guest reads the
    /// receive buffer empty: the VMM can then queue input it could not queue before.
    pub fn new(
        interrupt: Arc<dyn Interrupt>,
        out: Box<dyn Write + Send>,
        input_drained: Option<EventFd>,
    ) -> Serial {
        let events = Arc::new(UartEvents {
            bytes_out: AtomicU64::new(0),
            bytes_lost: AtomicU64::new(0),
            input_drained,
        });
        let uart =
            vm_superio::Serial::with_events(SuperioTrigger(interrupt), Arc::clone(&events), out);
        Serial {
            uart: Mutex::new(uart),
            events,
            output_failed: AtomicBool::new(false),
        }
    }

    /// Back to the power-on state (a machine reset): registers at their reset values,
    /// both FIFOs empty (queued input is dropped); the output sink and the counters
    /// stay. Blocks only on this device's mutex.
    pub fn reset(&self) {
        let mut uart = self.lock();
        let trigger = SuperioTrigger(Arc::clone(&uart.interrupt_evt().0));
        let placeholder = vm_superio::Serial::with_events(
            SuperioTrigger(Arc::clone(&trigger.0)),
            Arc::clone(&self.events),
            Box::new(std::io::sink()) as Box<dyn Write + Send>,
        );
        let out = std::mem::replace(&mut *uart, placeholder).into_writer();
        *uart = vm_superio::Serial::with_events(trigger, Arc::clone(&self.events), out);
    }

    /// Queues host input for the guest to read; returns how many leading bytes of
    /// `input` were queued.
    ///
    /// Queues at most [`input_capacity`](Serial::input_capacity) bytes; returns 0 if the
    /// FIFO is full or the guest has put the UART in loopback mode (input is then not
    /// connected). The caller keeps the rest and retries later, for example when the
    /// `input_drained` eventfd fires. Raises the receive interrupt if the guest enabled
    /// it. If raising it fails, the bytes stay queued and the error is returned. Blocks
    /// only on this device's mutex (held by a vCPU for one guest access).
    pub fn queue_input(&self, input: &[u8]) -> Result<usize, SerialError> {
        match self.lock().enqueue_raw_bytes(input) {
            Ok(n) => Ok(n),
            Err(UartError::FullFifo) => Ok(0),
            Err(UartError::Trigger(e)) => Err(SerialError::Interrupt(e)),
            // Queuing input does not write to the sink.
            Err(UartError::IOError(e)) => {
                log::debug!("unexpected serial output error while queuing input: {e}");
                Ok(0)
            }
        }
    }

    /// Free space in the receive FIFO, in bytes (the FIFO holds 64).
    pub fn input_capacity(&self) -> usize {
        self.lock().fifo_capacity()
    }

    /// Output statistics since creation.
    pub fn stats(&self) -> SerialStats {
        SerialStats {
            bytes_out: self.events.bytes_out.load(Ordering::Relaxed),
            bytes_lost: self.events.bytes_lost.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Uart> {
        // A panic elsewhere while holding the lock leaves the UART registers consistent
        // (each update is a plain field store), so keep going.
        self.uart.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn report_write_error(&self, err: UartError<InterruptError>) {
        match err {
            UartError::IOError(e) => {
                if self.output_failed.swap(true, Ordering::Relaxed) {
                    log::debug!("serial output dropped a byte: {e}");
                } else {
                    log::warn!("serial output failed, dropping guest output: {e}");
                }
            }
            UartError::Trigger(e) => log::warn!("cannot raise the serial interrupt: {e}"),
            UartError::FullFifo => log::debug!("serial loopback FIFO full"),
        }
    }
}

/// Register index for byte `i` of an access at `offset`, if it is one of the 8 registers.
fn register(offset: u64, i: usize) -> Option<u8> {
    let reg = offset.checked_add(u64::try_from(i).ok()?)?;
    if reg < SERIAL_PORT_COUNT {
        u8::try_from(reg).ok()
    } else {
        None
    }
}

impl BusDevice for Serial {
    fn read(&self, _base: u64, offset: u64, data: &mut [u8]) {
        let mut uart = self.lock();
        for (i, byte) in data.iter_mut().enumerate() {
            *byte = register(offset, i).map_or(0xff, |reg| uart.read(reg));
        }
    }

    fn write(&self, _base: u64, offset: u64, data: &[u8]) {
        let mut uart = self.lock();
        for (i, &value) in data.iter().enumerate() {
            if let Some(reg) = register(offset, i)
                && let Err(e) = uart.write(reg, value)
            {
                self.report_write_error(e);
            }
        }
    }
}

impl fmt::Debug for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Serial")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::io;

    use proptest::prelude::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LCR: u64 = 3;
    const MCR: u64 = 4;
    const LSR: u64 = 5;
    const SCR: u64 = 7;
    const IER_RDA: u8 = 0x01;
    const IER_THRE: u8 = 0x02;
    const LSR_DR: u8 = 0x01;

    #[derive(Clone, Default)]
    struct SharedBuf(Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct BrokenPipe;

    impl Write for BrokenPipe {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::from_raw_os_error(libc::EPIPE))
        }
        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::from_raw_os_error(libc::EPIPE))
        }
    }

    #[derive(Default)]
    struct CountingIrq(AtomicU64);

    impl Interrupt for CountingIrq {
        fn trigger(&self) -> Result<(), InterruptError> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    impl CountingIrq {
        fn count(&self) -> u64 {
            self.0.load(Ordering::SeqCst)
        }
    }

    struct FailingIrq;

    impl Interrupt for FailingIrq {
        fn trigger(&self) -> Result<(), InterruptError> {
            Err(InterruptError::EventFd(io::Error::from_raw_os_error(
                libc::EBADF,
            )))
        }
    }

    fn serial_with_buf() -> (Serial, SharedBuf, Arc<CountingIrq>) {
        let buf = SharedBuf::default();
        let irq = Arc::new(CountingIrq::default());
        let serial = Serial::new(irq.clone(), Box::new(buf.clone()), None);
        (serial, buf, irq)
    }

    fn read1(s: &Serial, offset: u64) -> u8 {
        let mut b = [0u8];
        s.read(COM1_RANGE.base(), offset, &mut b);
        b[0]
    }

    #[test]
    fn com1_range_is_8_ports_at_0x3f8() {
        assert_eq!((COM1_RANGE.base(), COM1_RANGE.last()), (0x3f8, 0x3ff));
    }

    /// A machine reset puts the registers back at their power-on values and
    /// drops queued input; the sink (and what it got) and the counters stay.
    #[test]
    fn reset_restores_power_on_registers_and_keeps_the_sink() {
        let (serial, buf, _) = serial_with_buf();
        let fresh: Vec<u8> = [IER, LCR, MCR, LSR, SCR]
            .iter()
            .map(|&r| read1(&serial, r))
            .collect();
        serial.write(0x3f8, DATA, b"a");
        serial.write(0x3f8, IER, &[IER_RDA | IER_THRE]);
        serial.write(0x3f8, LCR, &[0x03]);
        serial.write(0x3f8, MCR, &[0x08]);
        serial.write(0x3f8, SCR, &[0x5a]);
        assert_eq!(serial.queue_input(b"xyz").unwrap(), 3);
        assert_eq!(read1(&serial, LSR) & LSR_DR, LSR_DR);
        serial.reset();
        let after: Vec<u8> = [IER, LCR, MCR, LSR, SCR]
            .iter()
            .map(|&r| read1(&serial, r))
            .collect();
        assert_eq!(after, fresh, "registers as at power-on, no input pending");
        serial.write(0x3f8, DATA, b"b");
        assert_eq!(&*buf.0.lock().unwrap(), b"ab", "same sink after the reset");
        assert_eq!(serial.stats().bytes_out, 2);
    }

    #[test]
    fn output_bytes_reach_the_sink() {
        let (serial, buf, _) = serial_with_buf();
        for &b in b"hello\n" {
            serial.write(0x3f8, DATA, &[b]);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"hello\n");
        assert_eq!(
            serial.stats(),
            SerialStats {
                bytes_out: 6,
                bytes_lost: 0
            }
        );
    }

    #[test]
    fn wide_write_is_split_across_registers() {
        let (serial, buf, _) = serial_with_buf();
        // Two bytes at offset 6: MSR (read-only, ignored) and the scratch register.
        serial.write(0x3f8, 6, &[0x12, 0x5a]);
        assert_eq!(read1(&serial, SCR), 0x5a);
        // Bytes past the 8 registers are dropped; reads of them give 0xff.
        serial.write(0x3f8, SCR, &[0x77, 0x66]);
        assert_eq!(read1(&serial, SCR), 0x77);
        let mut wide = [0u8; 3];
        serial.read(0x3f8, SCR, &mut wide);
        assert_eq!(wide, [0x77, 0xff, 0xff]);
        assert!(buf.0.lock().unwrap().is_empty());
    }

    #[test]
    fn input_raises_the_interrupt_and_is_read_back() {
        let evt = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq = Arc::new(CountingIrq::default());
        let serial = Serial::new(
            irq.clone(),
            Box::new(io::sink()),
            Some(evt.try_clone().unwrap()),
        );

        // With receive interrupts disabled, input is queued silently.
        assert_eq!(serial.queue_input(b"a").unwrap(), 1);
        assert_eq!(irq.count(), 0);
        assert_eq!(read1(&serial, DATA), b'a');
        assert_eq!(
            evt.read().unwrap(),
            1,
            "reading the FIFO empty signals input_drained"
        );

        serial.write(0x3f8, IER, &[IER_RDA]);
        assert_eq!(
            irq.count(),
            0,
            "nothing pending when the interrupt is enabled"
        );
        assert_eq!(serial.queue_input(b"hi").unwrap(), 2);
        assert_eq!(irq.count(), 1);
        assert_eq!(serial.input_capacity(), 62);
        assert_eq!(read1(&serial, LSR) & LSR_DR, LSR_DR);
        // IIR reports "received data available" (0x04) with the FIFO bits (0xc0).
        assert_eq!(read1(&serial, IIR), 0xc4);
        assert_eq!(read1(&serial, DATA), b'h');
        assert_eq!(read1(&serial, DATA), b'i');
        assert_eq!(read1(&serial, LSR) & LSR_DR, 0);
        assert_eq!(serial.input_capacity(), 64);
    }

    #[test]
    fn full_fifo_accepts_a_prefix_then_nothing() {
        let (serial, _, _) = serial_with_buf();
        let input = [b'x'; 100];
        assert_eq!(serial.queue_input(&input).unwrap(), 64);
        assert_eq!(serial.queue_input(&input).unwrap(), 0);
        assert_eq!(serial.input_capacity(), 0);
        assert_eq!(serial.queue_input(&[]).unwrap(), 0);
    }

    #[test]
    fn loopback_mode_refuses_host_input() {
        let (serial, buf, _) = serial_with_buf();
        serial.write(0x3f8, MCR, &[0x10]);
        assert_eq!(serial.queue_input(b"abc").unwrap(), 0);
        serial.write(0x3f8, DATA, b"z");
        assert_eq!(
            read1(&serial, DATA),
            b'z',
            "loopback echoes the transmitted byte"
        );
        assert!(buf.0.lock().unwrap().is_empty());
    }

    #[test]
    fn divisor_latch_does_not_transmit() {
        let (serial, buf, _) = serial_with_buf();
        serial.write(0x3f8, LCR, &[0x80]);
        serial.write(0x3f8, DATA, &[0x01, 0x00]);
        assert_eq!(read1(&serial, DATA), 0x01);
        serial.write(0x3f8, LCR, &[0x03]);
        assert!(buf.0.lock().unwrap().is_empty());
    }

    #[test]
    fn broken_sink_drops_bytes_and_still_interrupts() {
        let irq = Arc::new(CountingIrq::default());
        let serial = Serial::new(irq.clone(), Box::new(BrokenPipe), None);
        serial.write(0x3f8, IER, &[IER_THRE]);
        assert_eq!(
            irq.count(),
            1,
            "enabling THRE interrupts with an empty THR raises one"
        );
        read1(&serial, IIR);
        let before = irq.count();
        for _ in 0..3 {
            serial.write(0x3f8, DATA, b"x");
            // Reading IIR acknowledges the THR-empty interrupt so the next byte raises it.
            read1(&serial, IIR);
        }
        assert_eq!(
            serial.stats(),
            SerialStats {
                bytes_out: 0,
                bytes_lost: 3
            }
        );
        assert_eq!(irq.count() - before, 3);
    }

    #[test]
    fn failing_interrupt_is_reported_by_queue_input_and_bytes_stay_queued() {
        let serial = Serial::new(Arc::new(FailingIrq), Box::new(io::sink()), None);
        serial.write(0x3f8, IER, &[IER_RDA]); // logs, does not panic
        assert!(matches!(
            serial.queue_input(b"q"),
            Err(SerialError::Interrupt(_))
        ));
        assert_eq!(read1(&serial, DATA), b'q');
    }

    proptest! {
        #[test]
        fn random_accesses_never_panic(
            ops in prop::collection::vec(
                (any::<bool>(), prop_oneof![0u64..16, any::<u64>()], prop::collection::vec(any::<u8>(), 0..=16)),
                0..64,
            ),
            input in prop::collection::vec(any::<u8>(), 0..80),
        ) {
            let (serial, buf, _) = serial_with_buf();
            let broken = Serial::new(Arc::new(FailingIrq), Box::new(BrokenPipe), None);
            for (is_write, offset, mut data) in ops {
                for s in [&serial, &broken] {
                    if is_write {
                        s.write(COM1_RANGE.base(), offset, &data);
                    } else {
                        s.read(COM1_RANGE.base(), offset, &mut data);
                    }
                    let _ = s.queue_input(&input);
                }
            }
            let stats = serial.stats();
            prop_assert_eq!(stats.bytes_out, buf.0.lock().unwrap().len() as u64);
            prop_assert_eq!(stats.bytes_lost, 0);
            prop_assert_eq!(broken.stats().bytes_out, 0);
        }
    }
}
